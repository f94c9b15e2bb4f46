"""Where int8 falls short: the per-layer error report and mixed precision (``precision="auto"``).

A full-integer stage computes every layer in int8. When one layer's activations do not fit one int8 scale (a
channel whose range dwarfs the others', a heavy tail), its error is carried into every later layer and exit. This
module finds such layers and keeps them in float32, with the rest of the stage int8, the file's inputs and outputs
int8 as before (so hand-offs and exit decisions run unchanged on the device).

* **Quantizing** uses TensorFlow Lite's own tools on the saved model onnx2tf built for the stage: the quantization
  debugger (``tf.lite.experimental.QuantizationDebugger``) calibrates it on the stage's calibration inputs, with the
  converter settings onnx2tf uses, and gives each op's own quantization error (its ``layer_statistics``:
  RMSE / scale, about 0.29 for plain rounding). The converter's quantizer (``mlir_quantize``, the debugger's
  selective quantization) then writes the int8 file with the ops named in a deny-list left in float32 between a
  DEQUANTIZE and a QUANTIZE. Without a deny-list that file equals onnx2tf's int8 file bit for bit (tested).
* **The per-layer error** (:func:`layer_errors`) is measured on the whole stage, each tensor of the int8 file against
  the same tensor of the float model over the same inputs: the noise-to-signal ratio per channel,
  ``RMS(int8 - float) / std(float)``, averaged over the channels that carry signal, and how much of it the layer
  added to the worst of its inputs'. The debugger's own per-op error is kept beside it. A crushed channel reads
  about 1.0; plain int8 rounding a few hundredths.
* **auto** (:func:`choose_precision`): while the stage's exit logits miss half the conversion check's logit
  tolerance (the other half is left to the stages before it), the tensor that added the most error (and every
  tensor that added at least half as much) is kept in float: its producer and every consumer run in float32 (the
  only way a tensor stays float), and the stage is quantized again. A stage whose layers cannot be fixed that way (or faster) runs whole in float32 with int8 inputs
  and outputs, whichever candidate that passes runs faster on this CPU. The choice is made on the calibration
  images; the conversion check then judges the bundle on its held-out verification images like any other.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeexit.errors import ConversionError

log = logging.getLogger(__name__)

#: The precisions ``convert`` takes: every file int8, every file 16x8, int8 with float32 where int8 fails, or every
#: layer float32 between int8 inputs and outputs (the float reference, measured on the device like the others).
PRECISIONS = ("int8", "int16", "auto", "float32")
#: How the calibration turns each tensor's observed values into its int8 range: the converter's min/max, the
#: 0.01-99.99 percentiles, or the clipping of the min/max range that minimises the int8 round-trip error (MSE).
RANGES = ("minmax", "percentile", "mse")
#: Calibration inputs (the first ones) whose activations set the percentile and MSE ranges.
RANGE_SAMPLES = 64
_PERCENTILE = 0.01
#: Rings of tensors around a unit's inputs and outputs that may keep min/max so that their scales do not move.
RANGE_RINGS = 4
#: Inputs the auto search measures errors on (the first of the calibration set).
SEARCH_SAMPLES = 64
#: Rounds of "keep the worst tensor in float" before the whole stage is tried in float32.
MAX_ROUNDS = 8
#: A round keeps in float32 every tensor that adds at least this share of the worst tensor's added error.
PICK_SHARE = 0.5
#: Share of the conversion check's logit tolerance one unit may spend (the rest is for the units before it).
UNIT_SHARE = 0.5
#: Channels whose float std is below this share of the tensor's largest channel std carry no signal.
_DEAD = 1e-3


@dataclass
class LayerError:
    """One tensor of a unit: its op, shape and int8 error against float over the search inputs."""

    tensor: str
    op: str
    shape: tuple[int, ...]
    error: float           # mean per-channel RMS(int8 - float) / std(float)
    added: float           # error less the largest error of the op's inputs
    own: float | None = None  # the debugger's RMSE / scale of the op alone (None where it has none)
    precision: str = "int8"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class UnitPrecision:
    """What ``auto`` chose for one unit (a stage or the monolithic model), and why."""

    unit: str
    kind: str                        # "int8", "mixed" (some layers float32) or "float32" (every layer)
    float_layers: list[str]          # output tensor names of the ops kept in float32
    logit_error_int8: float          # relative RMS logit error of the plain int8 file (search inputs)
    logit_error: float               # of the chosen file
    target: float                    # the unit's share of the logit tolerance
    passed: bool
    invoke_ms: dict[str, float] = field(default_factory=dict)  # candidate -> median invoke time, where timed
    layers: list[LayerError] = field(default_factory=list)      # worst tensors of the plain int8 file
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [x.to_dict() for x in self.layers]
        return d

    def manifest_entry(self) -> dict[str, Any]:
        """What the manifest records for the unit (``precision.units.<unit>``)."""
        return {"kind": self.kind, "float_layers": list(self.float_layers)}


def _interpreter(model: bytes, keep: bool = True) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - the workstation installs ai-edge-litert
        import tensorflow as tf
        Interpreter = tf.lite.Interpreter
    it = Interpreter(model_content=model, experimental_preserve_all_tensors=keep, num_threads=1)
    it.allocate_tensors()
    return it


def _quantize_input(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero = detail["quantization"]
    dtype = np.dtype(detail["dtype"])
    if not scale:
        return x.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)


def _tensors(model: bytes, inputs: np.ndarray) -> tuple[dict[str, list[np.ndarray]], list[dict[str, Any]], Any]:
    """Run ``model`` over ``inputs`` [N, ...] keeping every tensor: name -> dequantized values per input."""
    it = _interpreter(model)
    inp = it.get_input_details()[0]
    details = [d for d in it.get_tensor_details() if d["name"]]
    values: dict[str, list[np.ndarray]] = {d["name"]: [] for d in details}
    for x in inputs:
        it.set_tensor(inp["index"], _quantize_input(x[None], inp))
        it.invoke()
        for d in details:
            try:
                v = it.get_tensor(d["index"])
            except ValueError:   # a tensor the interpreter did not keep (weights of delegated ops)
                continue
            scale, zero = d["quantization"]
            v = (v.astype(np.float32) - zero) * scale if scale and v.dtype != np.float32 else v.astype(np.float32)
            values[d["name"]].append(v)
    return values, details, it


def _ops(it: Any) -> list[dict[str, Any]]:
    names = {int(d["index"]): d["name"] for d in it.get_tensor_details()}
    ops = []
    for op in it._get_ops_details():
        if op["op_name"] in ("DELEGATE",):
            continue
        ops.append({"op": op["op_name"], "inputs": [names.get(int(i), "") for i in op["inputs"] if int(i) >= 0],
                    "outputs": [names.get(int(i), "") for i in op["outputs"]]})
    return ops


def _nsr(q: np.ndarray, f: np.ndarray) -> float:
    """Mean per-channel RMS(q - f) / std(f) over the channels (last axis) that carry signal."""
    q2 = q.reshape(-1, q.shape[-1]) if q.ndim > 1 else q.reshape(-1, 1)
    f2 = f.reshape(-1, f.shape[-1]) if f.ndim > 1 else f.reshape(-1, 1)
    std = f2.std(axis=0)
    live = std > _DEAD * max(float(std.max()), 1e-12)
    if not live.any():
        return 0.0
    err = np.sqrt(((q2 - f2) ** 2).mean(axis=0))
    return float((err[live] / std[live]).mean())


def layer_errors(candidate: bytes, float_model: bytes, inputs: np.ndarray,
                 own: dict[str, float] | None = None) -> list[LayerError]:
    """Every op output of ``candidate`` against the float model's tensor of the same name, in graph order."""
    got, _, it = _tensors(candidate, inputs)
    ref, _, _ = _tensors(float_model, inputs)
    errors: dict[str, float] = {}
    result = []
    for op in _ops(it):
        if op["op"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        for name in op["outputs"]:
            a, b = got.get(name), ref.get(name)
            if not a or not b or a[0].shape != b[0].shape:
                continue
            e = _nsr(np.stack(a), np.stack(b))
            errors[name] = e
            before = max((errors.get(i, 0.0) for i in op["inputs"]), default=0.0)
            result.append(LayerError(tensor=name, op=op["op"], shape=tuple(int(s) for s in a[0].shape), error=e,
                                     added=e - before, own=None if own is None else own.get(name)))
    return result


def relative_logit_error(q: np.ndarray, f: np.ndarray) -> float:
    """RMS(q - f) / (max f - min f): the conversion check's logit error."""
    span = float(f.max() - f.min()) or 1.0
    return float(np.sqrt(((q - f) ** 2).mean())) / span


class UnitQuantizer:
    """One unit's saved model, calibrated once; int8 files with any deny-list from the calibration.

    Args:
        saved_model: the directory onnx2tf wrote the unit's TensorFlow saved model to.
        calibration: the unit's float32 calibration inputs [N, H, W, C] (what onnx2tf calibrated on).
        ranges: "minmax" (the converter's, as onnx2tf), "percentile" or "mse" (:data:`RANGES`) for the tensors
            inside the unit; its inputs and outputs keep the min/max ranges, so hand-offs stay pass-through.
    """

    def __init__(self, saved_model: Path, calibration: np.ndarray, ranges: str = "minmax"):
        import tensorflow as tf

        def dataset():
            for i in range(len(calibration)):
                yield [calibration[i:i + 1]]

        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
        # onnx2tf's full-integer settings (onnx2tf.convert, tf_converter backend)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.SELECT_TF_OPS]
        converter.representative_dataset = dataset
        self.debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=dataset)
        self._per_channel_off = bool(converter._experimental_disable_per_channel)
        self._tf = tf
        self.float_model = self._float(saved_model)
        self.calibrated = self.debugger.calibrated_model
        if ranges != "minmax":
            self.calibrated = self._ranged(calibration[:RANGE_SAMPLES], ranges)

    def _ranged(self, inputs: np.ndarray, method: str) -> bytes:
        """The calibrated model with ``method``'s ranges inside, the inputs' and outputs' quantization unchanged.
        An op that gives its output its input's scale (pooling, reshape, concatenation) carries an inner range to an
        output; the tensors next to the inputs and outputs then keep their min/max too, a ring at a time."""
        plain, base = self.debugger.calibrated_model, self.calibrated
        want = _io_quantization(self._quantize(plain, ()))
        from tensorflow.lite.python import schema_py_generated as schema

        graph = schema.Model.GetRootAsModel(plain, 0).Subgraphs(0)
        keep = set(graph.InputsAsNumpy().tolist()) | set(graph.OutputsAsNumpy().tolist())
        for _ in range(RANGE_RINGS):
            model = _with_ranges(base, self.float_model, inputs, method, keep)
            if _io_quantization(self._quantize(model, ())) == want:
                return model
            keep = _neighbours(plain, keep)
        raise ConversionError(f"{method} calibration ranges move this unit's input or output scale (its hand-offs); "
                              "convert with --calib-range minmax")

    def _float(self, saved_model: Path) -> bytes:
        converter = self._tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
        converter.target_spec.supported_ops = [self._tf.lite.OpsSet.TFLITE_BUILTINS,
                                               self._tf.lite.OpsSet.SELECT_TF_OPS]
        return converter.convert()

    def own_errors(self) -> dict[str, float]:
        """The debugger's per-op error, RMSE / scale, by output tensor name (about 0.29 for plain rounding)."""
        import csv
        import io

        self.debugger.run()
        text = io.StringIO()
        self.debugger.layer_statistics_dump(text)
        out = {}
        for row in csv.DictReader(io.StringIO(text.getvalue())):
            try:
                mse, scale = float(row["mean_squared_error"]), float(row["scale"])
            except (KeyError, ValueError):
                continue
            if scale > 0 and np.isfinite(mse):
                out[row["tensor_name"]] = float(np.sqrt(mse)) / scale
        return out

    def _quantize(self, calibrated: bytes, deny: Sequence[str]) -> bytes:
        from tensorflow.lite.python import convert as tfl_convert

        return tfl_convert.mlir_quantize(calibrated, disable_per_channel=self._per_channel_off, fully_quantize=True,
                                         input_data_type=self._tf.int8, output_data_type=self._tf.int8,
                                         denylisted_nodes=list(deny) or None)

    def quantize(self, deny: Sequence[str]) -> bytes:
        """The unit as a full-integer file (int8 inputs and outputs) with the ops writing ``deny`` in float32.

        The quantizer leaves an output in float32 when the op writing it is denied and other ops read it too (a
        hand-off that the stage's own head also reads); such an op is taken off the list again, so that every
        input and output stays int8 (the device's hand-offs and exit decisions need them so)."""
        deny = list(deny)
        while True:
            model = self._quantize(self.calibrated, deny)
            it = _interpreter(model, keep=False)
            floats = {d["name"] for d in it.get_output_details() if np.dtype(d["dtype"]) != np.int8}
            if not floats or not floats & set(deny):
                return model
            deny = [n for n in deny if n not in floats]


def _range(values: np.ndarray, method: str) -> tuple[float, float]:
    """The int8 range of one tensor's observed float values by ``method`` ("percentile" or "mse")."""
    v = values.ravel()
    if v.size > 50_000:
        v = v[np.random.default_rng(0).choice(v.size, 50_000, replace=False)]
    lo0, hi0 = float(min(v.min(), 0.0)), float(max(v.max(), 0.0))
    if method == "percentile":
        return (float(min(np.percentile(v, _PERCENTILE), 0.0)), float(max(np.percentile(v, 100 - _PERCENTILE), 0.0)))

    def err(lo: float, hi: float) -> float:
        scale = (hi - lo) / 255.0 or 1.0
        return float(np.mean((np.clip(np.round((v - lo) / scale), 0, 255) * scale + lo - v) ** 2))

    # each end clipped on its own (a log grid down to 1 % of it), one end after the other, twice
    grid = np.geomspace(0.01, 1.0, 40)
    lo, hi = lo0, hi0
    for _ in range(2):
        if hi0 > 0:
            hi = min((hi0 * f for f in grid), key=lambda h: err(lo, h))
        if lo0 < 0:
            lo = min((lo0 * f for f in grid), key=lambda x: err(x, hi))
    return float(lo), float(hi)


def _with_ranges(calibrated: bytes, float_model: bytes, inputs: np.ndarray, method: str,
                 keep: set[int] | None = None) -> bytes:
    """``calibrated`` with the min/max of the tensors inside the unit replaced by ``method``'s range of the float
    model's values over ``inputs``; the unit's inputs and outputs, and the tensors in ``keep`` (indices), keep
    theirs (the hand-offs' scales must not move)."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    values, _, it = _tensors(float_model, inputs)
    io = {d["name"] for d in it.get_input_details() + it.get_output_details()}
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(calibrated, 0))
    graph = model.subgraphs[0]
    fixed = set(graph.inputs.tolist()) | set(graph.outputs.tolist()) | (keep or set())
    for k, t in enumerate(graph.tensors):
        name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        q = t.quantization
        if k in fixed or name in io or q is None or q.min is None or not values.get(name):
            continue
        lo, hi = _range(np.stack(values[name]), method)
        q.min, q.max = np.array([lo], np.float32), np.array([hi], np.float32)
    builder = flatbuffers.Builder(len(calibrated) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _neighbours(calibrated: bytes, tensors: set[int]) -> set[int]:
    """``tensors`` and every tensor one op away from them (an op's inputs and outputs, constants aside)."""
    from tensorflow.lite.python import schema_py_generated as schema

    graph = schema.Model.GetRootAsModel(calibrated, 0).Subgraphs(0)
    out = set(tensors)
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        ins, outs = set(op.InputsAsNumpy().tolist()), set(op.OutputsAsNumpy().tolist())
        if (ins | outs) & tensors:
            out |= {t for t in ins | outs if t >= 0}
    return out


def _io_quantization(model: bytes) -> list[tuple[Any, ...]]:
    it = _interpreter(model, keep=False)
    return [(d["name"], float(np.float32(d["quantization"][0])), int(d["quantization"][1]))
            for d in it.get_input_details() + it.get_output_details()]


def _invoke_ms(model: bytes, repeats: int = 60) -> float:
    it = _interpreter(model, keep=False)
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
    for _ in range(5):
        it.invoke()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        it.invoke()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _logits(model: bytes, inputs: np.ndarray, index: int) -> np.ndarray:
    it = _interpreter(model, keep=False)
    inp, out = it.get_input_details()[0], it.get_output_details()[index]
    rows = []
    for x in inputs:
        it.set_tensor(inp["index"], _quantize_input(x[None], inp))
        it.invoke()
        v = it.get_tensor(out["index"])
        scale, zero = out["quantization"]
        rows.append((v.astype(np.float32) - zero) * scale if scale else v.astype(np.float32))
    return np.concatenate(rows)


def choose_precision(unit: str, quantizer: UnitQuantizer, inputs: np.ndarray, logits_output: int,
                     max_logit_error: float, force: str | None = None) -> tuple[bytes, UnitPrecision]:
    """The fastest file of the unit whose logits pass ``UNIT_SHARE * max_logit_error`` on ``inputs``.

    Args:
        unit: "stage_1" or "monolithic" (for messages and the record).
        quantizer: the unit's calibrated model.
        inputs: float32 inputs of the unit (the search samples of the calibration set).
        logits_output: the index of the ``logits`` output among the file's outputs.
        max_logit_error: the conversion check's logit tolerance.
        force: "float32": every layer in float32, whatever the errors (``precision="float32"``); "int8": the
            plain int8 file, no search (a calibration range other than min/max without ``auto``).

    Returns:
        (the file's bytes, unnamed inputs/outputs as the converter writes them; the record of the choice).
    """
    t0 = time.perf_counter()
    target = UNIT_SHARE * max_logit_error
    ref = _logits(quantizer.float_model, inputs, logits_output)

    def error(model: bytes) -> float:
        return relative_logit_error(_logits(model, inputs, logits_output), ref)

    plain = quantizer.quantize(())
    e8 = error(plain)
    if force == "int8":
        return plain, UnitPrecision(unit, "int8", [], e8, e8, target, e8 <= target, seconds=time.perf_counter() - t0)
    worst = _worst_layers(quantizer, plain, inputs)
    if e8 <= target and force is None:
        return plain, UnitPrecision(unit, "int8", [], e8, e8, target, True, layers=worst,
                                    seconds=time.perf_counter() - t0)
    it = _interpreter(plain, keep=False)
    ops = _ops(it)
    producer = {o: op for op in ops for o in op["outputs"]}
    consumers: dict[str, list[dict[str, Any]]] = {}
    for op in ops:
        for i in op["inputs"]:
            consumers.setdefault(i, []).append(op)
    io = {d["name"] for d in it.get_input_details()}
    deny: list[str] = []
    candidate, e = plain, e8
    passing: dict[str, tuple[bytes, float, list[str]]] = {}
    for _ in range(MAX_ROUNDS if force is None else 0):
        layers = layer_errors(candidate, quantizer.float_model, inputs)
        fresh = [x for x in layers if x.tensor not in deny and x.op not in ("QUANTIZE", "DEQUANTIZE")]
        if not fresh:
            break
        pick = max(fresh, key=lambda x: x.added)
        # this round: every tensor adding at least half as much as the worst (many alike layers, e.g. a dense
        # block's concatenations, go in one round instead of one a round)
        picks = [x for x in fresh if x.added >= PICK_SHARE * pick.added] if pick.added > 0 else [pick]
        new = []
        for x in picks:
            for op in [producer.get(x.tensor)] + consumers.get(x.tensor, []):
                if op is not None and op["outputs"] and op["outputs"][0] not in io:
                    name = op["outputs"][0]
                    if name not in deny and name not in new:
                        new.append(name)
        if not new:
            break
        deny += new
        candidate = quantizer.quantize(deny)
        e = error(candidate)
        log.info("%s: %d op(s) in float32 (%s...): logit error %.4f (target %.4f)", unit, len(deny), pick.tensor,
                 e, target)
        if e <= target:
            passing["mixed"] = (candidate, e, list(deny))
            break
    every = [op["outputs"][0] for op in ops if op["outputs"] and op["op"] not in ("QUANTIZE", "DEQUANTIZE")]
    whole = quantizer.quantize(every)
    ew = error(whole)
    if ew <= target or force == "float32":
        passing["float32"] = (whole, ew, every)
    timed = {k: _invoke_ms(v[0]) for k, v in passing.items()}
    timed["int8"] = _invoke_ms(plain)
    if passing:
        kind = min(passing, key=lambda k: timed[k])
        model, err, layers_f = passing[kind]
        return model, UnitPrecision(unit, kind, layers_f, e8, err, target, True, timed, worst,
                                    time.perf_counter() - t0)
    # nothing passes: keep the candidate with the smallest error, and let the conversion check say so
    best = min([("mixed", candidate, e, list(deny)), ("float32", whole, ew, every)], key=lambda c: c[2])
    timed[best[0]] = _invoke_ms(best[1])
    return best[1], UnitPrecision(unit, best[0], best[3], e8, best[2], target, False, timed, worst,
                                  time.perf_counter() - t0)


def name_like(model: bytes, reference: Path, folder: Path, onnx_path: Path) -> bytes:
    """``model`` with the input/output names of ``reference`` (onnx2tf's int8 file of the same unit), renamed
    by onnx2tf's own routine; ConversionError unless names, shapes, types and quantization then match."""
    import onnx
    from onnx2tf.utils.common_functions import rewrite_tflite_inout_opname

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def dims(v: Any) -> list[int | str]:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]

    name = "edgeexit_mixed.tflite"
    (folder / name).write_bytes(model)
    rewrite_tflite_inout_opname(output_folder_path=str(folder), tflite_file_name=name,
                                onnx_input_names=[v.name for v in graph.input],
                                onnx_output_names=[v.name for v in graph.output],
                                onnx_graph_input_shapes=[dims(v) for v in graph.input],
                                onnx_graph_output_shapes=[dims(v) for v in graph.output])
    renamed = (folder / name).read_bytes()

    def io(it: Any) -> list[tuple[Any, ...]]:
        return sorted((d["name"], tuple(d["shape"]), np.dtype(d["dtype"]).name, float(np.float32(d["quantization"][0])),
                       int(d["quantization"][1])) for d in it.get_input_details() + it.get_output_details())

    want, got = io(_interpreter(reference.read_bytes(), keep=False)), io(_interpreter(renamed, keep=False))
    if want != got:
        raise ConversionError(f"{onnx_path.stem}: the mixed-precision file's inputs/outputs {got} differ from the int8 "
                              f"file's {want}; convert with --precision int8")
    return renamed


def _reference(saved_model: Path) -> Path:
    produced = sorted(saved_model.glob("*_full_integer_quant.tflite"))
    if not produced:
        raise ConversionError(f"{saved_model.name}: onnx2tf's int8 file is missing from its output folder")
    return produced[0]


def _logits_index(reference: Path) -> int:
    names = [d["name"] for d in _interpreter(reference.read_bytes(), keep=False).get_output_details()]
    return names.index("logits") if "logits" in names else 0


def refine_unit(unit: str, saved_model: Path, onnx_path: Path, out_path: Path, calibration: np.ndarray,
                max_logit_error: float, force: str | None = None, ranges: str = "minmax") -> UnitPrecision:
    """``precision="auto"`` for one converted unit: keep its int8 file (``out_path``, onnx2tf's) when it passes,
    else replace it with the fastest passing mixed or float32 file (int8 inputs and outputs, the same names and
    quantization). The search runs on the first :data:`SEARCH_SAMPLES` calibration inputs."""
    reference = _reference(saved_model)
    quantizer = UnitQuantizer(saved_model, calibration, ranges)
    model, record = choose_precision(unit, quantizer, calibration[:SEARCH_SAMPLES], _logits_index(reference),
                                     max_logit_error, force)
    if record.kind != "int8" or ranges != "minmax":
        model = name_like(model, reference, saved_model, onnx_path)
        out_path.write_bytes(model)
        record.float_layers = float_ops(model)   # the names the written file gives them
    return record


def float_ops(model: bytes) -> list[str]:
    """The output tensor names of the ops that compute in float32 (QUANTIZE and DEQUANTIZE aside)."""
    it = _interpreter(model, keep=False)
    names = {int(d["index"]): d["name"] for d in it.get_tensor_details()}
    out = []
    for op in it._get_ops_details():
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE", "DELEGATE"):
            continue
        types = [np.dtype(t).name for t in list(op.get("operand_types", [])) + list(op.get("result_types", []))]
        if "float32" in types and len(op["outputs"]):
            out.append(names.get(int(op["outputs"][0]), ""))
    return out


def report_unit(unit: str, saved_model: Path, calibration: np.ndarray, max_logit_error: float) -> UnitPrecision:
    """The per-layer error report of a unit's int8 file, without changing it (a failed int8 conversion check)."""
    reference = _reference(saved_model)
    quantizer = UnitQuantizer(saved_model, calibration)
    inputs = calibration[:SEARCH_SAMPLES]
    index = _logits_index(reference)
    plain = quantizer.quantize(())
    e8 = relative_logit_error(_logits(plain, inputs, index), _logits(quantizer.float_model, inputs, index))
    target = UNIT_SHARE * max_logit_error
    return UnitPrecision(unit, "int8", [], e8, e8, target, e8 <= target, layers=_worst_layers(quantizer, plain, inputs))


def _worst_layers(quantizer: UnitQuantizer, plain: bytes, inputs: np.ndarray, count: int = 12) -> list[LayerError]:
    """The report's layers: the ``count`` tensors of the int8 file that add the most error, the debugger's own
    figure beside each."""
    layers = layer_errors(plain, quantizer.float_model, inputs, quantizer.own_errors())
    return sorted(layers, key=lambda x: -x.added)[:count]


def format_precision(records: dict[str, UnitPrecision], layers: int = 5) -> str:
    """Text lines: each unit's precision and logit error, and its worst layers where int8 missed its share."""
    lines = ["precision  unit         int8_logit_err  chosen_logit_err  target  float32 ops"]
    for name, r in records.items():
        lines.append(f"{r.kind:>9}  {name:<12} {r.logit_error_int8:>14.4f}  {r.logit_error:>16.4f}  {r.target:>6.4f}  "
                     f"{len(r.float_layers)}")
    for name, r in records.items():
        if r.logit_error_int8 <= r.target:
            continue
        lines.append(f"{name}: where the int8 error comes from (error: per-channel RMS error / std against float; "
                     "added: over the layer's inputs; own: the quantization debugger's RMSE/scale, 0.29 = plain "
                     "rounding)")
        for x in r.layers[:layers]:
            own = "-" if x.own is None else f"{x.own:.2f}"
            lines.append(f"    {x.op:<16} {x.tensor[:60]:<60} error {x.error:.3f}  added {x.added:+.3f}  own {own}")
        if r.float_layers:
            lines.append(f"    kept in float32: {', '.join(t[:60] for t in r.float_layers[:8])}"
                         + (f" (+{len(r.float_layers) - 8} more)" if len(r.float_layers) > 8 else ""))
    return "\n".join(lines)
