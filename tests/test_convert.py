"""Conversion of a StagedModel into a bundle: real ONNX export, onnx2tf int8 conversion and interpreters."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx2tf")
pytestmark = [pytest.mark.workstation, pytest.mark.slow]  # real conversions: about 70 s

import torch  # noqa: E402
from torch import nn  # noqa: E402

from edgeexit.runtime.atomic import staging_dir  # noqa: E402
from edgeexit.workstation.conversion import bundle_writer  # noqa: E402
from edgeexit.workstation.conversion import pipeline  # noqa: E402
from edgeexit.workstation.conversion.pipeline import convert, resolve_exit_rule  # noqa: E402
from edgeexit.workstation.models.staged import ModelSpec, Stage, StagedModel  # noqa: E402
from edgeexit.workstation.conversion.verify import Tolerances  # noqa: E402
from edgeexit.errors import ConversionError, UsageError  # noqa: E402
from edgeexit.runtime.manifest import MANIFEST_FILE, Manifest  # noqa: E402
from tinymodels import TinyHead, synthetic_digits, tiny_staged_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _read_manifest(bundle: Path) -> Manifest:
    return Manifest.from_json((bundle / MANIFEST_FILE).read_text())


def _one_stage_model(seed: int = 1) -> StagedModel:
    return tiny_staged_model(seed=seed, widths=(4,))


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeexit", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)


# ---- the session bundle --------------------------------------------------------------------------------

def test_manifest_round_trips_through_json(tiny_conversion):
    # the manifest written into the bundle is the one the conversion reported. Compared within one conversion:
    # two conversions of the same model (another process, or after other conversions in this one) gave stage
    # files a few bytes apart with identical tensors and quantization.
    on_disk = _read_manifest(tiny_conversion.out_dir)
    assert on_disk == tiny_conversion.manifest
    assert Manifest.from_json(on_disk.to_json()) == on_disk


def test_files_match_their_sha256_and_size(tiny_bundle):
    manifest = _read_manifest(tiny_bundle)
    entries = [(s.file, s.sha256, s.size_bytes) for s in manifest.stages]
    entries.append((manifest.monolithic.file, manifest.monolithic.sha256, manifest.monolithic.size_bytes))
    assert sorted(p.name for p in tiny_bundle.iterdir()) == sorted([MANIFEST_FILE] + [e[0] for e in entries])
    for file, sha, size in entries:
        data = (tiny_bundle / file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha
        assert len(data) == size


def test_manifest_describes_model_and_defaults(tiny_bundle, tiny_model):
    m = _read_manifest(tiny_bundle)
    assert m.name == "tiny-test"
    assert m.labels == tuple(tiny_model.spec.labels)
    assert m.preprocessing.size == (28, 28) and m.preprocessing.color_mode == "L"
    assert m.preprocessing.mean == tuple(tiny_model.spec.mean) and m.preprocessing.std == tuple(tiny_model.spec.std)
    assert m.exit_rule.kind == "confidence" and m.exit_rule.thresholds == (0.5, 0.5)
    assert m.input == m.stages[0].input and m.input.dtype == "int8" and m.input.shape == (1, 28, 28, 1)
    for s in m.stages:
        assert set(s.outputs) == {"features", "logits", "confidence"}
        assert s.outputs["logits"].shape == (1, 10) and s.outputs["logits"].dtype == "int8"
        assert s.outputs["confidence"].shape == (1, 1)
        assert s.scores == "softmax"
    assert m.monolithic.output.shape == (1, 10) and m.monolithic.input == m.input
    assert m.training["builder"] == "tiny-test"
    assert m.verification["samples"] == 200


def test_handoff_quantization_is_equal(tiny_bundle, tiny_conversion):
    m = _read_manifest(tiny_bundle)
    for prev, nxt in zip(m.stages[:-1], m.stages[1:]):
        fq, iq = prev.outputs["features"].quantization, nxt.input.quantization
        assert prev.outputs["features"].shape == nxt.input.shape
        assert fq.zero_point == iq.zero_point
        assert math.isclose(fq.scale, iq.scale, rel_tol=1e-6)
    assert [h["equal"] for h in tiny_conversion.handoffs] == [True, True]


def test_int8_agrees_with_float(tiny_conversion):
    v = tiny_conversion.verification
    for e in v.exits:
        assert e.top1_agreement >= 0.97, e
        # int8 logits: typically within 3% of the largest float logit, never off by more than 20%;
        # confidences within 0.05 in sigmoid space
        assert e.logits_mean_abs_error <= 0.03 * e.logits_max_abs, e
        assert e.logits_max_abs_error <= 0.2 * e.logits_max_abs, e
        assert e.confidence_max_abs_error <= 0.05, e
        assert abs(e.float_accuracy - e.int8_accuracy) <= 0.03, e
    for d in v.exits[:-1]:
        assert d.decision_agreement >= 0.95
    assert v.monolithic["top1_agreement"] >= 0.97
    assert abs(v.early_exit["float_accuracy"] - v.early_exit["int8_accuracy"]) <= 0.03


def test_bundle_loads_on_the_device_side(tiny_bundle):
    bundle_mod = pytest.importorskip("edgeexit.runtime.bundle")
    bundle = bundle_mod.load_bundle(tiny_bundle)
    assert bundle.manifest.num_exits == 3
    assert all(h is None for h in bundle.handoffs)  # raw int8 hand-offs, no requantization


def test_report_json_and_summary(tiny_conversion):
    d = json.loads(json.dumps(tiny_conversion.to_dict()))
    assert d["stages"] == 3 and d["full_macs"] == tiny_conversion.manifest.full_macs
    assert set(d["timings_s"]) >= {"convert stage_0", "convert monolithic", "verify int8 vs float", "write bundle"}
    text = tiny_conversion.summary()
    assert "stage_2.tflite" in text and "top1_agree" in text


# ---- atomic writing ----------------------------------------------------------------------------------

def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    real = pipeline.convert_unit
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[0].name)
        if len(calls) == 2:  # stage_0 was written into the staging directory; now the user presses Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "convert_unit", interrupted)
    calib, _ = synthetic_digits(16, seed=3)
    out = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        convert(_one_stage_model(), calib, out, monolithic=True)
    assert calls == ["stage_0", "monolithic"]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no <out>.tmp-XXXX left behind


def test_strict_verification_failure_writes_nothing(tmp_path):
    calib, _ = synthetic_digits(16, seed=3)
    images, labels = synthetic_digits(20, seed=7)
    out = tmp_path / "bundle"
    with pytest.raises(ConversionError, match="verification failed.*top-1 agreement"):
        convert(_one_stage_model(), calib, out, verify_images=images, verify_labels=labels, monolithic=False,
                strict=True, tolerances=Tolerances(min_top1_agreement=1.01))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_without_force_is_refused(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    calib, _ = synthetic_digits(16)
    with pytest.raises(UsageError, match="already exists.*--force"):
        convert(_one_stage_model(), calib, out)
    assert (out / "keep.txt").read_text() == "old"


def test_publish_with_force_replaces_the_old_bundle(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staging_dir(out) as staged:
        (staged / "new.txt").write_text("new")
        bundle_writer.publish(staged, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no .old-/.tmp- siblings


def test_cli_existing_output_fails_with_one_line_error(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    res = _run_cli("convert", str(tmp_path / "model.pt"), "--calib", "mnist", "--out", str(out))
    assert res.returncode == UsageError.exit_code
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "already exists" in lines[0]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("content", ["empty", "plain-torch-dict"])
def test_cli_rejects_a_file_that_is_not_a_checkpoint(tmp_path, content):
    bogus = tmp_path / "model.pt"
    if content == "empty":
        bogus.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(3)}, bogus)
    res = _run_cli("convert", str(bogus), "--calib", "mnist", "--out", str(tmp_path / "bundle"))
    assert res.returncode == 8, res.stderr[-500:]  # CheckpointError
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bogus) in lines[0]
    assert not (tmp_path / "bundle").exists()


# ---- bad inputs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("images, message", [
    (np.zeros((32, 32, 32, 3), np.uint8), r"shape \(32, 32, 32, 3\); expected \[N, 28, 28, 1\]"),
    (np.zeros((32, 28, 30), np.uint8), r"expected \[N, 28, 28, 1\]"),   # [N, H, W] grey is taken; not this size
    (np.zeros((32, 28, 28, 1), np.float32), "dtype float32; expected uint8"),
    (np.zeros((3, 28, 28, 1), np.uint8), "has 3 images; at least 8"),
], ids=["wrong-size-and-channels", "grey-wrong-size", "float-pixels", "too-few"])
def test_bad_calibration_data_is_refused(tmp_path, images, message):
    with pytest.raises(UsageError, match=message):
        convert(_one_stage_model(), images, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_verify_labels_must_match_images(tmp_path):
    calib, _ = synthetic_digits(16)
    with pytest.raises(UsageError, match="verify_labels"):
        convert(_one_stage_model(), calib, tmp_path / "b", verify_images=calib, verify_labels=np.zeros(3, np.int64))


def test_exit_rule_defaults_and_errors():
    model = tiny_staged_model()
    assert resolve_exit_rule(model, "confidence", None).thresholds == (0.5, 0.5)
    assert resolve_exit_rule(model, "final", None).thresholds == ()
    assert resolve_exit_rule(model, "max_softmax", [0.9, 0.8]).thresholds == (0.9, 0.8)
    with pytest.raises(UsageError, match="needs 2 thresholds"):
        resolve_exit_rule(model, "entropy", None)
    with pytest.raises(UsageError, match="got 1 thresholds"):
        resolve_exit_rule(model, "confidence", [0.5])
    with pytest.raises(UsageError, match="confidence output"):
        resolve_exit_rule(tiny_staged_model(confidence=False), "confidence", None)


class _FFTSegment(nn.Module):
    """A layer ONNX cannot express: a real FFT magnitude."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x, dim=-1).abs()[..., :4]


def test_unconvertible_layer_is_named(tmp_path):
    spec = ModelSpec(builder="fft-test", kwargs={}, input_shape=(1, 8, 8), labels=["a", "b"], mean=[0.5],
                     std=[0.5])
    model = StagedModel([Stage(_FFTSegment(), TinyHead(1, 2))], spec).eval()
    calib = np.random.default_rng(0).integers(0, 255, size=(8, 8, 8, 1), dtype=np.uint8)
    with pytest.raises(ConversionError, match=r"stage_0: operator aten::fft_rfft cannot be exported to ONNX"):
        convert(model, calib, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


class _SineSegment(nn.Module):
    """Exports to ONNX and converts, but TFLite has no int8 SIN: it would stay a float island."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.conv(x))


def test_layer_without_int8_kernel_is_named(tmp_path):
    spec = ModelSpec(builder="sine-test", kwargs={}, input_shape=(1, 8, 8), labels=["a", "b"], mean=[0.5],
                     std=[0.5])
    model = StagedModel([Stage(_SineSegment(), TinyHead(4, 2))], spec).eval()
    calib = np.random.default_rng(0).integers(0, 255, size=(8, 8, 8, 1), dtype=np.uint8)
    with pytest.raises(ConversionError, match=r"stage_0: op SIN .* has no int8 kernel"):
        convert(model, calib, tmp_path / "bundle", monolithic=False)
    assert list(tmp_path.iterdir()) == []


def test_convert_rejects_a_plain_module(tmp_path):
    with pytest.raises(UsageError, match="needs an edgeexit.workstation.models.staged.StagedModel, got Sequential"):
        convert(nn.Sequential(nn.Conv2d(1, 4, 3)), np.zeros((8, 28, 28, 1), np.uint8), tmp_path / "b")


def test_onnx_simplifier_in_process_writes_the_files_onnx2tf_writes_with_its_own(tiny_model, tmp_path):
    """The converter runs onnx-simplifier in its own process (onnx2tf would start it three times as a new process
    per stage: 2.3-2.5x faster conversions, benchmarks/results/convert_before_after.json). The int8 and 16x8 files
    must be the ones onnx2tf writes when it simplifies by itself: the same tensors, quantization parameters, weights
    and activations (only the numeric suffixes of TensorFlow's per-process name counters may differ)."""
    import onnx2tf

    from edgeexit.workstation.conversion.export import INPUT_NAME, export_onnx, quiet_tool, split_stages
    from edgeexit.workstation.conversion.quantize import _PRODUCED, onnx_to_int8_tflite, stage_inputs

    unit = split_stages(tiny_model)[1]                         # a later stage: NHWC input kept, three outputs
    images, _ = synthetic_digits(64, seed=5)
    calibration = stage_inputs(tiny_model, images)[1]
    ours = {a: onnx_to_int8_tflite("stage_1", export_onnx(unit, tmp_path / f"{a}.onnx"), calibration,
                                   tmp_path / f"ours-{a}.tflite", keep_nhwc_input=True, activations=a).read_bytes()
            for a in ("int8", "int16")}
    reference = export_onnx(unit, tmp_path / "reference.onnx")
    np.save(tmp_path / "calib.npy", calibration)
    c = calibration.shape[-1]
    with quiet_tool() as log:                                  # puts the environment's onnxsim on PATH for onnx2tf
        onnx2tf.convert(input_onnx_file_path=str(reference), output_folder_path=str(tmp_path / "tf"),
                        output_integer_quantized_tflite=True, tflite_backend="tf_converter",
                        custom_input_op_name_np_data_path=[[INPUT_NAME, str(tmp_path / "calib.npy"),
                                                            np.zeros((1, 1, 1, c), np.float32),
                                                            np.ones((1, 1, 1, c), np.float32)]],
                        input_quant_dtype="int8", output_quant_dtype="int8",
                        copy_onnx_input_output_names_to_tflite=True, keep_shape_absolutely_input_names=[INPUT_NAME],
                        non_verbose=False, verbosity="info")
    assert "Failed to optimize the onnx file" not in log.getvalue()   # onnx2tf's own simplification did run
    for a, data in ours.items():
        theirs = next((tmp_path / "tf").glob(_PRODUCED[a]))
        (tmp_path / f"ours-{a}.tflite").write_bytes(data)
        mine, ref = _tensors(tmp_path / f"ours-{a}.tflite"), _tensors(theirs)
        assert len(mine) == len(ref) > 8, a
        assert mine == ref, a


def _tensors(path):
    """Every named tensor of a .tflite file after one invoke on a seeded input: name (without the numeric suffixes
    TensorFlow's per-process name counters add), dtype, shape, quantization parameters and contents."""
    import re

    from edgeexit.runtime.interpreter import create_interpreter, resolve_backend

    it = create_interpreter(path, resolve_backend("auto"))
    d = it.get_input_details()[0]
    it.set_tensor(d["index"], np.random.default_rng(1).integers(-100, 100, d["shape"]).astype(d["dtype"]))
    it.invoke()
    out = []
    for t in it.get_tensor_details():
        if not t["name"]:
            continue  # the kernels' scratch buffers
        try:
            value = it.get_tensor(t["index"]).tobytes()
        except ValueError:  # a tensor the memory plan gave no buffer
            value = None
        q = t["quantization_parameters"]
        out.append((re.sub(r"_\d+", "", t["name"]), str(t["dtype"]), t["shape"].tolist(), q["scales"].tolist(),
                    q["zero_points"].tolist(), value))
    return out
