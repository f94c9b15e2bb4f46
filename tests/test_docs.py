"""The documents match the repository: every figure in docs/RESULTS.md and in the README's results table is what
`scripts/docs_results.py` reads from the result files today, the README stays a short guide, every relative link
points at a file that exists, and the stated Python version is the one the package requires."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The pages this test holds to the 120-character line limit (table rows and bare links excepted).
PAGES = ("README.md", "docs/RESULTS.md", "docs/BUNDLE.md", "docs/CONVERT.md", "docs/ENERGY.md",
         "docs/OWN_NETWORK.md", "docs/TRAINING.md", "docs/RUNTIME.md")
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def docs_results():
    spec = importlib.util.spec_from_file_location("docs_results", ROOT / "scripts" / "docs_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_page_and_readme_table_equal_the_result_files(docs_results):
    assert (ROOT / "docs/RESULTS.md").read_text() == docs_results.results_md(), \
        "docs/RESULTS.md differs from the result files: run python scripts/docs_results.py"
    readme = (ROOT / "README.md").read_text()
    assert readme.count(docs_results.BEGIN) == 1 and readme.count(docs_results.END) == 1
    assert readme == docs_results.readme_with_block(readme), \
        "the README's results table differs from the result files: run python scripts/docs_results.py"


def test_a_changed_result_file_changes_the_page(docs_results, monkeypatch, tmp_path):
    """The generator reads the figures from the files (a figure typed into the page would not move)."""
    real = docs_results.load

    def load(rel):
        data = real(rel)
        if rel == docs_results.GUARANTEE:
            data["results"]["0.5"]["guaranteed"]["misses"] += 1
        return data

    before = docs_results.results_md()
    monkeypatch.setattr(docs_results, "load", load)
    after = docs_results.results_md()
    assert before != after
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(changed) == 1 and "<= 0.5 pp | guaranteed" in changed[0][0]


def test_every_results_table_names_its_machine_and_file():
    text = (ROOT / "docs/RESULTS.md").read_text().splitlines()
    tables = [i for i, line in enumerate(text) if line.startswith("| ") and (i == 0 or not text[i - 1].startswith("|"))]
    assert len(tables) >= 10
    for i in tables:
        head = text[i]
        block = []
        for line in text[i + 2:]:
            if not line.startswith("|"):
                break
            block.append(line)
        caption = " ".join(text[max(0, i - 6):i])
        assert "| file |" in head or "benchmarks/results/" in caption, f"table without its file: {head}"
        named = "machine" in head or "Machine:" in caption or re.search(r"(AMD|Intel|Raspberry|x86_64|no machine|"
                                                                        r"does not record its machine)", caption)
        assert named, f"table without its machine: {head}"
        assert block, f"empty table: {head}"


def test_readme_is_a_short_guide():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220
    for heading in ("## The two commands", "## Device quickstart", "## Python API", "## Command line",
                    "## Results", "## Documentation"):
        assert heading in lines


@pytest.mark.parametrize("page", PAGES)
def test_lines_fit_and_links_resolve(page):
    path = ROOT / page
    long = [n for n, line in enumerate(path.read_text().splitlines(), 1)
            if len(line) > 120 and not line.startswith("|") and " " in line.strip()]
    assert not long, f"{page}: lines over 120 characters: {long}"
    for target in LINK.findall(path.read_text()):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        file = (path.parent / target.split("#", 1)[0]).resolve()
        assert file.exists(), f"{page} links to {target}, which does not exist"


def test_python_version_stated_is_the_one_required():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    pins = dict(line.split("==") for line in (ROOT / "requirements/constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert int(pins["numpy"].split(".")[0]) >= 2 and int(pins["numpy"].split(".")[1]) >= 3  # numpy >= 2.3: 3.11+
    assert "**Python 3.11** or newer" in (ROOT / "README.md").read_text()
