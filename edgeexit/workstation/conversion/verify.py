"""Step 4 of the conversion pipeline: check the int8 stage files against the float torch model.

The stages are chained exactly as the device chains them: the image is quantized with stage 0's input
quantization, and every stage's raw int8 ``features`` are copied into the next stage's input (requantized
only when the two quantizations differ). Logits and confidences are dequantized and compared with torch:

* per exit: the logit error (RMS and largest, relative to the float logits' range), the confidence error
  (sigmoid space), top-1 agreement, agreement of the exit decision ("has the input left by exit i?") under the
  bundle's exit rule, float and int8 accuracy and the paired accuracy drop with its bounds;
* the early-exit decision as a whole: which exit, which answer, accuracy float vs int8;
* the monolithic model against the float network without exits.

Tolerances are checked and every failure is listed, naming the tolerance; the caller decides whether a
failure is fatal."""

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
    """What int8 must achieve against float on the verification images (README "Conversion checks").

    A rate measured on N images is uncertain, and int8 flips some near-tied answers of every network, so the
    rates are judged on their one-sided bounds at ``confidence_level``: a check fails when the images show that the
    limit is missed, not when one image too many flipped. The logit error has no sampling noise worth the
    name (every logit of every image counts) and is judged as measured. The defaults pass the int8 conversions
    of trained networks measured so far and fail broken ones (tests/test_verify.py); README "Conversion checks".
    """

    min_top1_agreement: float = 0.99      # per exit and monolithic: int8 top-1 == float top-1 on the images whose
    #                                       float answer is not a near-tie (see tie_margin; upper bound)
    min_decision_agreement: float = 0.95  # per early exit, "left by exit i" float vs int8 (upper bound)
    max_accuracy_drop_pp: float = 1.0     # float - int8 accuracy of the final exit, the early-exit decision and
    #                                       the monolithic model, in percentage points (lower bound; needs labels)
    max_logit_error: float = 0.02         # per exit and monolithic: RMS(int8 - float logits) / float logit range
    tie_margin: float = 0.02              # a near-tie: the two best float logits closer than this share of the
    #                                       logit range (int8 rounding may flip it; not counted in top-1 agreement)
    confidence_level: float = 0.95        # of the one-sided bounds


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
            # NCHW with plain strides: a user's head may .view it (.contiguous() keeps 1-channel permuted strides)
            x = torch.from_numpy(x_all[start:start + batch]).permute(0, 3, 1, 2).clone(
                memory_format=torch.contiguous_format)
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


# ---- statistics --------------------------------------------------------------------------------------------

def rate_bounds(k: int, n: int, level: float) -> tuple[float, float]:
    """One-sided exact (Clopper-Pearson) bounds of a rate observed as ``k`` of ``n``: (lower, upper), each
    holding with probability ``level``."""
    from scipy.stats import beta  # workstation dependency; imported only when verifying

    alpha = 1.0 - level
    lower = 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    upper = 1.0 if k == n else float(beta.ppf(1.0 - alpha, k + 1, n - k))
    return lower, upper


def accuracy_drop(float_correct: np.ndarray, int8_correct: np.ndarray, level: float) -> dict[str, Any]:
    """Float minus int8 accuracy on the same images, in percentage points, with one-sided bounds.

    Only the discordant images carry information (McNemar): ``float_only`` right in float and wrong in int8,
    ``int8_only`` the reverse. Given their number m, float_only is binomial(m, p) and the drop is
    (2p - 1) m / n; the bounds put p's exact one-sided bounds in that formula.
    """
    n = len(float_correct)
    b = int(np.sum(float_correct & ~int8_correct))
    c = int(np.sum(~float_correct & int8_correct))
    m = b + c
    lower_p, upper_p = rate_bounds(b, m, level) if m else (0.5, 0.5)
    return {"pp": round(100.0 * (b - c) / n, 4), "lower_pp": round(100.0 * (2 * lower_p - 1) * m / n, 4),
            "upper_pp": round(100.0 * (2 * upper_p - 1) * m / n, 4), "float_only": b, "int8_only": c}


def _relative(value: float, span: float) -> float:
    return value / max(span, 1e-12)  # constant float outputs: any error is a failure (and JSON stays finite)


def relative_rms_error(flt: np.ndarray, q: np.ndarray) -> float:
    """RMS(int8 - float) over every value, divided by the float values' range over the whole set (max - min),
    which makes errors comparable between networks, exits and outputs."""
    diff = q.astype(np.float64) - flt.astype(np.float64)
    return _relative(float(np.sqrt(np.mean(diff ** 2))), float(np.max(flt) - np.min(flt)))


def logit_errors(flt: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """int8 vs float logits [N, K]: absolute errors, and errors relative to the float logits' range."""
    diff = np.abs(q.astype(np.float64) - flt.astype(np.float64))
    span = float(np.max(flt) - np.min(flt))
    return {"logits_max_abs_error": float(np.max(diff)), "logits_mean_abs_error": float(np.mean(diff)),
            "logits_max_abs": float(np.max(np.abs(flt))), "logits_range": span,
            "logit_error": relative_rms_error(flt, q), "logit_max_error": _relative(float(np.max(diff)), span)}


def top1_agreement(flt: np.ndarray, q: np.ndarray, tie_margin: float, level: float) -> dict[str, Any]:
    """Share of images where int8 and float logits [N, K] have the same top-1 class: over all images, and over
    the clear ones (top-2 float margin >= ``tie_margin`` x the float logit range) with its upper bound."""
    same = flt.argmax(1) == q.argmax(1)
    if flt.shape[1] > 1:
        top2 = np.sort(flt, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) >= tie_margin * float(np.max(flt) - np.min(flt))
    else:  # one class: no tie possible
        clear = np.ones(len(flt), bool)
    k, m = int(np.sum(same & clear)), int(np.sum(clear))
    return {"top1_agreement": float(np.mean(same)), "clear_images": m,
            "top1_agreement_clear": k / m if m else None,
            "top1_agreement_clear_upper": round(rate_bounds(k, m, level)[1], 6) if m else None}


# ---- the comparison ----------------------------------------------------------------------------------------

@dataclass
class ExitCheck:
    """float vs int8 at one exit."""

    exit: int
    logits_max_abs_error: float
    logits_mean_abs_error: float
    logits_max_abs: float                  # largest |float logit|, for scale
    logits_range: float                    # max - min of the float logits over the verification images
    logit_error: float                     # RMS int8 - float logit error / logits_range (judged)
    logit_max_error: float                 # largest |int8 - float| logit error / logits_range
    confidence_max_abs_error: float | None  # in sigmoid space
    confidence_error: float | None         # RMS int8 - float confidence logit error / their range (reported:
    #                                        a weak exit's confidences span little, and decisions are judged)
    top1_agreement: float                  # over all images
    clear_images: int                      # images whose float answer is not a near-tie (Tolerances.tie_margin)
    top1_agreement_clear: float | None     # over those (judged on its one-sided upper bound)
    top1_agreement_clear_upper: float | None
    decision_agreement: float | None       # "left by this exit" float vs int8; None for the last exit
    decision_agreement_upper: float | None
    float_accuracy: float | None
    int8_accuracy: float | None
    accuracy_drop: dict[str, Any] | None   # float - int8 accuracy in pp with its bounds (see accuracy_drop)


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
    failed_tolerances: list[str] = field(default_factory=list)  # names of the Tolerances fields missed

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


class _Judge:
    """Checks measured values against the tolerances; collects one message per miss, naming the tolerance."""

    def __init__(self, tolerances: Tolerances):
        self.tol = tolerances
        self.failures: list[str] = []
        self.names: list[str] = []

    def _fail(self, name: str, message: str) -> None:
        self.failures.append(message)
        if name not in self.names:
            self.names.append(name)

    def logits(self, where: str, errors: dict[str, float]) -> None:
        if errors["logit_error"] > self.tol.max_logit_error:
            self._fail("max_logit_error", f"{where}: RMS logit error {100 * errors['logit_error']:.2f} % of the float "
                                          f"logit range > max_logit_error {100 * self.tol.max_logit_error:g} %")

    def top1(self, where: str, agreement: dict[str, Any]) -> None:
        upper = agreement["top1_agreement_clear_upper"]
        if upper is not None and upper < self.tol.min_top1_agreement:
            self._fail("min_top1_agreement",
                       f"{where}: top-1 agreement {100 * agreement['top1_agreement_clear']:.2f} % on the "
                       f"{agreement['clear_images']} images without a near-tie (at most {100 * upper:.2f} % at "
                       f"{100 * self.tol.confidence_level:g} % confidence) < min_top1_agreement "
                       f"{100 * self.tol.min_top1_agreement:g} %")

    def decisions(self, where: str, value: float, upper: float) -> None:
        if upper < self.tol.min_decision_agreement:
            self._fail("min_decision_agreement",
                       f"{where}: exit-decision agreement {100 * value:.2f} % (at most {100 * upper:.2f} % at "
                       f"{100 * self.tol.confidence_level:g} % confidence) < min_decision_agreement "
                       f"{100 * self.tol.min_decision_agreement:g} %")

    def drop(self, where: str, drop: dict[str, Any] | None) -> None:
        if drop is not None and drop["lower_pp"] > self.tol.max_accuracy_drop_pp:
            self._fail("max_accuracy_drop_pp",
                       f"{where}: int8 accuracy {drop['pp']:.2f} pp below float (at least {drop['lower_pp']:.2f} pp "
                       f"at {100 * self.tol.confidence_level:g} % confidence) > max_accuracy_drop_pp "
                       f"{self.tol.max_accuracy_drop_pp:g} pp")


def compare(flt: FloatOutputs, q: Int8Outputs, labels: np.ndarray | None, scores: Sequence[str],
            rule: ExitRuleSpec, tolerances: Tolerances = Tolerances()) -> VerificationReport:
    """Compare float and int8 outputs; list every tolerance that is not met (see :class:`Tolerances`)."""
    n = len(flt.logits[0])
    last = len(flt.logits) - 1
    conf = tolerances.confidence_level
    exit_rule = rule_from_spec(rule)
    ef, pf = exit_rule.simulate(_trace(flt.logits, flt.confidence, scores))
    eq, pq = exit_rule.simulate(_trace(q.logits, q.confidence, scores))
    judge = _Judge(tolerances)

    def drop(pred_f: np.ndarray, pred_q: np.ndarray) -> dict[str, Any] | None:
        return None if labels is None else accuracy_drop(pred_f == labels, pred_q == labels, conf)

    exits = []
    for i in range(last + 1):
        fl, ql = flt.logits[i], q.logits[i]
        conf_err = conf_rel = None
        if flt.confidence[i] is not None and q.confidence[i] is not None:
            conf_err = float(np.max(np.abs(_sigmoid(flt.confidence[i]) - _sigmoid(q.confidence[i]))))
            conf_rel = relative_rms_error(flt.confidence[i], q.confidence[i])
        errors = logit_errors(fl, ql)
        agreement = top1_agreement(fl, ql, tolerances.tie_margin, conf)
        decision = decision_upper = None
        if i < last:
            same_decision = int(np.sum((ef <= i) == (eq <= i)))
            decision, decision_upper = same_decision / n, round(rate_bounds(same_decision, n, conf)[1], 6)
        check = ExitCheck(exit=i, **errors, confidence_max_abs_error=conf_err, confidence_error=conf_rel,
                          **agreement, decision_agreement=decision, decision_agreement_upper=decision_upper,
                          float_accuracy=_accuracy(fl.argmax(1), labels), int8_accuracy=_accuracy(ql.argmax(1), labels),
                          accuracy_drop=drop(fl.argmax(1), ql.argmax(1)))
        exits.append(check)
        judge.logits(f"exit {i}", errors)
        judge.top1(f"exit {i}", agreement)
        if decision is not None:
            judge.decisions(f"exit {i}", decision, decision_upper)
    judge.drop(f"final exit {last}", exits[-1].accuracy_drop)
    early = {"exit_agreement": float(np.mean(ef == eq)), "answer_agreement": float(np.mean(pf == pq)),
             "float_accuracy": _accuracy(pf, labels), "int8_accuracy": _accuracy(pq, labels),
             "accuracy_drop": drop(pf, pq),
             "float_exit_fractions": [float(np.mean(ef == i)) for i in range(last + 1)],
             "int8_exit_fractions": [float(np.mean(eq == i)) for i in range(last + 1)]}
    if last > 0:  # with one exit the early-exit decision is the final exit
        judge.drop("early-exit decision", early["accuracy_drop"])
    mono = None
    if q.monolithic is not None:
        mf, mq = flt.monolithic, q.monolithic
        errors = logit_errors(mf, mq)
        agreement = top1_agreement(mf, mq, tolerances.tie_margin, conf)
        mono = {**errors, **agreement, "float_accuracy": _accuracy(mf.argmax(1), labels),
                "int8_accuracy": _accuracy(mq.argmax(1), labels), "accuracy_drop": drop(mf.argmax(1), mq.argmax(1))}
        judge.logits("monolithic", errors)
        judge.top1("monolithic", agreement)
        judge.drop("monolithic", mono["accuracy_drop"])
    return VerificationReport(samples=n, rule={"kind": rule.kind, "thresholds": list(rule.thresholds),
                                               "exit": rule.exit},
                              tolerances=asdict(tolerances), exits=exits, early_exit=early, monolithic=mono,
                              failures=judge.failures, failed_tolerances=judge.names)


def _drop_text(drop: dict[str, Any] | None) -> str:
    return "-" if drop is None else f"{drop['pp']:+.2f} [{drop['lower_pp']:+.2f}, {drop['upper_pp']:+.2f}]"


def format_table(report: VerificationReport) -> str:
    """The verification report as a fixed-width text table (for stdout)."""
    def pct(v: float | None, digits: int = 1) -> str:
        return "-" if v is None else f"{100 * v:.{digits}f}%"

    tol = report.tolerances
    bounds = f"one-sided {100 * tol.get('confidence_level', 0.95):g} % bounds"
    lines = [(f"verification on {report.samples} held-out images (rule {report.rule['kind']} "
              f"{report.rule['thresholds']}):"),
             (f"{'exit':>4}  {'logit_err':>9}  {'max_err':>7}  {'conf_err':>8}  {'top1_agree':>10}  "
              f"{'top1_clear':>16}  {'decision_agree':>14}  {'acc_float':>9}  {'acc_int8':>8}  drop_pp [bounds]")]
    for e in report.exits:
        clear = f"{pct(e.top1_agreement_clear)} of {e.clear_images}"
        lines.append(f"{e.exit:>4}  {pct(e.logit_error, 2):>9}  {pct(e.logit_max_error):>7}  "
                     f"{pct(e.confidence_error, 2):>8}  {pct(e.top1_agreement):>10}  {clear:>16}  "
                     f"{pct(e.decision_agreement):>14}  {pct(e.float_accuracy):>9}  {pct(e.int8_accuracy):>8}  "
                     f"{_drop_text(e.accuracy_drop)}")
    ee = report.early_exit
    lines.append(f"early exit: exit agreement {pct(ee['exit_agreement'])}, accuracy float "
                 f"{pct(ee['float_accuracy'])} int8 {pct(ee['int8_accuracy'])} (drop_pp "
                 f"{_drop_text(ee.get('accuracy_drop'))}), exit fractions float "
                 f"{[round(v, 3) for v in ee['float_exit_fractions']]} int8 "
                 f"{[round(v, 3) for v in ee['int8_exit_fractions']]}")
    if report.monolithic is not None:
        m = report.monolithic
        lines.append(f"monolithic: logit_err {pct(m['logit_error'], 2)}, top-1 agreement {pct(m['top1_agreement'])} "
                     f"({pct(m['top1_agreement_clear'])} of {m['clear_images']} clear), accuracy float "
                     f"{pct(m['float_accuracy'])} int8 {pct(m['int8_accuracy'])} (drop_pp "
                     f"{_drop_text(m['accuracy_drop'])})")
    for h in report.handoffs:
        if not h["equal"]:
            lines.append(f"hand-off {h['from']}->{h['to']}: quantization differs ({h['features']} vs {h['input']}); "
                         "the runtime requantizes")
    lines.append(f"limits: logit_err (RMS int8 - float / float logit range) <= {100 * tol['max_logit_error']:g} %; "
                 f"top1_clear (images whose two best float logits are >= {100 * tol['tie_margin']:g} % of the range "
                 f"apart) >= {100 * tol['min_top1_agreement']:g} % and decision_agree >= "
                 f"{100 * tol['min_decision_agreement']:g} % (upper bounds); drop_pp <= {tol['max_accuracy_drop_pp']:g} pp "
                 f"(lower bound); {bounds}")
    lines.append("PASSED" if report.passed else "FAILED: " + "; ".join(report.failures))
    return "\n".join(lines)
