"""Hostile bundles and inputs: every case is refused with one line `error: ...`, or gives the clean answers.

The corpus (tests/hostile_corpus.py) mutates the tiny bundle's files, manifest and file system and feeds bad
images; each `edgeexit run` / `edgeexit info` runs in a forked child of a subprocess with a timeout, so a
segfault or a hang fails its case instead of the test run. Signed bundles: accepted with the right key,
refused with another key, without a signature, or after any byte of any file changes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import hostile_corpus as hc  # noqa: E402

from edgeexit.errors import BundleError, InputError, UsageError  # noqa: E402


#: ai-edge-litert prints this once per process when it creates its first interpreter (edgeexit does not redirect
#: the process's stderr; see edgeexit.runtime.interpreter.create_interpreter): not an error line.
XNNPACK_LINE = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


def _errors(stderr: str) -> list[str]:
    """Every stderr line: the command drops the interpreter's routine XNNPACK line, so a refusal is one line."""
    assert XNNPACK_LINE not in stderr
    return stderr.splitlines()


def _outcome(r: dict, ref: list | None) -> str:
    """hang / crash / traceback / bad error output / refused, or for a success: accepted (ref None), same, differs."""
    if r["timeout"]:
        return "hang"
    if r["signal"]:
        return f"crash (signal {r['signal']})"
    err = r["stderr"]
    if "Traceback" in err or "Exception ignored" in err:
        return "traceback"
    if r["rc"] == 0:
        return "accepted" if ref is None else "same" if hc.answers(r) == ref else "differs"
    lines = _errors(err)
    if len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0]:
        return "refused"
    return "bad error output"


@pytest.fixture(scope="module")
def corpus_results(bundle_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    corpus = hc.build(Path(bundle_dir), work)
    cases_file, results_file = work / "cases.json", work / "results.json"
    cases_file.write_text(json.dumps(corpus.cases))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")])))
    env.pop("EDGEEXIT_TRUSTED_KEY", None)
    proc = subprocess.run([sys.executable, str(Path(hc.__file__)), str(cases_file), str(bundle_dir),
                           str(results_file)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(results_file.read_text())
    return corpus, results


def test_corpus_no_crash_no_traceback_no_silent_change(corpus_results):
    corpus, results = corpus_results
    ref = hc.answers(results[0]["ref"])
    assert len(ref) == len(corpus.images) and results[0]["ref"]["rc"] == 0
    counts: Counter = Counter()
    failures = []
    for res in results[1:]:
        run = _outcome(res["run"], ref if res["kind"] != "image" else ref[:1] * 2)
        info = _outcome(res["info"], None) if "info" in res else None
        counts[(res["kind"], run)] += 1
        allowed = {"refused", "same"} | ({"differs"} if res["expect"] == "payload" else set())
        if run not in allowed:
            failures.append(f"{res['id']}: run {run}: {res['run']['stderr'][-300:]!r}")
        if info is not None:
            if info not in ("refused", "accepted") or (info == "refused") != (run == "refused"):
                # `info` must call a bundle broken exactly when `run` refuses it
                failures.append(f"{res['id']}: run {run} but info {info}: {res['info']['stderr'][-300:]!r}")
    print("\nhostile corpus:", len(results) - 1, "cases;", dict(sorted(counts.items())))
    assert not failures, "\n".join(failures[:30])
    assert len(results) - 1 >= 280
    assert sum(v for (kind, out), v in counts.items() if out == "refused") >= 200


def test_forged_lines_are_escaped(bundle_dir, tmp_path):
    """A label or a file name holding a newline cannot forge an output or error line."""
    from edgeexit.cli.main import entry_point

    images = hc.write_clean_images(tmp_path, 1)
    forged = tmp_path / "x\nerror: forged.png"
    shutil.copy(images[0], forged)
    r = hc._run_cli(["run", str(bundle_dir), str(forged)], tmp_path)
    assert r["rc"] == 0 and len(r["stdout"].splitlines()) == 1 and "\\n" in r["stdout"]
    r = hc._run_cli(["run", str(bundle_dir), str(tmp_path / "no\nerror: forged.png")], tmp_path)
    assert r["rc"] == 4 and len(_errors(r["stderr"])) == 1 and _errors(r["stderr"])[0].startswith("error: ")
    assert entry_point is not None


def test_threads_and_absent_edgetpu_are_one_line_errors(bundle_dir, tmp_path):
    from edgeexit.runtime.runner import Runner

    for threads in (0, 10 ** 20, True, 1.5):
        with pytest.raises(UsageError, match="num_threads"):
            Runner(bundle_dir, num_threads=threads, power_sensor=None)
    img = hc.write_clean_images(tmp_path, 1)[0]
    for argv, code in ((["--threads", str(10 ** 20)], 2), (["--edgetpu"], 6)):
        r = hc._run_cli(["run", str(bundle_dir), img, *argv], tmp_path)
        lines = _errors(r["stderr"])
        assert r["rc"] == code and len(lines) == 1 and lines[0].startswith("error: "), r


def test_bomb_image_refused_by_the_library(bundle_dir, tmp_path):
    from edgeexit.runtime.runner import Runner

    runner = Runner(bundle_dir, power_sensor=None)
    (tmp_path / "bomb.png").write_bytes(hc._png(20000, 20000))
    with pytest.raises(InputError, match="pixels"):
        runner(str(tmp_path / "bomb.png"))
    with pytest.raises(InputError, match="NaN"):
        runner(np.full((28, 28, 1), np.nan, np.float32))


def test_huge_dataset_labels_refused(tmp_path):
    from edgeexit.bench.datasets import load_dataset
    from edgeexit.errors import DatasetError

    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((2, 28, 28), np.uint8), labels=np.array([0, 2 ** 62]))
    with pytest.raises(DatasetError, match="class indices"):
        load_dataset(str(path))


# ---- signatures ---------------------------------------------------------------------------------------------
@pytest.fixture
def signed(bundle_dir, tmp_path):
    pytest.importorskip("cryptography")
    from edgeexit.runtime.signing import generate_key, sign_bundle

    generate_key(tmp_path / "k.pem", tmp_path / "k.pub.pem")
    generate_key(tmp_path / "other.pem", tmp_path / "other.pub.pem")
    b = tmp_path / "bundle"
    shutil.copytree(bundle_dir, b)
    sign_bundle(b, tmp_path / "k.pem")
    return b, tmp_path / "k.pub.pem", tmp_path / "other.pub.pem"


def test_signed_bundle_right_key_wrong_key_unsigned(signed, bundle_dir, monkeypatch):
    from edgeexit.runtime.bundle import load_bundle

    b, key, other = signed
    assert load_bundle(b, trusted_key=key).signed_by
    assert load_bundle(b).signed_by is None  # no key asked for: loads, unverified
    with pytest.raises(BundleError, match="not by the trusted key"):
        load_bundle(b, trusted_key=other)
    with pytest.raises(BundleError, match="not signed"):
        load_bundle(bundle_dir, trusted_key=key)
    monkeypatch.setenv("EDGEEXIT_TRUSTED_KEY", str(other))
    with pytest.raises(BundleError, match="not by the trusted key"):
        load_bundle(b)


def test_signed_bundle_refused_after_any_byte_changes(signed, tmp_path):
    from edgeexit.runtime.bundle import load_bundle

    b, key, _ = signed
    names = sorted(p.name for p in b.iterdir())
    assert "manifest.sig" in names and len(names) >= 5
    rng = np.random.default_rng(0)
    for name in names:
        for rehash in (False, True):
            if rehash and not name.endswith(".tflite"):
                continue
            d = tmp_path / f"t-{name}-{rehash}"
            shutil.copytree(b, d)
            data = bytearray((d / name).read_bytes())
            data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
            (d / name).write_bytes(bytes(data))
            if rehash:
                sig = (d / "manifest.sig").read_bytes()
                hc._rehash(d)
                (d / "manifest.sig").write_bytes(sig)
            with pytest.raises(BundleError) as err:
                load_bundle(d, trusted_key=key)
            assert "\n" not in str(err.value)
