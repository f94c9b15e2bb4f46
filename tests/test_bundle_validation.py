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

pytestmark = pytest.mark.runtime  # numpy, Pillow, click and a TFLite interpreter only (device/legacy runs)


@pytest.fixture
def copy(bundle_dir, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


def _edit(bundle: Path, change) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def _fails(bundle: Path, message: str, **fields) -> None:
    """load_bundle refuses ``bundle`` with exactly ``message`` (one line; ``{bundle}`` stands for its path)."""
    with pytest.raises(BundleError) as info:
        load_bundle(bundle)
    assert str(info.value) == message.format(bundle=bundle, **fields)


def _tensor(m: dict, stage: int, name: str) -> str:
    """How a message names a tensor of the (unedited) manifest ``m``: ``int8[1, 28, 28, 8]``."""
    t = m["stages"][stage]["input"] if name == "input" else m["stages"][stage]["outputs"][name]
    return f"{t['dtype']}{t['shape']}"


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
    _fails(copy, "stage_1.tflite: sha256 mismatch (file was modified or corrupted); re-copy the bundle")


def test_truncated_stage_file(copy):
    f = copy / "stage_0.tflite"
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[:100])
    _fails(copy, f"stage_0.tflite: 100 bytes, the manifest says {size} (truncated or replaced); re-copy the bundle")


def test_missing_stage_file(copy):
    (copy / "stage_1.tflite").unlink()
    _fails(copy, "stage_1.tflite: missing from the bundle {bundle}; re-copy the whole bundle directory")


def test_tampered_manifest_hash(copy):
    _edit(copy, lambda m: m["stages"][0].update(sha256="0" * 64))
    _fails(copy, "stage_0.tflite: sha256 mismatch (file was modified or corrupted); re-copy the bundle")


INCOMPLETE = "the manifest is incomplete or from another tool: re-create the bundle with `edgeexit convert`"
MISMATCH = "the file and manifest do not belong together: re-create the bundle"


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("stages"), f"manifest: missing field 'manifest.stages'; {INCOMPLETE}"),
    (lambda m: m["stages"][0].pop("costs"), f"manifest: missing field 'stages[0].costs'; {INCOMPLETE}"),
    (lambda m: m.update(format_version=99), "bundle format version 99 is newer than this edgeexit supports (1); "
                                            "upgrade edgeexit on this device (pip install -U edgeexit)"),
    (lambda m: m.update(format="something-else"), "manifest: not an edgeexit bundle manifest (field 'format' is "
                                                  "'something-else', expected 'edgeexit-bundle')"),
    (lambda m: m["stages"][0]["outputs"]["logits"].update(shape=[1, 3]),
     "stage_0.tflite: logits have 3 classes, the manifest has {labels} labels; re-create the bundle"),
    (lambda m: m["stages"][1]["input"].update(shape=[1, 2, 2, 2]),
     "stage_1.tflite: input is {stage1_input} but the manifest says int8[1, 2, 2, 2]; " + MISMATCH),
    (lambda m: m["exit_rule"].update(thresholds=[0.5] * 9),
     "manifest: exit_rule has 9 thresholds, expected {early} (one per exit except the last); re-tune or re-create "
     "the bundle"),
], ids=["no-stages", "no-costs", "newer-version", "format", "logits-shape", "handoff-shape", "thresholds"])
def test_bad_manifests(copy, change, message):
    m = json.loads((copy / "manifest.json").read_text())
    _edit(copy, change)
    _fails(copy, message, labels=len(m["labels"]), stage1_input=_tensor(m, 1, "input"), early=len(m["stages"]) - 1)


def test_edited_quantization_is_refused(copy):
    m = json.loads((copy / "manifest.json").read_text())
    q = Quantization(**m["stages"][0]["outputs"]["logits"]["quantization"])
    _edit(copy, lambda m: m["stages"][0]["outputs"]["logits"]["quantization"].update(zero_point=99))
    _fails(copy, f"stage_0.tflite: output 'logits' quantization is {q} but the manifest says "
                 f"{Quantization(q.scale, 99)} (the Runner dequantizes with the manifest's copy, which must be the "
                 "file's exactly); the manifest was edited: re-create the bundle")


def test_not_json(copy):
    (copy / "manifest.json").write_text("{ nope")
    _fails(copy, "manifest.json is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 3 "
                 "(char 2)); the bundle is corrupt: re-copy or re-create it")


def test_interpreter_tensor_shape_must_equal_manifest(copy):
    # keep the hand-off consistent so that only the interpreter check can catch it
    features = _tensor(json.loads((copy / "manifest.json").read_text()), -1, "features")

    def change(m):
        last = m["stages"][-1]
        last["outputs"]["features"]["shape"] = [1, 1, 1, 1]
    _edit(copy, change)
    _fails(copy, "stage_2.tflite: output 'features' is {features} but the manifest says int8[1, 1, 1, 1]; "
                 + MISMATCH, features=features)


@pytest.mark.parametrize("name", ["../stage_0.tflite", "/etc/passwd", "sub/../../x.tflite"])
def test_paths_leaving_the_bundle(copy, name):
    _edit(copy, lambda m: m["stages"][0].update(file=name))
    _fails(copy, f"manifest: 'stages[0].file' is {name!r}; expected a plain relative path inside the bundle "
                 "(printable, at most 255 bytes per part); the manifest was edited: re-create the bundle")


def test_symlink_leaving_the_bundle(copy, tmp_path):
    outside = tmp_path / "outside.tflite"
    shutil.copy(copy / "stage_0.tflite", outside)
    (copy / "stage_0.tflite").unlink()
    os.symlink(outside, copy / "stage_0.tflite")
    _fails(copy, f"stage_0.tflite: resolves to {outside}, outside the bundle directory {{bundle}} (symlink?); "
                 "copy the real file into the bundle")


def test_directory_instead_of_file(copy):
    (copy / "stage_0.tflite").unlink()
    (copy / "stage_0.tflite").mkdir()
    _fails(copy, "stage_0.tflite: is not a regular file (a directory, FIFO or device); re-copy the bundle")


def test_not_a_bundle(tmp_path):
    _fails(tmp_path, "{bundle}: no manifest.json; is this an edgeexit bundle directory?")
    _fails(tmp_path / "nowhere", "{bundle}: not a bundle directory (it does not exist or is a file); pass the "
                                 "directory that holds manifest.json")


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
