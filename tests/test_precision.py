"""Mixed precision (``convert(..., precision="auto")``) and the per-layer error report.

The network is the session's tiny model with one layer built to fail int8 (:func:`tinymodels.with_crushed_channel`:
two 1x1 convolutions in stage 1 that cancel out in float, with a tensor between them whose channel 0 is 400 times
larger than the others, so that one int8 scale crushes every other channel). Two real conversions of it: plain int8
(the check fails; the report must point at that layer) and auto (the check passes with that layer in float32 and
every other stage byte-identical to the int8 file).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx2tf")
pytestmark = [pytest.mark.workstation, pytest.mark.slow]  # two real conversions: about 60 s

from edgeexit import Runner  # noqa: E402
from edgeexit.errors import BundleError, ConversionError, UsageError  # noqa: E402
from edgeexit.runtime.manifest import MANIFEST_FILE, Manifest  # noqa: E402
from edgeexit.workstation.conversion.edgetpu import compile_for_edgetpu  # noqa: E402
from edgeexit.workstation.conversion.pipeline import convert, convert_unit, split_stages  # noqa: E402
from edgeexit.workstation.conversion.precision import UnitQuantizer, _interpreter, _range  # noqa: E402
from edgeexit.workstation.conversion.quantize import stage_inputs  # noqa: E402
from edgeexit.workstation.conversion.verify import float_outputs  # noqa: E402
from tinymodels import CALIBRATION_SAMPLES, synthetic_digits, with_crushed_channel  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def crushed(tiny_model):
    return with_crushed_channel(tiny_model, stage=1)


def _convert(model, out, tiny_data, precision):
    calib, _ = synthetic_digits(CALIBRATION_SAMPLES, seed=3)
    images, labels = tiny_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(model, calib, out, verify_images=images, verify_labels=labels, monolithic=True,
                       name="tiny-crushed", precision=precision)


@pytest.fixture(scope="module")
def int8_report(crushed, tiny_data, tmp_path_factory):
    return _convert(crushed, tmp_path_factory.mktemp("prec") / "int8", tiny_data, "int8")


@pytest.fixture(scope="module")
def auto_report(crushed, tiny_data, tmp_path_factory):
    return _convert(crushed, tmp_path_factory.mktemp("prec") / "auto", tiny_data, "auto")


def _assert_same_outputs(a, b, key=lambda d: d["name"]) -> None:
    """Two .tflite files (paths or interpreters) give bit-equal outputs on the same random int8 inputs."""
    its = [_interpreter(Path(x).read_bytes(), keep=False) if isinstance(x, (str, Path)) else x for x in (a, b)]
    rng = np.random.default_rng(0)
    for _ in range(4):
        x = rng.integers(-128, 128, size=its[0].get_input_details()[0]["shape"]).astype(np.int8)
        for it in its:
            it.set_tensor(it.get_input_details()[0]["index"], x)
            it.invoke()
        outs = [sorted(it.get_output_details(), key=key) for it in its]
        assert len(outs[0]) == len(outs[1])
        for da, db in zip(*outs):
            assert da["quantization"] == db["quantization"] and tuple(da["shape"]) == tuple(db["shape"])
            np.testing.assert_array_equal(its[0].get_tensor(da["index"]), its[1].get_tensor(db["index"]))


def test_float_network_is_unchanged_by_the_crushing_pair(tiny_model, crushed, tiny_data):
    """The test network is what it claims: the same float network (so any failure below is int8's)."""
    a, b = float_outputs(tiny_model, tiny_data[0]), float_outputs(crushed, tiny_data[0])
    for x, y in zip(a.logits, b.logits):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-3)


def test_int8_fails_the_check_and_the_report_points_at_the_crushed_layer(int8_report):
    v = int8_report.verification
    assert not v.passed and "max_logit_error" in v.failed_tolerances
    rec = int8_report.precision
    assert set(rec) == {"stage_0", "stage_1", "stage_2", "monolithic"}
    # the stages without the pair pass their share; stage 1 and the monolithic model (which contains it) do not
    assert rec["stage_0"].passed and rec["stage_2"].passed
    assert not rec["stage_1"].passed and rec["stage_1"].logit_error_int8 > 5 * rec["stage_1"].target
    top, *rest = rec["stage_1"].layers          # sorted by the error each layer adds
    assert top.op == "CONV_2D" and top.shape == (1, 14, 14, 16)
    assert top.error > 0.5 and top.added > 0.5     # a crushed tensor: its channels' error is of their own size
    assert all(x.added < 0.4 * top.added for x in rest)
    assert top.own is not None                      # the quantization debugger's figure beside ours
    # nothing is kept in float when only reporting, and the files are plain int8
    assert all(r.kind == "int8" and not r.float_layers for r in rec.values())
    assert "precision" not in json.loads((int8_report.out_dir / MANIFEST_FILE).read_text())
    assert "where the int8 error comes from" in int8_report.summary()


def test_auto_keeps_the_crushing_pair_in_float_and_passes(int8_report, auto_report):
    assert auto_report.verification.passed, auto_report.verification.failures
    rec = auto_report.precision
    assert rec["stage_0"].kind == "int8" and rec["stage_2"].kind == "int8"
    assert rec["stage_1"].kind == "mixed" and rec["stage_1"].passed
    # the layer the int8 report named, and its one consumer (the only way the tensor between them stays float)
    assert len(rec["stage_1"].float_layers) == 2
    assert rec["stage_1"].logit_error <= rec["stage_1"].target < rec["stage_1"].logit_error_int8
    # stages that pass in int8 are onnx2tf's int8 files (the same computation; tensor names inside a file carry a
    # per-process counter of the converter, so two conversions in one process differ in bytes)
    for unit in ("stage_0", "stage_2"):
        _assert_same_outputs(auto_report.out_dir / f"{unit}.tflite", int8_report.out_dir / f"{unit}.tflite")
    # the mixed stage keeps the int8 file's inputs and outputs: names, shapes, types, quantization (hand-offs)
    m8, ma = int8_report.manifest, auto_report.manifest
    assert ma.stages[1].input == m8.stages[1].input and dict(ma.stages[1].outputs) == dict(m8.stages[1].outputs)
    units = ma.precision["units"]
    assert ma.precision["mode"] == "auto" and units["stage_1"]["kind"] == "mixed"
    assert units["stage_1"]["float_layers"] == rec["stage_1"].float_layers
    # the float ops in the file are exactly the ones the manifest lists
    it = _interpreter((auto_report.out_dir / "stage_1.tflite").read_bytes(), keep=False)
    names = {int(d["index"]): d["name"] for d in it.get_tensor_details()}
    float_ops = [names[int(op["outputs"][0])] for op in it._get_ops_details()
                 if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE", "DELEGATE")
                 and "float32" in [np.dtype(t).name for t in op["operand_types"]]]
    assert sorted(float_ops) == sorted(units["stage_1"]["float_layers"])


def test_mixed_bundle_answers_like_the_float_network(crushed, int8_report, auto_report, tiny_data):
    """The Runner on the mixed bundle takes the float network's exits and answers; the int8 bundle does not."""
    images, _ = tiny_data
    flt = float_outputs(crushed, images)
    rule = auto_report.manifest.exit_rule
    conf = [1 / (1 + np.exp(-c)) for c in flt.confidence[:-1]]
    exits = np.full(len(images), len(flt.logits) - 1)
    for i in reversed(range(len(conf))):
        exits = np.where(conf[i] > rule.thresholds[i], i, exits)
    labels = np.stack([x.argmax(1) for x in flt.logits])[exits, np.arange(len(images))]

    def agreement(bundle):
        results = [Runner(bundle, power_sensor=None).classify(img) for img in images]
        same_exit = np.mean([r.exit_index == e for r, e in zip(results, exits)])
        same_label = np.mean([r.label == lab for r, lab in zip(results, labels)])
        return same_exit, same_label

    e_auto, l_auto = agreement(auto_report.out_dir)
    assert e_auto >= 0.98 and l_auto >= 0.98
    _, l_int8 = agreement(int8_report.out_dir)
    assert l_int8 < 0.9                            # what the remedy is for


def test_info_shows_the_precision_and_edgetpu_refuses_float_layers(auto_report):
    out = subprocess.run([sys.executable, "-m", "edgeexit", "info", str(auto_report.out_dir)], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("precision"))
    assert "stage_0 int8" in line and "stage_1 mixed (2 ops float32" in line and "stage_2 int8" in line
    with pytest.raises(ConversionError, match="float32.*Edge TPU runs int8 only"):
        compile_for_edgetpu(auto_report.out_dir)


def test_manifest_precision_section_is_validated(auto_report, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(auto_report.out_dir, bundle)
    path = bundle / MANIFEST_FILE
    d = json.loads(path.read_text())
    assert Manifest.from_json(json.dumps(d)).to_dict()["precision"] == d["precision"]   # round trip
    d["precision"]["units"]["stage_1"]["kind"] = "fp8"
    with pytest.raises(BundleError, match="precision.units.stage_1"):
        Manifest.from_json(json.dumps(d))
    d["precision"]["units"]["stage_1"] = {"kind": "mixed", "float_layers": [3]}
    with pytest.raises(BundleError, match="tensor names"):
        Manifest.from_json(json.dumps(d))


def test_precision_argument_is_checked(crushed, tmp_path):
    calib, _ = synthetic_digits(CALIBRATION_SAMPLES, seed=3)
    with pytest.raises(UsageError, match="precision must be one of int8, int16, auto, float32"):
        convert(crushed, calib, tmp_path / "x", precision="fp8")
    with pytest.raises(UsageError, match="contradict"):
        convert(crushed, calib, tmp_path / "x", precision="auto", activations="int16")
    assert not (tmp_path / "x").exists()


def test_quantizer_without_deny_list_is_onnx2tfs_int8_file(crushed, tmp_path):
    """The selective quantizer starts from onnx2tf's own calibration: with nothing denied, its file computes
    exactly what onnx2tf's int8 file computes (every output, bit for bit, on random int8 inputs)."""
    calib, _ = synthetic_digits(CALIBRATION_SAMPLES, seed=3)
    unit = split_stages(crushed)[1]
    inputs = stage_inputs(crushed, calib)[1]
    path = convert_unit(unit, inputs, tmp_path, tmp_path / "stage_1.tflite", keep_saved_model=True)
    ours = _interpreter(UnitQuantizer(tmp_path / "stage_1.tf", inputs).quantize(()), keep=False)
    # names differ before the rename: match the outputs by shape and quantization
    _assert_same_outputs(ours, path, key=lambda d: (tuple(d["shape"]), d["quantization"]))


def _int8_mse(v: np.ndarray, lo: float, hi: float) -> float:
    scale = (hi - lo) / 255.0
    return float(np.mean((np.clip(np.round((v - lo) / scale), 0, 255) * scale + lo - v) ** 2))


def test_percentile_and_mse_ranges_clip_rare_outliers():
    """Percentile ranges drop ten values 300 sigma out; on heavy-tailed (Laplace) values the MSE range clips the
    tails and its int8 error is well below min/max's, while min/max is one of its candidates (never worse)."""
    v = np.random.default_rng(0).normal(0, 1, 100_000).astype(np.float32)
    v[:10] = 300.0
    lo, hi = _range(v, "percentile")
    assert lo < -3 and 3 < hi < 10
    assert _int8_mse(v, *_range(v, "mse")) <= _int8_mse(v, float(v.min()), float(v.max())) * (1 + 1e-6)
    t = np.random.default_rng(1).laplace(0, 1, 100_000).astype(np.float32)
    lo2, hi2 = _range(t, "mse")
    assert float(t.min()) < lo2 < 0 < hi2 < float(t.max()) and hi2 - lo2 < 0.9 * float(t.max() - t.min())
    assert _int8_mse(t, lo2, hi2) < 0.9 * _int8_mse(t, float(t.min()), float(t.max()))


def test_calibration_range_keeps_handoffs_and_records_itself(crushed, int8_report, tiny_data, tmp_path):
    calib, _ = synthetic_digits(CALIBRATION_SAMPLES, seed=3)
    images, labels = tiny_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = convert(crushed, calib, tmp_path / "pct", verify_images=images, verify_labels=labels,
                      monolithic=False, name="tiny-crushed", calibration_range="percentile")
    m, m8 = rep.manifest, int8_report.manifest
    assert m.precision["ranges"] == "percentile" and m.precision["mode"] == "int8"
    assert all(u["kind"] == "int8" and not u["float_layers"] for u in m.precision["units"].values())
    # inputs and outputs keep the min/max ranges: the same quantization as plain int8, hand-offs pass-through
    for s, s8 in zip(m.stages, m8.stages):
        assert s.input == s8.input and dict(s.outputs) == dict(s8.outputs)
    assert all(h["equal"] for h in rep.handoffs)
    # the ranges inside moved: stage 1 computes differently from the min/max file
    assert rep.precision["stage_1"].logit_error_int8 != pytest.approx(int8_report.precision["stage_1"].logit_error_int8,
                                                                      rel=1e-3)
    with pytest.raises(UsageError, match="applies to int8 files"):
        convert(crushed, calib, tmp_path / "x", precision="int16", calibration_range="mse")
    with pytest.raises(UsageError, match="calibration_range must be one of minmax, percentile, mse"):
        convert(crushed, calib, tmp_path / "x", calibration_range="kl")
