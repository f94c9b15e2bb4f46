"""Step 4 of the conversion pipeline: check the int8 stage files against the float torch model.

The stages are chained exactly as the device chains them: the image is quantized with stage 0's input
quantization, and every stage's raw int8 ``features`` are copied into the next stage's input (requantized
only when the two quantizations differ). Logits and confidences are dequantized and compared with torch:

* per exit: max abs error of the logits and of the confidence (sigmoid space), top-1 agreement, agreement of
  the exit decision ("has the input left by exit i?") under the bundle's exit rule, float and int8 accuracy;
* the early-exit decision as a whole: which exit, which answer, accuracy float vs int8;
* the monolithic model against the float network without exits.

Tolerances are checked and every failure is listed; the caller decides whether a failure is fatal.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from edgeexit.runtime.interpreter import create_interpreter, resolve_backend
from edgeexit.runtime.manifest import ExitRuleSpec, Preprocessing, Quantization, TensorSpec
from edgeexit.runtime.preprocess import Preprocessor
from edgeexit.runtime.trace import Trace
from edgeexit.runtime.rules import rule_from_spec

from .export import INPUT_NAME
from .quantize import normalize_images
from ..models.staged import MonolithicExport, StagedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerances:
    """What int8 must achieve against float on the verification images."""

    min_top1_agreement: float = 0.99      # per exit
    min_decision_agreement: float = 0.98  # per early exit, "left by exit i" float vs int8
    max_accuracy_drop_pp: float = 0.5     # final exit, early-exit decision and monolithic, in percentage points


@dataclass
class FloatOutputs:
    """Torch float outputs over N images: per-exit logits [N, K] and confidence logits [N] (or None)."""

    logits: list[np.ndarray]
    confidence: list[np.ndarray | None]
    monolithic: np.ndarray  # [N, K]


def float_outputs(model: StagedModel, images: np.ndarray, batch: int = 256) -> FloatOutputs:
    """Run the float torch model (every exit, and the network without exits) over uint8 NHWC images."""
    x_all = normalize_images(images, model.spec.mean, model.spec.std)
    logits: list[list[np.ndarray]] = [[] for _ in model.stages]
    conf: list[list[np.ndarray]] = [[] for _ in model.stages]
    mono_chunks = []
    mono = MonolithicExport(model).eval()
    model.eval()
    with torch.no_grad():
        for start in range(0, len(x_all), batch):
            x = torch.from_numpy(x_all[start:start + batch]).permute(0, 3, 1, 2)
            for i, (_, out) in enumerate(model.iter_stages(x)):
                logits[i].append(out["logits"].numpy())
                if "confidence" in out:
                    conf[i].append(out["confidence"].numpy().reshape(-1))
            mono_chunks.append(mono(x).numpy())
    return FloatOutputs(logits=[np.concatenate(c) for c in logits],
                        confidence=[np.concatenate(c) if c else None for c in conf],
                        monolithic=np.concatenate(mono_chunks))


def _quantize(x: np.ndarray, scale: float, zero_point: int, dtype: np.dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


def _dequantize(q: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if not scale:
        return q.astype(np.float32)
    return (q.astype(np.float32) - zero_point) * np.float32(scale)


def _outputs_by_name(interp: Any) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in interp.get_output_details()}


def _device_preprocessor(images: np.ndarray, mean: Sequence[float], std: Sequence[float],
                         detail: dict[str, Any]) -> Preprocessor:
    """The device's image quantizer for an input tensor (a float64 table over the 256 pixel values).

    Using it here, not a float32 recomputation, keeps exact rounding ties (e.g. mean 0.5, std 0.25, where a
    quarter of the pixels land on .5) on the device's side of the tie.
    """
    scale, zero_point = detail["quantization"]
    prep = Preprocessing(size=(int(images.shape[1]), int(images.shape[2])),
                         color_mode="L" if images.shape[3] == 1 else "RGB", mean=tuple(mean), std=tuple(std))
    spec = TensorSpec(INPUT_NAME, tuple(int(v) for v in detail["shape"]), np.dtype(detail["dtype"]).name,
                      Quantization(float(scale), int(zero_point)))
    return Preprocessor(prep, spec)


@dataclass
class Int8Outputs:
    """Dequantized int8 outputs over N images, in the same layout as :class:`FloatOutputs`."""

    logits: list[np.ndarray]
    confidence: list[np.ndarray | None]
    monolithic: np.ndarray | None


def int8_outputs(stage_paths: Sequence[os.PathLike[str] | str], images: np.ndarray, mean: Sequence[float],
                 std: Sequence[float], monolithic_path: os.PathLike[str] | str | None = None) -> Int8Outputs:
    """Run the int8 stage files chained as on the device (raw int8 hand-offs) over uint8 NHWC images."""
    backend = resolve_backend("auto")
    interps = [create_interpreter(p, backend) for p in stage_paths]
    ins = [it.get_input_details()[0] for it in interps]
    outs = [_outputs_by_name(it) for it in interps]
    n = len(images)
    device_input = _device_preprocessor(images, mean, std, ins[0])
    logits = [np.zeros((n, int(np.prod(o["logits"]["shape"]))), np.float32) for o in outs]
    conf = [np.zeros(n, np.float32) if "confidence" in o else None for o in outs]
    for j in range(n):
        value = device_input(images[j])[None]
        for k, it in enumerate(interps):
            it.set_tensor(ins[k]["index"], value)
            it.invoke()
            logits[k][j] = _dequantize(it.get_tensor(outs[k]["logits"]["index"]), outs[k]["logits"]).reshape(-1)
            if conf[k] is not None:
                conf[k][j] = _dequantize(it.get_tensor(outs[k]["confidence"]["index"]),
                                         outs[k]["confidence"]).reshape(-1)[0]
            if k + 1 < len(interps):
                feat = outs[k]["features"]
                raw = it.get_tensor(feat["index"])
                (fs, fz), (ns, nz) = feat["quantization"], ins[k + 1]["quantization"]
                if fz != nz or not math.isclose(fs, ns, rel_tol=1e-6):  # as the device decides
                    nscale, nzp = ins[k + 1]["quantization"]
                    raw = _quantize(_dequantize(raw, feat), nscale, nzp, ins[k + 1]["dtype"])
                value = raw
    mono = None
    if monolithic_path is not None:
        it = create_interpreter(monolithic_path, backend)
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        mono_input = _device_preprocessor(images, mean, std, inp)
        mono = np.zeros((n, int(np.prod(out["shape"]))), np.float32)
        for j in range(n):
            it.set_tensor(inp["index"], mono_input(images[j])[None])
            it.invoke()
            mono[j] = _dequantize(it.get_tensor(out["index"]), out).reshape(-1)
    return Int8Outputs(logits=logits, confidence=conf, monolithic=mono)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _accuracy(pred: np.ndarray, labels: np.ndarray | None) -> float | None:
    return None if labels is None else float(np.mean(pred == labels))


@dataclass
class ExitCheck:
    """float vs int8 at one exit."""

    exit: int
    logits_max_abs_error: float
    logits_mean_abs_error: float
    logits_max_abs: float                  # largest |float logit|, for scale
    confidence_max_abs_error: float | None  # in sigmoid space
    top1_agreement: float
    decision_agreement: float | None       # "left by this exit" float vs int8; None for the last exit
    float_accuracy: float | None
    int8_accuracy: float | None


@dataclass
class VerificationReport:
    """Everything the verification measured, and whether it met the tolerances."""

    samples: int
    rule: dict[str, Any]
    tolerances: dict[str, float]
    exits: list[ExitCheck]
    early_exit: dict[str, Any]
    monolithic: dict[str, Any] | None
    handoffs: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def _trace(logits: list[np.ndarray], confidence: list[np.ndarray | None], scores: Sequence[str]) -> Trace:
    return Trace(logits=tuple(l.astype(np.float32) for l in logits),
                 confidence=tuple(None if c is None else c.astype(np.float32) for c in confidence),
                 scores=tuple(scores))


def compare(flt: FloatOutputs, q: Int8Outputs, labels: np.ndarray | None, scores: Sequence[str],
            rule: ExitRuleSpec, tolerances: Tolerances = Tolerances()) -> VerificationReport:
    """Compare float and int8 outputs; list every tolerance that is not met."""
    n = len(flt.logits[0])
    last = len(flt.logits) - 1
    exit_rule = rule_from_spec(rule)
    ef, pf = exit_rule.simulate(_trace(flt.logits, flt.confidence, scores))
    eq, pq = exit_rule.simulate(_trace(q.logits, q.confidence, scores))
    exits, failures = [], []
    for i in range(last + 1):
        fl, ql = flt.logits[i], q.logits[i]
        conf_err = None
        if flt.confidence[i] is not None and q.confidence[i] is not None:
            conf_err = float(np.max(np.abs(_sigmoid(flt.confidence[i]) - _sigmoid(q.confidence[i]))))
        decision = None if i == last else float(np.mean((ef <= i) == (eq <= i)))
        check = ExitCheck(exit=i, logits_max_abs_error=float(np.max(np.abs(fl - ql))),
                          logits_mean_abs_error=float(np.mean(np.abs(fl - ql))),
                          logits_max_abs=float(np.max(np.abs(fl))), confidence_max_abs_error=conf_err,
                          top1_agreement=float(np.mean(fl.argmax(1) == ql.argmax(1))), decision_agreement=decision,
                          float_accuracy=_accuracy(fl.argmax(1), labels), int8_accuracy=_accuracy(ql.argmax(1), labels))
        exits.append(check)
        if check.top1_agreement < tolerances.min_top1_agreement:
            failures.append(f"exit {i}: top-1 agreement {check.top1_agreement:.4f} < "
                            f"{tolerances.min_top1_agreement}")
        if decision is not None and decision < tolerances.min_decision_agreement:
            failures.append(f"exit {i}: exit-decision agreement {decision:.4f} < {tolerances.min_decision_agreement}")

    def drop(name: str, acc_f: float | None, acc_q: float | None) -> None:
        # a drop of exactly the allowance (e.g. 1 image in 200 = 0.5 pp) passes despite float rounding
        if acc_f is not None and acc_q is not None and (acc_f - acc_q) * 100 > tolerances.max_accuracy_drop_pp + 1e-9:
            failures.append(f"{name}: int8 accuracy {acc_q:.4f} is {100 * (acc_f - acc_q):.2f} pp below float "
                            f"{acc_f:.4f} (allowed {tolerances.max_accuracy_drop_pp} pp)")

    drop(f"final exit {last}", exits[-1].float_accuracy, exits[-1].int8_accuracy)
    early = {"exit_agreement": float(np.mean(ef == eq)), "answer_agreement": float(np.mean(pf == pq)),
             "float_accuracy": _accuracy(pf, labels), "int8_accuracy": _accuracy(pq, labels),
             "float_exit_fractions": [float(np.mean(ef == i)) for i in range(last + 1)],
             "int8_exit_fractions": [float(np.mean(eq == i)) for i in range(last + 1)]}
    drop("early-exit decision", early["float_accuracy"], early["int8_accuracy"])
    mono = None
    if q.monolithic is not None:
        mf, mq = flt.monolithic, q.monolithic
        mono = {"logits_max_abs_error": float(np.max(np.abs(mf - mq))),
                "top1_agreement": float(np.mean(mf.argmax(1) == mq.argmax(1))),
                "float_accuracy": _accuracy(mf.argmax(1), labels), "int8_accuracy": _accuracy(mq.argmax(1), labels)}
        if mono["top1_agreement"] < tolerances.min_top1_agreement:
            failures.append(f"monolithic: top-1 agreement {mono['top1_agreement']:.4f} < "
                            f"{tolerances.min_top1_agreement}")
        drop("monolithic", mono["float_accuracy"], mono["int8_accuracy"])
    return VerificationReport(samples=n, rule={"kind": rule.kind, "thresholds": list(rule.thresholds),
                                               "exit": rule.exit},
                              tolerances=asdict(tolerances), exits=exits, early_exit=early, monolithic=mono,
                              failures=failures)


def format_table(report: VerificationReport) -> str:
    """The verification report as a fixed-width text table (for stdout)."""
    def pct(v: float | None) -> str:
        return "    -" if v is None else f"{100 * v:5.1f}"

    def num(v: float | None) -> str:
        return "      -" if v is None else f"{v:7.4f}"

    lines = [f"verification on {report.samples} held-out images (rule {report.rule['kind']} "
             f"{report.rule['thresholds']}):",
             "exit  logit_err  conf_err  top1_agree  decision_agree  acc_float  acc_int8"]
    for e in report.exits:
        lines.append(f"{e.exit:>4}  {num(e.logits_max_abs_error):>9}  {num(e.confidence_max_abs_error):>8}  "
                     f"{pct(e.top1_agreement):>9}%  {pct(e.decision_agreement):>13}%  "
                     f"{pct(e.float_accuracy):>8}%  {pct(e.int8_accuracy):>7}%")
    ee = report.early_exit
    lines.append(f"early exit: exit agreement {pct(ee['exit_agreement'])}%, accuracy float "
                 f"{pct(ee['float_accuracy'])}% int8 {pct(ee['int8_accuracy'])}%, exit fractions float "
                 f"{[round(v, 3) for v in ee['float_exit_fractions']]} int8 "
                 f"{[round(v, 3) for v in ee['int8_exit_fractions']]}")
    if report.monolithic is not None:
        m = report.monolithic
        lines.append(f"monolithic: logit_err {m['logits_max_abs_error']:.4f}, top-1 agreement "
                     f"{pct(m['top1_agreement'])}%, accuracy float {pct(m['float_accuracy'])}% int8 "
                     f"{pct(m['int8_accuracy'])}%")
    for h in report.handoffs:
        if not h["equal"]:
            lines.append(f"hand-off {h['from']}->{h['to']}: quantization differs ({h['features']} vs {h['input']}); "
                         "the runtime requantizes")
    lines.append("PASSED" if report.passed else "FAILED: " + "; ".join(report.failures))
    return "\n".join(lines)
