"""The most_confident fallback (Shallow-Deep Networks): an input no early exit stops is answered by the exit with the
highest score under the rule's own measure; it still pays for every stage. The default (final) is unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeexit import BundleError, Runner, UsageError
from edgeexit.runtime.manifest import ExitRuleSpec, Manifest
from edgeexit.runtime.rules import RULES, ClassExclusionRule, FinalExitRule, rule_from_spec
from edgeexit.tuning.evaluate import ExitCosts, _LevelEvaluator, evaluate_rule
from edgeexit.tuning.results import Target
from edgeexit.tuning.search import search_front
from synthetic import synthetic_digits, synthetic_trace
from test_rules import _raw_trace

pytestmark = pytest.mark.runtime
ROOT = Path(__file__).resolve().parents[1]
KINDS = ("confidence", "max_softmax", "entropy")


def _numpy_scores(trace, kind: str) -> np.ndarray:
    """[E, N] float64: each exit's score, written out here independently of the rules module."""
    out = []
    for k in range(trace.num_exits):
        if kind == "confidence":
            out.append(1.0 / (1.0 + np.exp(-np.asarray(trace.confidence[k], dtype=np.float64))))
            continue
        z = np.asarray(trace.logits[k], dtype=np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out.append(p.max(axis=1) if kind == "max_softmax" else (p * np.log(np.maximum(p, 1e-300))).sum(axis=1))
    return np.stack(out)


def _median_thresholds(scores: np.ndarray, kind: str) -> list[float]:
    """Thresholds that stop about half of the inputs at each early exit (entropy: H = -score)."""
    med = np.median(scores[:-1], axis=1)
    return [float(-m) for m in med] if kind == "entropy" else [float(m) for m in med]


@pytest.mark.parametrize("source", ["float", "int8", "int16"])
@pytest.mark.parametrize("kind", KINDS)
def test_most_confident_equals_numpy(kind, source):
    trace = synthetic_trace(2000, exits=4) if source == "float" else _raw_trace(n=2000, exits=3, dtype=source)
    scores = _numpy_scores(trace, kind)                                           # [E, N]
    rule = RULES[kind](_median_thresholds(scores, kind), fallback="most_confident")
    left, prediction, answer = rule.simulate_answers(trace)
    plain_left, plain_prediction = RULES[kind](rule.thresholds).simulate(trace)
    last = trace.num_exits - 1
    fell = left == last
    # where inputs leave (and so what they pay) does not change; stopped inputs keep their answer
    np.testing.assert_array_equal(left, plain_left)
    np.testing.assert_array_equal(prediction[~fell], plain_prediction[~fell])
    np.testing.assert_array_equal(answer[~fell], left[~fell])
    # the others: the first exit with the highest score, its argmax
    best = scores.argmax(axis=0)
    argmax = np.stack([np.asarray(z).argmax(axis=1) for z in trace.logits])     # [E, N]
    top2 = np.sort(scores, axis=0)[-2:]
    clear = fell & ((top2[1] - top2[0]) > 1e-9 * np.abs(top2[1]))                 # no near-tie for fixed point to round
    assert fell.sum() > 100 and (best[fell] < last).sum() > 20       # the fallback really answers from earlier exits
    if source == "float":
        clear = fell
    assert clear.sum() >= 0.97 * fell.sum()
    np.testing.assert_array_equal(answer[clear], best[clear])
    np.testing.assert_array_equal(prediction[clear], argmax[best[clear], np.flatnonzero(clear)])
    assert (answer[fell & ~clear] <= last).all()


def test_runner_decisions_equal_simulate(tiny_bundle):
    images = synthetic_digits(240, seed=3)
    images = images[0] if isinstance(images, tuple) else images
    runner = Runner(tiny_bundle, power_sensor=None, board="generic")
    trace = runner.trace(list(images))
    confidence = _numpy_scores(trace, "confidence")
    rule = RULES["confidence"](np.percentile(confidence[:-1], 90, axis=1).tolist(), fallback="most_confident")
    left, prediction, answer = rule.simulate_answers(trace)
    last = trace.num_exits - 1
    assert ((left == last) & (answer < last)).sum() >= 20 and (left < last).sum() >= 20   # both kinds of answer
    runner.set_rule(rule)
    runner.reset_stats()
    results = [runner.classify(x) for x in images]
    np.testing.assert_array_equal(runner.stats.counts, np.bincount(left, minlength=last + 1))   # where they left
    cum = runner.manifest.cumulative_macs()
    np.testing.assert_array_equal([r.label for r in results], prediction)
    np.testing.assert_array_equal([r.exit_index for r in results], answer)
    np.testing.assert_array_equal([r.stages_run for r in results], left + 1)
    np.testing.assert_array_equal([r.macs for r in results], np.asarray(cum)[left])   # paid every stage it ran
    # the score is the answering exit's max softmax, not the last exit's
    max_softmax = _numpy_scores(trace, "max_softmax")
    np.testing.assert_allclose([r.score for r in results], max_softmax[answer, np.arange(len(results))],
                               rtol=1e-6)   # the trace's logits are float32
    batch = runner.classify_batch(np.asarray(images))
    np.testing.assert_array_equal(batch.labels, prediction)
    np.testing.assert_array_equal(batch.exit_index, answer)
    np.testing.assert_array_equal(batch.macs, np.asarray(cum)[left])
    np.testing.assert_allclose([batch[i].probabilities for i in range(len(batch))],
                               [r.probabilities for r in results], atol=0)


def test_default_fallback_is_unchanged(tiny_bundle):
    text = (tiny_bundle / "manifest.json").read_text()
    manifest = Manifest.from_json(text)
    assert manifest.exit_rule.fallback == "final" and "fallback" not in json.loads(text)["exit_rule"]
    assert "fallback" not in manifest.to_dict()["exit_rule"]
    images = synthetic_digits(120, seed=5)
    images = images[0] if isinstance(images, tuple) else images
    runner = Runner(tiny_bundle, power_sensor=None, board="generic")
    trace = runner.trace(list(images))
    left, prediction = rule_from_spec(manifest.exit_rule).simulate(trace)
    results = [runner.classify(x) for x in images]
    np.testing.assert_array_equal([r.label for r in results], prediction)
    np.testing.assert_array_equal([r.exit_index for r in results], left)
    np.testing.assert_array_equal([r.stages_run for r in results], left + 1)
    # the same rule with an explicit "final" fallback answers the same and is written the same
    explicit = ExitRuleSpec(manifest.exit_rule.kind, manifest.exit_rule.thresholds, fallback="final")
    assert explicit.to_dict() == json.loads(text)["exit_rule"]


def test_fallback_round_trips_and_is_dropped_again(tiny_bundle):
    d = json.loads((tiny_bundle / "manifest.json").read_text())
    d["exit_rule"] = {"kind": "entropy", "thresholds": [0.2, 0.2], "exit": None, "fallback": "most_confident"}
    m = Manifest.from_dict(d)
    assert m.exit_rule.fallback == "most_confident"
    assert m.to_dict()["exit_rule"]["fallback"] == "most_confident"
    back = m.replace(exit_rule=ExitRuleSpec("entropy", (0.2, 0.2)))   # the old rule's fallback is not carried over
    assert "fallback" not in back.to_dict()["exit_rule"]
    assert Manifest.from_dict(back.to_dict()).exit_rule.fallback == "final"


@pytest.mark.parametrize("rule, match", [
    ({"kind": "max_softmax", "thresholds": [0.5, 0.5], "fallback": "most_confdent"}, "expected one of final, most_confident"),
    ({"kind": "max_softmax", "thresholds": [0.5, 0.5], "fallback": 3}, "must be str"),
    ({"kind": "class_exclusion", "thresholds": [0.5, 0.5], "fallback": "most_confident"}, "takes 'final' only"),
], ids=["typo", "not-a-string", "class-exclusion"])
def test_bad_fallback_in_manifest_is_one_line(tiny_bundle_copy, rule, match):
    path = tiny_bundle_copy / "manifest.json"
    d = json.loads(path.read_text())
    d["exit_rule"] = rule
    path.write_text(json.dumps(d))
    with pytest.raises(BundleError, match=match) as info:
        Runner(tiny_bundle_copy, power_sensor=None)
    assert "\n" not in str(info.value)
    proc = _cli("info", tiny_bundle_copy)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [proc.stderr.strip()]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeexit", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def test_cli_fallback_typo_lists_the_choices(tiny_bundle, tmp_path):
    proc = _cli("run", tiny_bundle, tmp_path / "none.png", "--fallback", "most_confdent")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "final, most_confident" in proc.stderr and "did you mean 'most_confident'" in proc.stderr
    proc = _cli("run", tiny_bundle, tmp_path / "none.png", "--rule", "final", "--fallback", "most_confident")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "fallback final only" in errors[0], proc.stderr


def test_rules_refuse_a_fallback_they_cannot_score():
    with pytest.raises(UsageError, match="final only"):
        ClassExclusionRule([0.5, 0.5], fallback="most_confident")
    with pytest.raises(UsageError, match="final only"):
        FinalExitRule(fallback="most_confident")
    with pytest.raises(UsageError, match="expected one of final, most_confident"):
        RULES["entropy"]([0.5], fallback="best")


@pytest.mark.parametrize("kind", KINDS)
def test_tuning_evaluator_equals_simulate_with_fallback(kind):
    trace = synthetic_trace(1500, exits=4, seed=2)
    ev = _LevelEvaluator(trace, kind, 12, fallback="most_confident")
    rng = np.random.default_rng(0)
    for _ in range(10):
        levels = rng.integers(0, ev.max_levels() + 1)
        left, correct = ev.outcome(levels)
        spec = ExitRuleSpec(kind, ev.thresholds(levels), fallback="most_confident")
        sim_left, sim_pred = rule_from_spec(spec).simulate(trace)
        np.testing.assert_array_equal(left, sim_left)
        np.testing.assert_array_equal(correct, sim_pred == trace.labels)


def test_search_front_stores_the_fallback():
    trace = synthetic_trace(3000, exits=4, seed=1)
    costs = exit_costs_for(trace)
    target = Target(max_drop_pp=1.0, minimize="macs")
    plain = search_front(trace, costs, "max_softmax", target)
    fb = search_front(trace, costs, "max_softmax", target, fallback="most_confident")
    assert plain.chosen.fallback == "final" and "fallback" not in plain.chosen.to_dict()
    assert fb.chosen.fallback == "most_confident" and fb.chosen.to_dict()["fallback"] == "most_confident"
    assert all(p.fallback == "most_confident" for p in fb.front)
    again = evaluate_rule(trace, ExitRuleSpec("max_softmax", fb.chosen.thresholds, fallback="most_confident"), costs)
    assert again.accuracy == fb.chosen.accuracy and again.avg_macs_fraction == fb.chosen.avg_macs_fraction


def exit_costs_for(trace) -> ExitCosts:
    e = trace.num_exits
    return ExitCosts(macs_fraction=np.linspace(0.25, 1.0, e), latency_ms=np.linspace(0.1, 0.4, e))
