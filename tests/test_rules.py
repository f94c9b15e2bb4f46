"""Exit rules on synthetic traces: decide == simulate, class-exclusion semantics, threshold validation."""

from __future__ import annotations

import numpy as np
import pytest

from edgeexit import (ClassExclusionRule, ConfidenceRule, EntropyRule, FinalExitRule, FixedExitRule, MaxSoftmaxRule,
                      Trace, UsageError, rule_from_spec)
from edgeexit.runtime.manifest import ExitRuleSpec
from edgeexit.runtime.rules import CONTINUE, ForcedExitRule
from edgeexit.runtime.trace import ExitQuant, RawOutputs, unsigned

pytestmark = pytest.mark.runtime  # numpy, Pillow, click and a TFLite interpreter only (device/legacy runs)


def _raw_trace(n=400, k=6, exits=3, scores=("sigmoid", "sigmoid", "softmax"), dtype="int8", seed=0) -> Trace:
    """A trace as a Runner records it: raw integer outputs with their quantization, plus dequantized floats."""
    rng = np.random.default_rng(seed)
    lo, hi = {"int8": (-128, 128), "uint8": (0, 256), "int16": (-32768, 32768)}[dtype]
    f = 256 if dtype == "int16" else 1   # int16: the same real values on 256 times finer steps
    quant, logits_q, conf_q = [], [], []
    for e in range(exits):
        scale = float(rng.uniform(0.02, 0.3)) / f
        zp = int(rng.integers(lo + 20 * f, hi - 20 * f))
        centre = rng.normal(zp, 10 * f, (n, 1))
        q = np.clip(np.rint(centre + rng.normal(0, (3 + 12 * e) * f, (n, k))), lo, hi - 1).astype(dtype)
        c_scale, c_zp = float(rng.uniform(0.01, 0.1)) / f, int(rng.integers(lo + 20 * f, hi - 20 * f))
        c = np.clip(np.rint(rng.normal(c_zp, 40 * f, n)), lo, hi - 1).astype(dtype)
        quant.append(ExitQuant(scale=scale, zero_point=zp, dtype=dtype, num_classes=k, scores=scores[e],
                               confidence=(c_scale, c_zp, dtype)))
        logits_q.append(q)
        conf_q.append(c)
    raw = RawOutputs(tuple(logits_q), tuple(conf_q), tuple(quant))
    return Trace(logits=tuple((x.byte_values()[unsigned(q)]).astype(np.float32) for x, q in zip(quant, logits_q)),
                 confidence=tuple(x.confidence_byte_values()[unsigned(c)].astype(np.float32)
                                  for x, c in zip(quant, conf_q)),
                 scores=tuple(scores[:exits]), raw=raw)


def _per_input(rule, trace):
    """The device's decisions: the compiled decider, one input at a time, on raw bytes."""
    decider = rule.compile(trace.raw.quant)
    out = []
    for i in range(trace.num_inputs):
        state = decider.start()
        for k in range(trace.num_exits):
            if not decider.inspects[k]:
                continue
            conf = trace.raw.confidence[k][i:i + 1].copy()
            label, state = decider.decide(k, trace.raw.logits[k][i].tolist(), conf, state)
            if label != CONTINUE:
                out.append((k, label))
                break
    return out


RULES = [ConfidenceRule([0.6, 0.7]), MaxSoftmaxRule([0.5, 0.6]), MaxSoftmaxRule([0.0, 1.0]), EntropyRule([1.0, 0.8]),
         EntropyRule([0.0, 5.0]), ClassExclusionRule([0.5, 0.8]), ClassExclusionRule([0.0, 1.0]),
         ClassExclusionRule([0.05, 0.3]), FinalExitRule(), FixedExitRule(1),
         ForcedExitRule(ClassExclusionRule([0.5, 0.8]), 2), ForcedExitRule(EntropyRule([1.0, 0.8]), 1)]


def _uses_class_exclusion(rule) -> bool:
    return "ClassExclusion" in repr(rule)


def _with_dtypes(rules, dtypes):
    """(rule, dtype, ...) cases; class_exclusion is refused on int16 outputs (test_class_exclusion_refuses_int16),
    so it has no int16 cases."""
    return [pytest.param(r, *d, id=f"{r!r}-{'-'.join(map(str, d))}") for r in rules for d in dtypes
            if not (d[0] == "int16" and _uses_class_exclusion(r))]


@pytest.mark.parametrize("rule, dtype, k", _with_dtypes(RULES, [("int8", 6), ("uint8", 6), ("int8", 70), ("int16", 6),
                                                                ("int16", 70)]))
def test_per_input_decisions_equal_simulate_on_raw_outputs(rule, dtype, k):
    trace = _raw_trace(dtype=dtype, k=k)
    exit_index, prediction = rule.simulate(trace)
    assert _per_input(rule, trace) == list(zip(exit_index.tolist(), prediction.tolist()))
    assert exit_index.max() <= trace.num_exits - 1  # the last exit always exits


def _float64_reference(rule, trace):
    """Independent float64 re-computation on the dequantized values (the definitions in the rules' docstring)."""
    out = []
    for i in range(trace.num_inputs):
        remaining = np.ones(trace.logits[0].shape[1], bool)
        for k in range(trace.num_exits):
            z = trace.logits[k][i].astype(np.float64)
            if k == trace.num_exits - 1:
                out.append((k, int(np.argmax(np.where(remaining, z, -np.inf)))))
                break
            e = np.exp(z - z.max())
            if rule.kind == "confidence" and 1 / (1 + np.exp(-float(trace.confidence[k][i]))) > rule.thresholds[k]:
                out.append((k, int(np.argmax(z)))); break
            if rule.kind == "max_softmax" and 1 / e.sum() >= rule.thresholds[k]:
                out.append((k, int(np.argmax(z)))); break
            if rule.kind == "entropy" and np.log(e.sum()) - (e * (z - z.max())).sum() / e.sum() < rule.thresholds[k]:
                out.append((k, int(np.argmax(z)))); break
            if rule.kind == "class_exclusion":
                s = 1 / (1 + np.exp(-z)) if trace.scores[k] == "sigmoid" else e / e.sum()
                keep = remaining & (s > rule.thresholds[k] * s.max())
                if keep.any():
                    remaining = keep
                if remaining.sum() == 1:
                    out.append((k, int(np.argmax(remaining)))); break
    return out


@pytest.mark.parametrize("rule, dtype", _with_dtypes(
    [r for r in RULES if r.kind in ("confidence", "max_softmax", "entropy", "class_exclusion")],
    [("int8",), ("int16",)]))
def test_fixed_point_decisions_equal_float64_away_from_ties(rule, dtype):
    """The integer tables decide as float64 maths does; at most a value within 1e-6 of a threshold may differ."""
    trace = _raw_trace(n=600, dtype=dtype)
    got = _per_input(rule, trace)
    want = _float64_reference(rule, trace)
    assert sum(a != b for a, b in zip(got, want)) <= 1


def test_int16_outputs_span_both_signs_and_wrap_like_uint16():
    """The int16 traces above reach negative and positive values and top-to-class distances past 255, so the
    65536-entry tables are indexed through their wrap-around (a negative value -x indexes entry 65536 - x)."""
    trace = _raw_trace(dtype="int16")
    q = np.concatenate([x.ravel() for x in trace.raw.logits]).astype(np.int32)
    c = np.concatenate([x.ravel() for x in trace.raw.confidence]).astype(np.int32)
    assert q.min() < -256 and q.max() > 256 and c.min() < 0 < c.max()
    wide = [q.astype(np.int32) for q in trace.raw.logits]
    d = np.concatenate([(x.max(axis=1, keepdims=True) - x).ravel() for x in wide])
    assert d.max() > 255
    x = trace.raw.quant[0]
    values = x.byte_values()
    assert values.shape == (65536,)
    assert values[np.uint16(np.int16(-5).view(np.uint16))] == x.scale * (-5 - x.zero_point)
    assert values[int(np.int16(-5))] == values[65536 - 5]   # Python's negative index == the uint16 view


def test_class_exclusion_refuses_int16():
    trace = _raw_trace(dtype="int16")
    for rule in (ClassExclusionRule([0.5, 0.8]), ForcedExitRule(ClassExclusionRule([0.5, 0.8]), 2)):
        with pytest.raises(UsageError, match="class_exclusion' runs on int8 bundles only") as info:
            rule.simulate(trace)
        assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="int8 bundles only"):
        ClassExclusionRule([0.5, 0.8]).kept(trace, 0)


def test_class_exclusion_candidate_sets():
    """Float traces (a float network) follow the same definition in float64."""
    rule = ClassExclusionRule([0.5, 0.5])
    big = 6.0
    # input 0: exit 0 leaves classes {0, 1}; exit 1 keeps only class 1 -> answer 1 at exit 1
    # input 1: exit 0 keeps {2}: one class left -> answer 2 at exit 0
    # input 2: exit 0 keeps {0, 3}; exit 1's set {1} does not intersect -> R stays {0, 3}; final argmax over R
    l0 = np.array([[big, big, -big, -big], [-big, -big, big, -big], [big, -big, -big, big]], np.float32)
    l1 = np.array([[-big, big, -big, -big], [0, 0, 0, 0], [-big, big, -big, -big]], np.float32)
    l2 = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 9, 0, 2]], np.float32)
    trace = Trace(logits=(l0, l1, l2), confidence=(None, None, None), scores=("sigmoid", "sigmoid", "softmax"))
    exit_index, prediction = rule.simulate(trace)
    assert exit_index.tolist() == [1, 0, 2]
    assert prediction.tolist() == [1, 2, 3]  # input 2: class 1 has the top final logit but left R


@pytest.mark.parametrize("make, match", [
    (lambda: ConfidenceRule([1.2]), "out of range"),
    (lambda: ConfidenceRule([-0.1]), "out of range"),
    (lambda: MaxSoftmaxRule([float("nan")]), "out of range"),
    (lambda: EntropyRule([-1.0]), "out of range"),
    (lambda: ClassExclusionRule([1.01]), "out of range"),
    (lambda: ConfidenceRule("0.5"), "sequence"),
    (lambda: ConfidenceRule([True]), "not a number"),
    (lambda: FixedExitRule(-1), "exit"),
    (lambda: rule_from_spec(ExitRuleSpec("fixed", ())), "exit index"),
    (lambda: FinalExitRule().with_thresholds([0.5]), "no thresholds"),
], ids=["conf-high", "conf-neg", "nan", "entropy-neg", "beta", "string", "bool", "fixed-neg", "fixed-spec", "final"])
def test_invalid_thresholds_raise_usage_error(make, match):
    with pytest.raises(UsageError, match=match) as info:
        make()
    assert "\n" not in str(info.value)


def test_rules_check_that_they_fit_the_bundle():
    trace = _raw_trace()
    with pytest.raises(UsageError, match="has 1 thresholds.*give 2"):
        ConfidenceRule([0.5]).simulate(trace)
    no_conf = Trace(logits=trace.logits, confidence=(None, None, None), scores=trace.scores)
    with pytest.raises(UsageError, match="confidence output"):
        ConfidenceRule([0.5, 0.5]).simulate(no_conf)
    with pytest.raises(UsageError, match="does not exist"):
        FixedExitRule(3).simulate(trace)


def test_rule_from_spec_round_trip():
    for rule in (r for r in RULES if r.kind != "forced"):
        again = rule_from_spec(rule.to_spec())
        assert type(again) is type(rule) and again.thresholds == rule.thresholds
    assert EntropyRule([2.0, 3.5]).thresholds == (2.0, 3.5)  # entropy has no upper bound
    with pytest.raises(UsageError, match="cannot be stored"):
        ForcedExitRule(FinalExitRule(), 0).to_spec()


def test_confidence_thresholds_at_the_ends():
    trace = _raw_trace()
    assert (ConfidenceRule([0.0, 0.0]).simulate(trace)[0] == 0).all()
    assert (ConfidenceRule([1.0, 1.0]).simulate(trace)[0] == 2).all()
