"""`edgeexit run` and `edgeexit info` as a user runs them: a subprocess, stdout results, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.runtime  # numpy, Pillow, click and a TFLite interpreter only (device/legacy runs)

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeexit", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


@pytest.fixture(scope="module")
def image(bundle_dir, tmp_path_factory) -> Path:
    from PIL import Image

    m = json.loads((bundle_dir / "manifest.json").read_text())
    h, w = m["input"]["preprocessing"]["size"]
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h + 4, w + 4, 3), dtype=np.uint8)).save(path)
    return path


def _one_error(proc: subprocess.CompletedProcess, code: int, match: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], proc.stderr


def test_run_prints_one_line_per_input(bundle_dir, image):
    proc = cli("run", bundle_dir, image, image, "--board", "rpi4", "--resize")  # the image is 4 pixels larger
    assert proc.returncode == 0, proc.stderr
    header, *lines = proc.stdout.strip().splitlines()
    assert header.split()[:3] == ["file", "label", "p(label)"] and "MACs" in header and "mJ (rpi4)" in header
    assert len(lines) == 2 and all(line.startswith(str(image)) and len(line.split()) == 7 for line in lines)


def test_run_json_with_rule_and_thresholds(bundle_dir, image):
    n = len(json.loads((bundle_dir / "manifest.json").read_text())["stages"])
    proc = cli("run", bundle_dir, image, "--rule", "max_softmax", "--thresholds", ",".join(["0"] * (n - 1)),
               "--json", "--resize")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout.strip())
    assert d["exit_index"] == 0 and d["stages_run"] == 1 and d["file"] == str(image)
    proc = cli("run", bundle_dir, image, "--rule", "fixed", "--exit", str(n - 1), "--json", "--resize")
    assert json.loads(proc.stdout)["exit_index"] == n - 1


def test_info_shows_stages_and_costs(bundle_dir):
    proc = cli("info", bundle_dir)
    assert proc.returncode == 0, proc.stderr
    assert "stage_0.tflite" in proc.stdout and "kappa" in proc.stdout and "exit rule" in proc.stdout
    d = json.loads(cli("info", bundle_dir, "--json").stdout)
    assert d["stages"][-1]["cumulative_macs"] == sum(s["segment_macs"] + s["head_macs"] for s in d["stages"])


def test_errors_are_one_line_with_exit_codes(bundle_dir, image, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bad)
    f = bad / "stage_1.tflite"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0x55
    f.write_bytes(bytes(data))
    _one_error(cli("run", bad, image), 3, "stage_1.tflite: sha256 mismatch")
    _one_error(cli("info", bad), 3, "sha256 mismatch")
    (tmp_path / "t.png").write_text("text")
    _one_error(cli("run", bundle_dir, tmp_path / "t.png"), 4, "not an image")
    _one_error(cli("run", bundle_dir, tmp_path / "missing.png"), 4, "no such file")
    _one_error(cli("run", bundle_dir, image, "--rule", "confidence", "--thresholds", "2,3"), 2, "out of range")
    _one_error(cli("run", bundle_dir, image, "--thresholds", "a,b"), 2, "comma-separated")
    _one_error(cli("run", bundle_dir, image, "--rule", "fixed"), 2, "--exit")
    _one_error(cli("run", tmp_path / "nowhere", image), 3, "not a bundle directory")
    m = json.loads((bad / "manifest.json").read_text())
    m["format_version"] = 7
    (bad / "manifest.json").write_text(json.dumps(m))
    _one_error(cli("info", bad), 3, "newer than this edgeexit supports")


def test_first_run_reports_the_latency_of_the_others(bundle_dir, tmp_path):
    """`edgeexit run` on two PNGs: the first file's latency is within 3x of the second's (the Runner's load paid
    Pillow's plugins, the decode path and the first invokes; before, the first call took 7-90x the second).
    Median over three runs, so that one run preempted by another process on a busy machine does not decide."""
    from PIL import Image

    m = json.loads((bundle_dir / "manifest.json").read_text())
    h, w = m["input"]["preprocessing"]["size"]
    rng = np.random.default_rng(1)
    paths = []
    for name in ("a.png", "b.png"):
        paths.append(tmp_path / name)
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(paths[-1])
    first, second = [], []
    for _ in range(3):
        proc = cli("run", bundle_dir, *paths, "--json")
        assert proc.returncode == 0, proc.stderr
        a, b = (json.loads(line)["latency_ms"] for line in proc.stdout.strip().splitlines())
        first.append(a)
        second.append(b)
    assert np.median(first) <= 3 * np.median(second), (first, second)
