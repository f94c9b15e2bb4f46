"""The documents match the repository: every figure in docs/RESULTS.md and in the README's results table is what
`scripts/docs_results.py` reads from the result files today, the README stays a short guide, every relative link
points at a file that exists, the stated Python version is the one the package requires, and docs/DESIGN.md lists
every module of edgeexit/ and states the package imports (and their cycles) as the code has them."""

from __future__ import annotations

import ast
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.runtime  # numpy, Pillow, click and a TFLite interpreter only (device/legacy runs)

ROOT = Path(__file__).resolve().parents[1]
#: The pages this test holds to the 120-character line limit (table rows and bare links excepted).
PAGES = ("README.md", "docs/RESULTS.md", "docs/BUNDLE.md", "docs/CONVERT.md", "docs/ENERGY.md",
         "docs/OWN_NETWORK.md", "docs/TRAINING.md", "docs/RUNTIME.md", "docs/DESIGN.md")
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


# ---- docs/DESIGN.md drawn from the tree: its module list and its package import graph equal the code's

DESIGN = ROOT / "docs" / "DESIGN.md"
#: The CLI's command table names its commands' modules as "module:attr" strings, imported when a command runs.
COMMAND = re.compile(r"^(edgeexit(?:\.\w+)+):\w+$")
HOW = ("import", "lazily", "by name")  # strongest first: an edge is as strong as its strongest import


def _fenced_blocks(text: str, after: str) -> list[list[str]]:
    """The lines of every ``` block in the section that starts with the heading line ``after``."""
    section = text.split(after, 1)[1].split("\n## ", 1)[0]
    return [block.split("\n", 1)[1].splitlines() for block in section.split("```")[1::2]]


def design_modules(text: str) -> set[str]:
    """The module paths (edgeexit/...py) the tree block of DESIGN.md lists, two spaces of indent per level."""
    modules, stack = set(), []
    for line in _fenced_blocks(text, "## The tree")[0]:
        indent = len(line) - len(line.lstrip(" "))
        name = line.split()[0]
        assert indent % 2 == 0 and indent // 2 <= len(stack), f"DESIGN.md tree: misplaced line {line!r}"
        del stack[indent // 2:]
        if name.endswith("/"):
            stack.append(name[:-1])
        else:
            assert name.endswith(".py") and len(line.split()) > 1, f"DESIGN.md tree: {line!r} needs one line of text"
            modules.add("/".join([*stack, name]))
    return modules


def package_of(module: str) -> str:
    """The graph node of a module: ``edgeexit.runtime.runner`` -> ``runtime``,
    ``edgeexit.workstation.models.costs`` -> ``workstation.models``; a top-level module is its own node
    (``errors``); edgeexit/__init__.py is ``edgeexit``."""
    parts = module.split(".")[1:]
    if not parts:
        return "edgeexit"
    return ".".join(parts[:2] if parts[0] == "workstation" and len(parts) > 1 else parts[:1])


def package_imports(root: Path = ROOT) -> tuple[set[str], dict[tuple[str, str], str]]:
    """Every node, and ``{(importer, imported): how}`` over edgeexit/ (``how`` as in :data:`HOW`), read with ast."""
    nodes, edges = set(), {}
    for path in sorted((root / "edgeexit").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if package else parts)
        nodes.add(package_of(module))
        tree = ast.parse(path.read_text())
        top = {id(n) for stmt in tree.body if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
               for n in ast.walk(stmt)}  # module-level statements (function and class bodies run later)
        typing_only = {id(n) for stmt in ast.walk(tree) if isinstance(stmt, ast.If) and _is_type_checking(stmt.test)
                       for part in stmt.body for n in ast.walk(part)}  # `if TYPE_CHECKING:` imports run never
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            how = "import" if id(node) in top else "lazily"
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                here = module.split(".") if package else module.split(".")[:-1]
                base = here[:len(here) - node.level + 1] if node.level else []
                targets = [".".join(base + ([node.module] if node.module else []))]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and COMMAND.match(node.value):
                targets, how = [COMMAND.match(node.value).group(1)], "by name"
            else:
                continue
            for target in (t for t in targets if t.split(".")[0] == "edgeexit"):
                edge = (package_of(module), package_of(target))
                if edge[0] != edge[1] and (edge not in edges or HOW.index(how) < HOW.index(edges[edge])):
                    edges[edge] = how
    return nodes, edges


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def design_imports(text: str) -> dict[str, dict[tuple[str, str], str]]:
    """``{node: {(node, imported): how}}`` as DESIGN.md states it (``a -> b, c; lazily: d; by name: e``)."""
    lines: list[str] = []
    for line in _fenced_blocks(text, "## Package imports")[0]:
        if line.startswith(" "):
            lines[-1] += " " + line.strip()  # a continuation line
        else:
            lines.append(line)
    stated = {}
    for line in lines:
        node, rest = (part.strip() for part in line.split("->", 1))
        stated[node] = {}
        for i, group in enumerate(rest.split(";")):
            how, _, names = group.strip().rpartition(": ")
            how = how or "import"
            assert how in HOW and (i > 0) == (how != "import"), f"DESIGN.md imports: cannot read {line!r}"
            stated[node].update({(node, name.strip()): how for name in names.split(",") if name.strip() != "nothing"})
    return stated


def cycles(nodes: set[str], edges) -> list[list[str]]:
    """The strongly connected sets of more than one node, each sorted (transitive closure over a dozen nodes)."""
    reach = {n: {b for a, b in edges if a == n} for n in nodes}
    changed = True
    while changed:
        changed = False
        for n in nodes:
            more = set().union(*(reach[m] for m in reach[n])) - reach[n]
            changed |= bool(more)
            reach[n] |= more
    groups = {tuple(sorted({n} | {m for m in reach[n] if n in reach[m]})) for n in nodes}
    return sorted(list(g) for g in groups if len(g) > 1)


def test_design_lists_every_module_of_the_tree():
    tree = {str(p.relative_to(ROOT)) for p in (ROOT / "edgeexit").rglob("*.py")}
    listed = design_modules(DESIGN.read_text())
    assert sorted(tree - listed) == [], "modules missing from docs/DESIGN.md"
    assert sorted(listed - tree) == [], "docs/DESIGN.md lists modules that do not exist"


def test_design_states_the_package_imports_as_they_are():
    nodes, edges = package_imports()
    stated = design_imports(DESIGN.read_text())
    assert sorted(stated) == sorted(nodes), "docs/DESIGN.md: one line per package"
    got = {e: how for per in stated.values() for e, how in per.items()}
    assert sorted(set(edges.items()) - set(got.items())) == [], "imports the code has and DESIGN.md does not state"
    assert sorted(set(got.items()) - set(edges.items())) == [], "imports DESIGN.md states and the code does not have"


def test_the_packages_import_each_other_without_cycles():
    """Packages form layers (DESIGN.md): no two import each other, even lazily or by name."""
    nodes, edges = package_imports()
    assert cycles(nodes, edges) == []


def test_the_device_side_imports_the_workstation_only_lazily():
    """The boundary DESIGN.md states: no module-level import from a device package into edgeexit.workstation."""
    _, edges = package_imports()
    device = {"edgeexit", "__main__", "errors", "progress", "runtime", "energy", "bench", "tuning", "cli"}
    crossing = {e: how for e, how in edges.items() if e[0] in device and e[1].startswith("workstation")}
    assert crossing == {("bench", "workstation.catalog"): "lazily", ("bench", "workstation.training"): "lazily",
                        ("cli", "workstation.cli"): "by name"}


def test_the_import_graph_reader_sees_each_kind_of_import(tmp_path):
    """The reader itself: relative and absolute imports, lazy ones, the CLI's command strings, cycles."""
    pkg = tmp_path / "edgeexit"
    for rel, text in {"__init__.py": "from .a.x import f\n", "a/__init__.py": "", "a/x.py": "from ..b import y\n",
                      "b/__init__.py": "", "b/y.py": "def g():\n    from edgeexit.a import x\n",
                      "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n",
                      "c.py": "T = {'run': ('edgeexit.workstation.m.z:run', 'help')}\n",
                      "workstation/__init__.py": "", "workstation/m/__init__.py": "", "workstation/m/z.py": ""}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    nodes, edges = package_imports(tmp_path)
    assert nodes == {"edgeexit", "a", "b", "c", "d", "workstation", "workstation.m"}  # d: a typing-only import
    assert edges == {("edgeexit", "a"): "import", ("a", "b"): "import", ("b", "a"): "lazily",
                     ("c", "workstation.m"): "by name"}
    assert cycles(nodes, edges) == [["a", "b"]]
