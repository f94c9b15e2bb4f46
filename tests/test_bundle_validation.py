"""load_bundle refuses every broken bundle with a one-line BundleError, and writes manifests atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeexit import BundleError, Manifest, load_bundle, write_manifest_atomic
from edgeexit.runtime.bundle import Requantization, plan_handoffs
from edgeexit.runtime.manifest import Quantization


@pytest.fixture
def copy(bundle_dir, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


def _edit(bundle: Path, change) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def _fails(bundle: Path, match: str) -> None:
    with pytest.raises(BundleError, match=match) as info:
        load_bundle(bundle)
    assert "\n" not in str(info.value)


def test_a_good_bundle_loads(bundle_dir):
    b = load_bundle(bundle_dir)
    assert b.num_exits == len(b.stage_files) >= 2
    assert len(b.handoffs) == b.num_exits - 1
    assert all(p.is_file() for p in b.stage_files)


def test_corrupt_stage_file(copy):
    f = copy / "stage_1.tflite"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    _fails(copy, r"stage_1.tflite: sha256 mismatch \(file was modified or corrupted\); re-copy the bundle")


def test_truncated_stage_file(copy):
    f = copy / "stage_0.tflite"
    f.write_bytes(f.read_bytes()[:100])
    _fails(copy, "truncated")


def test_missing_stage_file(copy):
    (copy / "stage_1.tflite").unlink()
    _fails(copy, "missing")


def test_tampered_manifest_hash(copy):
    _edit(copy, lambda m: m["stages"][0].update(sha256="0" * 64))
    _fails(copy, "sha256 mismatch")


@pytest.mark.parametrize("change, match", [
    (lambda m: m.pop("stages"), "missing field 'manifest.stages'"),
    (lambda m: m["stages"][0].pop("costs"), "missing field"),
    (lambda m: m.update(format_version=99), "newer than this edgeexit supports"),
    (lambda m: m.update(format="something-else"), "not an edgeexit bundle"),
    (lambda m: m["stages"][0]["outputs"]["logits"].update(shape=[1, 3]), "classes|logits"),
    (lambda m: m["stages"][1]["input"].update(shape=[1, 2, 2, 2]), "hand-off|input"),
    (lambda m: m["stages"][0]["outputs"]["logits"]["quantization"].update(zero_point=99), "quantization"),
    (lambda m: m["exit_rule"].update(thresholds=[0.5] * 9), "thresholds"),
], ids=["no-stages", "no-costs", "newer-version", "format", "logits-shape", "handoff-shape", "quant", "thresholds"])
def test_bad_manifests(copy, change, match):
    _edit(copy, change)
    _fails(copy, match)


def test_not_json(copy):
    (copy / "manifest.json").write_text("{ nope")
    _fails(copy, "not valid JSON")


def test_interpreter_tensor_shape_must_equal_manifest(copy):
    # keep the hand-off consistent so that only the interpreter check can catch it
    def change(m):
        last = m["stages"][-1]
        last["outputs"]["features"]["shape"] = [1, 1, 1, 1]
    _edit(copy, change)
    _fails(copy, "the manifest says")


@pytest.mark.parametrize("name", ["../stage_0.tflite", "/etc/passwd", "sub/../../x.tflite"])
def test_paths_leaving_the_bundle(copy, name):
    _edit(copy, lambda m: m["stages"][0].update(file=name))
    _fails(copy, "relative path inside the bundle")


def test_symlink_leaving_the_bundle(copy, tmp_path):
    outside = tmp_path / "outside.tflite"
    shutil.copy(copy / "stage_0.tflite", outside)
    (copy / "stage_0.tflite").unlink()
    os.symlink(outside, copy / "stage_0.tflite")
    _fails(copy, "outside the bundle")


def test_directory_instead_of_file(copy):
    (copy / "stage_0.tflite").unlink()
    (copy / "stage_0.tflite").mkdir()
    _fails(copy, "not a regular file")


def test_not_a_bundle(tmp_path):
    _fails(tmp_path, "no manifest.json")
    _fails(tmp_path / "nowhere", "not a bundle directory")


def test_handoff_with_other_quantization_is_requantized(bundle_dir):
    m = load_bundle(bundle_dir).manifest
    s1 = m.stages[1]
    q = s1.input.quantization
    other = Quantization(q.scale * 2, q.zero_point)
    changed = m.replace(stages=(m.stages[0], s1.__class__(**{**s1.__dict__, "input": s1.input.__class__(
        **{**s1.input.__dict__, "quantization": other})}), *m.stages[2:]))
    plan = plan_handoffs(changed)
    assert isinstance(plan[0], Requantization) and plan[0].dst == other
    # q' = round(s/s' (q - z)) + z': halving the resolution halves the distance to the zero point
    src = np.array([[-128, -100, 0, 27, 127]], np.int8)
    out = np.zeros_like(src)
    Requantization(q, other).apply(src, out)
    real_in = q.scale * (src.astype(np.float64) - q.zero_point)
    real_out = other.scale * (out.astype(np.float64) - other.zero_point)
    assert np.abs(real_in - real_out).max() <= other.scale / 2 + 1e-12


def test_write_manifest_atomic(copy):
    b = load_bundle(copy)
    new = b.manifest.replace(name="renamed")
    path = write_manifest_atomic(copy, new)
    assert Manifest.from_json(path.read_text()).name == "renamed"
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith(".manifest")) == []
    assert load_bundle(copy).manifest.name == "renamed"
    with pytest.raises(BundleError):
        write_manifest_atomic(copy / "nope", new)
