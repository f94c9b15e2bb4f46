"""Exit rules on synthetic traces: decide == simulate, class-exclusion semantics, threshold validation."""

from __future__ import annotations

import numpy as np
import pytest

from edgeexit import (ClassExclusionRule, ConfidenceRule, EntropyRule, FinalExitRule, FixedExitRule, MaxSoftmaxRule,
                      Trace, UsageError, rule_from_spec)
from edgeexit.runtime.manifest import ExitRuleSpec
from edgeexit.runtime.rules import CONTINUE


def _trace(n=300, k=6, exits=3, scores=("sigmoid", "sigmoid", "softmax"), seed=0) -> Trace:
    rng = np.random.default_rng(seed)
    logits = tuple((rng.normal(0, 1 + 2 * e, (n, k))).astype(np.float32) for e in range(exits))
    conf = tuple(rng.normal(0, 2, n).astype(np.float32) for _ in range(exits))
    return Trace(logits=logits, confidence=conf, scores=tuple(scores[:exits]))


def _per_input(rule, trace):
    rule.prepare(trace.num_exits, trace.scores, [True] * trace.num_exits)
    out = []
    for i in range(trace.num_inputs):
        state = rule.begin(trace.logits[0].shape[1])
        for k in range(trace.num_exits):
            label = rule.decide(k, trace.logits[k][i].copy(), trace.confidence[k][i:i + 1].copy(), state)
            if label != CONTINUE:
                out.append((k, label))
                break
    return out


RULES = [ConfidenceRule([0.6, 0.7]), MaxSoftmaxRule([0.5, 0.6]), EntropyRule([1.0, 0.8]),
         ClassExclusionRule([0.5, 0.8]), ClassExclusionRule([0.0, 1.0]), FinalExitRule(), FixedExitRule(1)]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: repr(r))
def test_decide_equals_simulate(rule):
    trace = _trace()
    exit_index, prediction = rule.simulate(trace)
    assert _per_input(rule, trace) == list(zip(exit_index.tolist(), prediction.tolist()))
    assert exit_index.max() <= trace.num_exits - 1  # the last exit always exits


def test_class_exclusion_candidate_sets():
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
    trace = _trace()
    with pytest.raises(UsageError, match="has 1 thresholds.*give 2"):
        ConfidenceRule([0.5]).simulate(trace)
    no_conf = Trace(logits=trace.logits, confidence=(None, None, None), scores=trace.scores)
    with pytest.raises(UsageError, match="confidence output"):
        ConfidenceRule([0.5, 0.5]).simulate(no_conf)
    with pytest.raises(UsageError, match="does not exist"):
        FixedExitRule(3).simulate(trace)


def test_rule_from_spec_round_trip():
    for rule in RULES:
        again = rule_from_spec(rule.to_spec())
        assert type(again) is type(rule) and again.thresholds == rule.thresholds
    assert EntropyRule([2.0, 3.5]).thresholds == (2.0, 3.5)  # entropy has no upper bound


def test_confidence_thresholds_at_the_ends():
    trace = _trace()
    assert (ConfidenceRule([0.0, 0.0]).simulate(trace)[0] == 0).all()
    assert (ConfidenceRule([1.0, 1.0]).simulate(trace)[0] == 2).all()
