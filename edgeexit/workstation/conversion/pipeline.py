"""Convert a trained :class:`~edgeexit.workstation.models.staged.StagedModel` into an edgeexit bundle.

The pipeline, one function per step::

    check inputs -> split into stages -> export ONNX -> int8 TFLite (calibrated per stage)
      -> check the graphs are full-int8 -> check hand-offs -> count costs on the graphs
      -> verify int8 vs float -> write the bundle atomically

Example::

    from edgeexit.workstation.conversion.pipeline import convert
    report = convert(model, calib_images, "runs/mnist-bundle", verify_images=x_test, verify_labels=y_test)
    print(report.verification.passed, report.manifest.full_macs)
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgeexit.errors import ConversionError, UsageError, clip
from edgeexit.runtime.tflite import GraphCosts, graph_costs
from edgeexit.runtime.atomic import staging_dir
from edgeexit.runtime.interpreter import create_interpreter, resolve_backend
from edgeexit.runtime.manifest import (ACTIVATIONS, EXIT_RULES, ExitRuleSpec, Manifest, Preprocessing, StageCosts,
                                      quant_equal)

from . import bundle_writer as bw
from .export import ExportUnit, export_onnx, monolithic_unit, split_stages
from .precision import PRECISIONS, RANGES, UnitPrecision, format_precision, refine_unit, report_unit
from .quantize import check_calibration_images, onnx_to_int8_tflite, stage_inputs
from ..models.staged import StagedModel
from .verify import (Tolerances, VerificationReport, compare, float_outputs, format_table, int8_outputs)

log = logging.getLogger(__name__)

#: Default threshold of the confidence rule at every early exit (the EENet authors' T = 0.5).
DEFAULT_CONFIDENCE_THRESHOLD = 0.5

Progress = Callable[[str], None]


class VerificationWarning(UserWarning):
    """A bundle was written although int8 missed the verification tolerances (``convert(..., strict=False)``)."""


@dataclass
class ConversionReport:
    """What a conversion produced and measured."""

    out_dir: Path
    manifest: Manifest
    verification: VerificationReport | None
    handoffs: list[dict[str, Any]]
    costs: list[dict[str, Any]]          # per stage: tflite and torch MACs, agreement
    timings_s: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    #: per unit ("stage_1", "monolithic"): the precision chosen (precision="auto"), or the per-layer error report
    #: of the int8 files when the conversion check failed
    precision: dict[str, UnitPrecision] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return float(sum(self.timings_s.values()))

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "name": self.manifest.name, "stages": len(self.manifest.stages),
                "full_macs": self.manifest.full_macs,
                "files": {s.file: s.size_bytes for s in self.manifest.stages} | (
                    {self.manifest.monolithic.file: self.manifest.monolithic.size_bytes}
                    if self.manifest.monolithic else {}),
                "verification": None if self.verification is None else self.verification.to_dict(),
                "handoffs": self.handoffs, "costs": self.costs, "timings_s": self.timings_s,
                "seconds": self.seconds, "warnings": self.warnings,
                "precision": {k: v.to_dict() for k, v in self.precision.items()}}

    def summary(self) -> str:
        """A text summary: per-stage costs, then the verification table."""
        lines = [f"bundle {self.out_dir} ({self.manifest.name}): {len(self.manifest.stages)} stages, "
                 f"full network {self.manifest.full_macs:,} MACs, converted in {self.seconds:.1f} s",
                 "stage  file            bytes  segment_MACs  head_MACs  torch_agree  handoff_equal"]
        removed = (self.manifest.training or {}).get("removed_activations") or []
        lines[1:1] = [f"note: {n}" for n in removed]  # activations taken off the exits' outputs (stage_network)
        for s, c in zip(self.manifest.stages, self.costs):
            h = self.handoffs[s.index]["equal"] if s.index < len(self.handoffs) else None
            lines.append(f"{s.index:>5}  {s.file:<14} {s.size_bytes:>6}  {s.costs.segment_macs:>12,}  "
                         f"{s.costs.head_macs:>9,}  {str(c['agree']):>11}  {'-' if h is None else str(h):>13}")
        if self.manifest.monolithic is not None:
            m = self.manifest.monolithic
            lines.append(f"   mono  {m.file:<14} {m.size_bytes:>6}  {m.macs:>12,} MACs")
        if self.precision:
            lines.append(format_precision(self.precision))
        if self.verification is not None:
            lines.append(format_table(self.verification))
        else:
            lines.append("verification: skipped (no verification images)")
        return "\n".join(lines)


class _Steps:
    """Times each pipeline step and reports it (one line per step) to the progress callback and the log."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
        self.timings[name] = round(seconds, 3)
        line = f"{name:<28} {seconds:7.1f} s"
        log.info(line)
        if self.progress is not None:
            self.progress(line)
        return result


# ---- step 0: inputs ----------------------------------------------------------------------------------------

def resolve_exit_rule(model: StagedModel, exit_rule: str, thresholds: Sequence[float] | None) -> ExitRuleSpec:
    """The bundle's default exit rule: ``exit_rule`` with ``thresholds``, or the model's / the rule's default.

    Defaults: confidence -> T = 0.5 at every early exit; final -> none; other kinds take
    ``model.spec.extra["thresholds"]`` (``"betas"`` for class_exclusion) when the training recorded them.

    Raises:
        UsageError: an unknown rule, the wrong number of thresholds, a confidence rule for heads without a
            confidence output, or a rule that needs thresholds nobody gave.
    """
    if exit_rule not in EXIT_RULES:
        raise UsageError(f"unknown exit rule {exit_rule!r}; expected one of {', '.join(EXIT_RULES)}")
    early = model.num_exits - 1
    if exit_rule == "confidence":
        missing = [i for i, s in enumerate(model.stages[:-1]) if not s.head.has_confidence]
        if missing:
            raise UsageError(f"exit rule 'confidence' needs a confidence output at every early exit, exits {missing} "
                             "have none: pass exit_rule (CLI: --exit-rule) max_softmax, entropy or class_exclusion "
                             "with thresholds")
    if exit_rule == "fixed":
        raise UsageError("exit rule 'fixed' is a run-time choice, not a bundle default; use confidence, "
                         "max_softmax, entropy, class_exclusion or final")
    if thresholds is None:
        extra = model.spec.extra or {}
        if exit_rule == "confidence":
            thresholds = [DEFAULT_CONFIDENCE_THRESHOLD] * early
        elif exit_rule == "final":
            thresholds = []
        elif exit_rule == "class_exclusion" and extra.get("betas") is not None:
            thresholds = list(extra["betas"])
        elif extra.get("thresholds") is not None:
            thresholds = list(extra["thresholds"])
        else:
            raise UsageError(f"exit rule {exit_rule!r} needs {early} thresholds (one per early exit) and the model "
                             "records none; pass thresholds=[...] (--thresholds)")
    values = tuple(float(t) for t in thresholds)
    if exit_rule != "final" and len(values) != early:
        raise UsageError(f"exit rule {exit_rule!r} got {len(values)} thresholds but the model has {early} early "
                         f"exits; give {early} values")
    return ExitRuleSpec(kind=exit_rule, thresholds=values if exit_rule != "final" else ())


def as_nhwc(model: StagedModel, images: Any) -> Any:
    """Grey images given as [N, H, W] (as bench and tune accept them) -> [N, H, W, 1] for a 1-channel model;
    anything else unchanged (:func:`check_inputs` judges it)."""
    if isinstance(model, StagedModel) and isinstance(images, np.ndarray) and images.ndim == 3 \
            and model.spec.input_shape[0] == 1:
        return images[..., None]
    return images


def check_inputs(model: StagedModel, calib_images: np.ndarray, verify_images: np.ndarray | None,
                 verify_labels: np.ndarray | None) -> None:
    """UsageError for a non-StagedModel, or images/labels that do not fit the model."""
    if not isinstance(model, StagedModel):
        raise UsageError(f"convert() needs an edgeexit.workstation.models.staged.StagedModel, got "
                         f"{type(model).__name__}; stage a network of your own with "
                         "edgeexit.workstation.own.user_network.stage_network, build one with "
                         "edgeexit.workstation.catalog.registry or load a checkpoint")
    for i, stage in enumerate(model.stages):
        head = stage.head
        if getattr(head, "scores", None) not in ("softmax", "sigmoid") or not isinstance(
                getattr(head, "has_confidence", None), bool):
            raise UsageError(f"stage {i}'s head {type(head).__name__} is not an ExitHead (it needs attributes scores "
                             "'softmax'|'sigmoid' and has_confidence, and returns {'logits', 'confidence'}); stage a "
                             "network of your own with edgeexit.workstation.own.user_network.stage_network")
    check_calibration_images(model, calib_images, "calibration")
    if verify_images is not None:
        check_calibration_images(model, verify_images, "verification")
        if verify_labels is not None and (np.ndim(verify_labels) != 1 or len(verify_labels) != len(verify_images)):
            raise UsageError(f"verify_labels has shape {np.shape(verify_labels)}; expected [{len(verify_images)}] "
                             "(one label per verification image)")


# ---- steps 1-3: split, export, quantize --------------------------------------------------------------------

def export_units(units: Sequence[ExportUnit], workdir: Path) -> list[Path]:
    """Export every unit to ONNX in ``workdir`` (seconds), so that a layer the exporter refuses is named before
    any stage spends its minutes in onnx2tf."""
    return [export_onnx(unit, workdir / f"{unit.name}.onnx") for unit in units]


def convert_unit(unit: ExportUnit, calibration: np.ndarray, workdir: Path, out_path: Path,
                 activations: str = "int8", keep_saved_model: bool = False) -> Path:
    """Convert one unit into a full-integer .tflite at ``out_path`` (int8, or int16 activations with int8
    weights), from its ONNX file in ``workdir`` (exported here unless :func:`export_units` did already).
    ``keep_saved_model`` keeps onnx2tf's output folder as ``workdir/<unit>.tf`` (see :func:`choose_precisions`)."""
    onnx_path = workdir / f"{unit.name}.onnx"
    if not onnx_path.is_file():
        onnx_path = export_onnx(unit, onnx_path)
    return onnx_to_int8_tflite(unit.name, onnx_path, calibration, out_path, keep_nhwc_input=not unit.first,
                               activations=activations,
                               keep_saved_model=workdir / f"{unit.name}.tf" if keep_saved_model else None)


def check_precision(precision: Any, activations: Any, exit_rule: str) -> tuple[str, bool]:
    """(activation type, auto) for ``precision`` ("int8", "int16" or "auto") and the older ``activations``
    argument; UsageError for an unknown value or a contradiction."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r:.40}")
    if precision != "int8" and activations != "int8" and precision != activations:
        raise UsageError(f"precision {precision!r} and activations {activations!r:.20} contradict each other; give "
                         "precision only (CLI: --precision)")
    if precision == "int16":
        activations = "int16"
    if precision == "float32" and activations != "int8":
        raise UsageError("precision 'float32' keeps int8 inputs and outputs: drop activations int16")
    return check_activations(activations, exit_rule), precision in ("auto", "float32")


def check_calibration_range(calibration_range: Any, activations: str) -> None:
    """UsageError for an unknown range method, or one other than min/max for int16 files."""
    if calibration_range not in RANGES:
        raise UsageError(f"calibration_range must be one of {', '.join(RANGES)}, got {calibration_range!r:.40}")
    if calibration_range != "minmax" and activations != "int8":
        raise UsageError(f"calibration range {calibration_range!r} applies to int8 files; drop it (CLI: "
                         "--calib-range) for int16 files")


def choose_precisions(units: Sequence[ExportUnit], paths: Sequence[Path], calibration: Sequence[np.ndarray],
                      workdir: Path, max_logit_error: float, report_only: bool = False,
                      force: str | None = None, ranges: str = "minmax") -> dict[str, UnitPrecision]:
    """``precision="auto"``: each unit's fastest file that passes its share of the logit tolerance on the
    calibration inputs (:func:`~edgeexit.workstation.conversion.precision.refine_unit`), written over its int8 file.
    With ``report_only`` nothing changes: the per-layer error report of the int8 files (a failed check)."""
    records = {}
    for unit, path, calib in zip(units, paths, calibration):
        saved = workdir / f"{unit.name}.tf"
        if report_only:   # an aid to a failed check: it must never fail the conversion itself
            if not (saved / "saved_model.pb").is_file():
                log.warning("no per-layer report for %s: onnx2tf wrote no saved model", unit.name)
                continue
            try:
                records[unit.name] = report_unit(unit.name, saved, calib, max_logit_error)
            except Exception as exc:  # noqa: BLE001 - TensorFlow's quantizer raises anything
                log.warning("no per-layer report for %s: %s: %s", unit.name, type(exc).__name__, clip(str(exc), 200))
        else:
            if not (saved / "saved_model.pb").is_file():
                raise ConversionError(f"{unit.name}: onnx2tf wrote no saved model, so it cannot be quantized again "
                                      "(precision auto / float32, --calib-range); convert with precision int8")
            records[unit.name] = refine_unit(unit.name, saved, workdir / f"{unit.name}.onnx", path, calib,
                                             max_logit_error, force, ranges)
    return records


def check_activations(activations: Any, exit_rule: str) -> str:
    """The activation type asked for ("int8" or "int16"); UsageError for another, or for int16 with the
    class_exclusion rule (its run-time tables are built over int8 outputs only)."""
    if activations not in ACTIVATIONS:
        raise UsageError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r:.40}")
    if activations == "int16" and exit_rule == "class_exclusion":
        raise UsageError("exit rule 'class_exclusion' runs on int8 bundles only; convert with activations int8 "
                         "(the default; CLI: drop --precision int16) or choose max_softmax, entropy or confidence")
    return activations


# ---- step 4: the graphs are full-int8, hand-offs fit, costs ------------------------------------------------

#: Ops that legitimately touch float32 in a full-int8 graph: none between input and outputs; these convert.
_CONVERSION_OPS = ("QUANTIZE", "DEQUANTIZE", "DELEGATE")


def check_int8_graph(interpreter: Any, name: str, activations: str = "int8",
                     float_layers: Sequence[str] = ()) -> None:
    """ConversionError if an op of the graph computes in float32 (a layer without an int8 kernel, or without an
    int16-activation kernel for ``activations="int16"``), other than the ops writing ``float_layers`` (the ones
    mixed precision keeps in float32 on purpose).

    The TFLite converter keeps such layers as a float island (DEQUANTIZE -> op -> QUANTIZE) instead of failing;
    they run slowly on CPUs and not at all on int8-only accelerators, so they are refused here, named.
    """
    io = list(interpreter.get_input_details()) + list(interpreter.get_output_details())
    wrong = [f"{d['name']} {np.dtype(d['dtype']).name}" for d in io if np.dtype(d["dtype"]).name != activations]
    if wrong:
        raise ConversionError(f"{name}: the converted graph's inputs/outputs are not {activations} "
                              f"({', '.join(wrong)}); the converter did not produce a full-integer file: check the "
                              "onnx2tf version")
    details = {int(d["index"]): d for d in interpreter.get_tensor_details()}
    for op in interpreter._get_ops_details():
        if op["op_name"] in _CONVERSION_OPS:
            continue
        types = [np.dtype(t).name for t in list(op.get("operand_types", [])) + list(op.get("result_types", []))]
        outs = [str(details[int(i)]["name"]) for i in op["outputs"] if int(i) in details]
        if "float32" in types and not (outs and outs[0] in float_layers):
            kernel = "int8" if activations == "int8" else "int16-activation (16x8)"
            raise ConversionError(f"{name}: op {op['op_name']} (tensor {outs[0] if outs else '?'}) has no {kernel} "
                                  f"kernel and would run in float32 inside the {activations} graph; replace that layer "
                                  "with one TFLite "
                                  "quantizes (conv, linear, pooling, ReLU/ReLU6, sigmoid, tanh, add, mul, concat)")


# ---- hand-offs and costs ---------------------------------------------------------------------------

def check_handoffs(interpreters: Sequence[Any]) -> list[dict[str, Any]]:
    """Compare stage k's ``features`` quantization with stage k+1's input; log loudly when they differ."""
    result = []
    for k in range(len(interpreters) - 1):
        _, outs = bw.stage_tensors(interpreters[k], Path(f"stage_{k}.tflite"))
        nxt, _ = bw.stage_tensors(interpreters[k + 1], Path(f"stage_{k + 1}.tflite"))
        feats = outs.get("features")
        if feats is None or feats.shape != nxt.shape:
            raise ConversionError(f"hand-off {k}->{k + 1}: stage {k} features "
                                  f"{None if feats is None else list(feats.shape)} do not fit stage {k + 1} input "
                                  f"{list(nxt.shape)}; the converter changed a tensor layout")
        equal = quant_equal(feats.quantization, nxt.quantization)
        fq, nq = feats.quantization, nxt.quantization
        entry = {"from": k, "to": k + 1, "equal": equal,
                 "features": None if fq is None else {"scale": fq.scale, "zero_point": fq.zero_point},
                 "input": None if nq is None else {"scale": nq.scale, "zero_point": nq.zero_point}}
        if not equal:
            log.warning("HAND-OFF QUANTIZATION DIFFERS %d->%d: features %s vs next input %s; the runtime will "
                        "requantize (slower)", k, k + 1, fq, nq)
        result.append(entry)
    return result


def count_costs(model: StagedModel, stage_paths: Sequence[Path],
                mono_path: Path | None) -> tuple[list[StageCosts], list[dict[str, Any]], int, GraphCosts | None]:
    """MACs and parameter bytes per stage from the graphs, cross-checked against torch hooks.

    ``full_macs`` (the manifest's, = :attr:`ModelCosts.full_macs`): the network without early exits, i.e. every
    stage's segment + the whole final head. The monolithic graph has no confidence output, so it must count
    the segments + the part of the final head its logits depend on.

    Returns:
        (StageCosts per stage, per-stage comparison records, full-network MACs, monolithic GraphCosts).
    """
    from ..models.costs import model_costs

    torch_costs = model_costs(model)
    stage_costs, records = [], []
    for i, path in enumerate(stage_paths):
        g = graph_costs(path, "features")
        ts, th = int(torch_costs.segment_macs[i]), int(torch_costs.head_macs[i])
        agree = (g.segment_macs, g.head_macs) == (ts, th)
        if not agree:
            log.warning("stage %d: tflite MACs segment %d / head %d differ from torch %d / %d", i, g.segment_macs,
                        g.head_macs, ts, th)
        stage_costs.append(StageCosts(segment_macs=g.segment_macs, head_macs=g.head_macs,
                                      segment_param_bytes=g.segment_param_bytes, head_param_bytes=g.head_param_bytes,
                                      torch_segment_macs=ts, torch_head_macs=th))
        records.append({"stage": i, "segment_macs": g.segment_macs, "head_macs": g.head_macs,
                        "head_logits_macs": g.head_output_macs.get("logits", g.head_macs),
                        "torch_segment_macs": ts, "torch_head_macs": th, "agree": agree, "mac_ops": dict(g.mac_ops)})
    full = sum(c.segment_macs for c in stage_costs) + stage_costs[-1].head_macs
    mono = graph_costs(mono_path, None) if mono_path is not None else None
    if mono is not None and mono.macs != monolithic_macs(full, records):
        log.warning("monolithic graph has %d MACs, the stages' segments + final logits path %d", mono.macs,
                    monolithic_macs(full, records))
    return stage_costs, records, full, mono


def monolithic_macs(full_macs: int, records: Sequence[dict[str, Any]]) -> int:
    """What the monolithic graph should count: ``full_macs`` less the final head's confidence-only ops."""
    return full_macs - records[-1]["head_macs"] + records[-1]["head_logits_macs"]


# ---- step 5: verification ----------------------------------------------------------------------------------

def verify_bundle(model: StagedModel, stage_paths: Sequence[Path], mono_path: Path | None, images: np.ndarray,
                  labels: np.ndarray | None, rule: ExitRuleSpec, tolerances: Tolerances) -> VerificationReport:
    """Run float torch and the chained int8 files over the same held-out images and compare them."""
    flt = float_outputs(model, images)
    q = int8_outputs(stage_paths, images, model.spec.mean, model.spec.std, mono_path)
    scores = [s.head.scores for s in model.stages]
    return compare(flt, q, None if labels is None else np.asarray(labels, np.int64), scores, rule, tolerances)


def _missed(report: VerificationReport) -> str:
    """"missed max_logit_error, min_top1_agreement": the tolerances a failed verification did not meet."""
    return f"missed {', '.join(report.failed_tolerances)}"


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


def training_info(model: StagedModel) -> dict[str, Any]:
    """The manifest's ``training`` section: builder, its arguments, and what training recorded in spec.extra."""
    spec = model.spec
    return _jsonable({"builder": spec.builder, "kwargs": spec.kwargs, **(spec.extra or {})})


# ---- the pipeline ------------------------------------------------------------------------------------------

def convert(model: StagedModel, calib_images: np.ndarray, out_dir: str | Path, *,
            verify_images: np.ndarray | None = None, verify_labels: np.ndarray | None = None,
            thresholds: Sequence[float] | None = None, exit_rule: str = "confidence", monolithic: bool = True,
            force: bool = False, strict: bool = False, tolerances: Tolerances = Tolerances(),
            name: str | None = None, training: dict[str, Any] | None = None,
            progress: Progress | None = None, activations: str = "int8",
            precision: str = "int8", calibration_range: str = "minmax") -> ConversionReport:
    """Convert ``model`` into a bundle at ``out_dir``: one full-int8 .tflite per stage (+ monolithic.tflite).

    With ``activations="int16"`` every file (stages and monolithic) is the TFLite "16x8" conversion instead: int8
    weights, int16 activations, int16 input and outputs (more accurate, larger activations, no Edge TPU; the
    class_exclusion rule is refused). The manifest records it in ``activations``.

    Args:
        model: the trained early-exit network.
        calib_images: [N, H, W, C] uint8 calibration images (N >= 8; a few hundred is typical); grey images may
            be [N, H, W].
        out_dir: the bundle directory to create.
        verify_images: [M, H, W, C] uint8 held-out images (grey: or [M, H, W]), distinct from the calibration
            images, to check int8 against float; None skips verification.
        verify_labels: [M] int labels of ``verify_images`` (for accuracies), or None.
        thresholds: the default exit rule's per-exit thresholds (one per early exit).
        exit_rule: the bundle's default exit rule (see :func:`resolve_exit_rule`).
        monolithic: also convert the network without exits (the baseline) into monolithic.tflite.
        force: replace an existing ``out_dir``.
        strict: False (the default): a verification that misses the tolerances still writes the bundle and
            ``warnings.warn`` names the missed tolerances (a :class:`VerificationWarning`; the report's
            ``verification.passed`` is False, ``failed_tolerances`` names them, and the manifest records it, so
            the benchmark scripts refuse the bundle); True: it raises ConversionError naming them and writes nothing.
        tolerances: the verification tolerances (:class:`~edgeexit.workstation.conversion.verify.Tolerances`: the
            logit error relative to the logit range, top-1 agreement without near-ties, exit-decision agreement,
            and the accuracy drop judged on its confidence bound; README "Conversion checks").
        name: the bundle's name (default: the model's builder name).
        training: extra facts for the manifest's ``training`` section (checkpoint metrics, calibration set).
        progress: called with one line per finished step (its name and seconds).
        activations: "int8" (the default) or "int16" (see above); the older spelling of ``precision``.
        precision: "int8" (the default), "int16" (as ``activations="int16"``) or "auto": int8 files, except that
            a unit (stage or monolithic) whose int8 logits miss half of ``tolerances.max_logit_error`` on the
            calibration images keeps the layers that cause it, or the whole unit, in float32 between int8 inputs
            and outputs, whichever passes and runs faster (:mod:`.precision`); the manifest's ``precision`` section
            records it. A failed check in int8 reports the worst layers of every unit the same way. "float32": every
            layer of every unit in float32 between int8 inputs and outputs (the float reference on the device).
        calibration_range: how calibration sets the int8 range of the tensors inside each unit: "minmax" (the
            default: the converter's), "percentile" (0.01-99.99 %) or "mse" (the clipping with the smallest int8
            round-trip error); inputs and outputs keep min/max ranges so that hand-offs stay pass-through.
            Applies to int8 files (precision int8 and auto).

    Returns:
        The :class:`ConversionReport`.

    Raises:
        UsageError: bad inputs, an unknown rule, or an existing ``out_dir`` without ``force``.
        ConversionError: a layer that cannot be exported or converted (named), broken graph outputs, or a
            failed verification with ``strict=True``.
    """
    out = Path(out_dir).absolute()
    calib_images, verify_images = (as_nhwc(model, v) for v in (calib_images, verify_images))
    check_inputs(model, calib_images, verify_images, verify_labels)
    rule = resolve_exit_rule(model, exit_rule, thresholds)
    activations, auto = check_precision(precision, activations, rule.kind)
    check_calibration_range(calibration_range, activations)
    requantize = auto or calibration_range != "minmax"
    bw.check_target(out, force)
    was_training = model.training
    model.eval()
    steps = _Steps(progress)
    try:
        # the converters' threads may leave a warnings filter of their own behind (catch_warnings is not
        # thread-safe: a thread that exits it late restores the filters it saw, e.g. an "ignore everything" of
        # quiet_tool); the caller's filters are put back when the steps end, before the VerificationWarning
        with warnings.catch_warnings(), staging_dir(out) as staged, \
                tempfile.TemporaryDirectory(prefix="edgeexit-onnx-") as work:
            workdir = Path(work)
            units = steps.run("split into stages", split_stages, model)
            mono_unit = monolithic_unit(model) if monolithic else None
            steps.run("export ONNX", export_units, units + ([mono_unit] if mono_unit is not None else []), workdir)
            calibration = steps.run("calibration features", stage_inputs, model, calib_images)
            keep = activations == "int8" and (requantize or verify_images is not None)   # for .precision
            stage_paths = []
            for unit, calib in zip(units, calibration):
                path = staged / f"{unit.name}.tflite"
                stage_paths.append(steps.run(f"convert {unit.name}", convert_unit, unit, calib, workdir, path,
                                             activations, keep))
            mono_path = None
            if monolithic:
                mono_path = steps.run("convert monolithic", convert_unit, mono_unit, calibration[0],
                                      workdir, staged / "monolithic.tflite", activations, keep)
            all_units = units + ([mono_unit] if mono_path is not None else [])
            all_paths = stage_paths + ([mono_path] if mono_path is not None else [])
            all_calib = list(calibration) + ([calibration[0]] if mono_path is not None else [])
            precisions: dict[str, UnitPrecision] = {}
            if requantize:
                precisions = steps.run("choose precision" if auto else f"{calibration_range} ranges",
                                       choose_precisions, all_units, all_paths, all_calib, workdir,
                                       tolerances.max_logit_error, force={"auto": None}.get(precision, precision),
                                       ranges=calibration_range)
            backend = resolve_backend("auto")
            interps = [create_interpreter(p, backend) for p in stage_paths]
            mono_interp = None if mono_path is None else create_interpreter(mono_path, backend)
            named = [(f"stage_{i}", it) for i, it in enumerate(interps)] + (
                [("monolithic", mono_interp)] if mono_interp is not None else [])
            floats = {k: v.float_layers for k, v in precisions.items()}
            steps.run(f"check {activations} graphs",
                      lambda: [check_int8_graph(it, n, activations, floats.get(n, ())) for n, it in named])
            handoffs = steps.run("check hand-offs", check_handoffs, interps)
            stage_costs, cost_records, full_macs, mono_costs = steps.run("count costs", count_costs, model, stage_paths,
                                                                         mono_path)
            report_v = None
            if verify_images is not None:
                report_v = steps.run("verify int8 vs float", verify_bundle, model, stage_paths, mono_path,
                                     verify_images, verify_labels, rule, tolerances)
                report_v.handoffs = handoffs
                if not report_v.passed:
                    log.warning("VERIFICATION FAILED: %s", "; ".join(report_v.failures))
                    if keep and not requantize:
                        precisions = steps.run("per-layer error report", choose_precisions, all_units, all_paths,
                                               all_calib, workdir, tolerances.max_logit_error, report_only=True)
                    if strict:
                        raise ConversionError(f"int8 verification failed, {_missed(report_v)} "
                                              f"({'; '.join(report_v.failures)}); nothing was written (strict=True): "
                                              "use more/better calibration images, retrain, or pass strict=False "
                                              "(CLI: drop --strict) to keep the bundle anyway")
            verification = report_v.to_dict() if report_v is not None else {"skipped": "no verification images"}
            section = ({"mode": precision, "ranges": calibration_range,
                        "units": {k: v.manifest_entry() for k, v in precisions.items()}} if requantize else {})
            manifest = steps.run("write bundle", _write, model, staged, out, force, stage_paths, interps, stage_costs,
                                 rule, full_macs, mono_path, mono_interp, mono_costs, verification,
                                 name or model.spec.builder, training or {}, activations, section)
    finally:
        model.train(was_training)
    notes = [f"hand-off {h['from']}->{h['to']} quantization differs" for h in handoffs if not h["equal"]]
    notes += [f"stage {c['stage']}: tflite MACs differ from torch" for c in cost_records if not c["agree"]]
    if mono_costs is not None and mono_costs.macs != monolithic_macs(full_macs, cost_records):
        notes.append(f"monolithic MACs {mono_costs.macs} != segments + final logits path "
                     f"{monolithic_macs(full_macs, cost_records)}")
    if report_v is not None and not report_v.passed:
        notes += report_v.failures
        warnings.warn(f"int8 verification of {out} failed, {_missed(report_v)}: {'; '.join(report_v.failures)}; the "
                      "bundle was written (pass strict=True to write nothing instead)", VerificationWarning, stacklevel=2)
    return ConversionReport(out_dir=out, manifest=manifest, verification=report_v, handoffs=handoffs,
                            costs=cost_records, timings_s=steps.timings, warnings=notes, precision=precisions)


def _write(model: StagedModel, staged: Path, out: Path, force: bool, stage_paths: Sequence[Path],
           interps: Sequence[Any], stage_costs: Sequence[StageCosts], rule: ExitRuleSpec, full_macs: int,
           mono_path: Path | None, mono_interp: Any | None, mono_costs: GraphCosts | None,
           verification: dict[str, Any], name: str, training: dict[str, Any], activations: str = "int8",
           precision: dict[str, Any] | None = None) -> Manifest:
    """Build the manifest, write it next to the files and move the whole directory into place."""
    stages = [bw.stage_spec(i, p, it, model.stages[i].head.scores, c)
              for i, (p, it, c) in enumerate(zip(stage_paths, interps, stage_costs))]
    spec = model.spec
    _, h, w = spec.input_shape
    pre = Preprocessing(size=(h, w), color_mode=spec.color_mode, mean=tuple(float(v) for v in spec.mean),
                        std=tuple(float(v) for v in spec.std))
    mono = None
    if mono_path is not None and mono_interp is not None and mono_costs is not None:
        mono = bw.model_file(mono_path, mono_interp, mono_costs.macs, mono_costs.param_bytes)
    manifest = bw.build_manifest(name, stages, pre, spec.labels, rule, full_macs, mono, _jsonable(verification),
                                 {**training_info(model), **_jsonable(training)}, activations, precision or {})
    bw.write_manifest(staged, manifest)
    bw.publish(staged, out, force)
    return manifest
