"""The Runner on a real converted bundle: MACs, exit decisions, run-time thresholds, inputs, statistics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import edgeexit
from edgeexit import (ClassExclusionRule, ConfidenceRule, EntropyRule, FinalExitRule, FixedExitRule, InputError,
                      MaxSoftmaxRule, Runner, UsageError)

pytestmark = pytest.mark.runtime  # numpy, Pillow, click and a TFLite interpreter only (device/legacy runs)


@pytest.fixture(scope="module")
def runner(bundle_dir) -> Runner:
    return Runner(bundle_dir, power_sensor=None, board="rpi4")


@pytest.fixture(scope="module")
def images(runner) -> list[np.ndarray]:
    h, w = runner.manifest.preprocessing.size
    c = runner.manifest.preprocessing.channels
    rng = np.random.default_rng(0)
    out = []
    for i in range(40):  # smooth gratings of several orientations, plus noise: varied exits
        yy, xx = np.mgrid[0:h, 0:w]
        angle = np.pi * i / 10
        g = 127.5 + 100 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (0.3 + 0.05 * (i % 4)))
        g = g[:, :, None] + rng.normal(0, 10 + 5 * (i % 5), (h, w, c))
        out.append(np.clip(g, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def trace(runner, images):
    return runner.trace(images)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x.astype(np.float64)))


def _softmax(x):
    e = np.exp(x.astype(np.float64) - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _between(values) -> float:
    """A threshold halfway between two neighbouring distinct values near the median (never on a value)."""
    u = np.unique(np.asarray(values, np.float64))
    if len(u) < 2:
        return float(u[0]) + 1e-3
    j = max(1, len(u) // 2)
    return float((u[j - 1] + u[j]) / 2)


def _mixing_rules(trace):
    """One rule per kind, thresholds between the middle values of each exit's statistic (mixed exits)."""
    E = trace.num_exits
    rules = {}
    if all(c is not None for c in trace.confidence[:-1]):
        rules["confidence"] = ConfidenceRule([_between(_sigmoid(trace.confidence[k])) for k in range(E - 1)])
    rules["max_softmax"] = MaxSoftmaxRule([_between(_softmax(trace.logits[k]).max(-1)) for k in range(E - 1)])
    ent = [-(p * np.log(np.clip(p, 1e-30, None))).sum(-1) for p in (_softmax(trace.logits[k]) for k in range(E - 1))]
    rules["entropy"] = EntropyRule([_between(h) for h in ent])
    rules["class_exclusion"] = ClassExclusionRule([0.6] * (E - 1))
    rules["final"] = FinalExitRule()
    for k in range(E):
        rules[f"fixed{k}"] = FixedExitRule(k)
    return rules


def _reference(rule, trace, i):
    """Plain-numpy re-computation of rule on input i from the trace (independent of edgeexit.runtime.rules)."""
    E = trace.num_exits
    kind = rule.kind
    remaining = np.ones(trace.logits[0].shape[1], bool)
    for k in range(E):
        z = trace.logits[k][i]
        if k == E - 1:
            if kind == "class_exclusion":
                return k, int(np.argmax(np.where(remaining, z, -np.inf)))
            return k, int(np.argmax(z))
        if kind == "confidence" and _sigmoid(trace.confidence[k][i]) > rule.thresholds[k]:
            return k, int(np.argmax(z))
        p = _softmax(z)
        if kind == "max_softmax" and p.max() >= rule.thresholds[k]:
            return k, int(np.argmax(z))
        if kind == "entropy" and -(p * np.log(np.clip(p, 1e-30, None))).sum() < rule.thresholds[k]:
            return k, int(np.argmax(z))
        if kind == "fixed" and k == rule.exit:
            return k, int(np.argmax(z))
        if kind == "class_exclusion":
            s = _sigmoid(z) if trace.scores[k] == "sigmoid" else p
            keep = remaining & (s > rule.thresholds[k] * s.max())
            if keep.any():
                remaining = keep
            if remaining.sum() == 1:
                return k, int(np.argmax(remaining))
    raise AssertionError("unreachable")


def test_runner_decisions_equal_numpy_recomputation_and_simulate_for_every_rule(runner, images, trace):
    seen_exits = set()
    for name, rule in _mixing_rules(trace).items():
        runner.set_rule(rule)
        results = [runner(img) for img in images]
        sim_exit, sim_pred = rule.simulate(trace)
        for i, r in enumerate(results):
            ref = _reference(rule, trace, i)
            # thresholds lie between distinct values, so float32 (runtime) and float64 (reference) agree
            assert (r.exit_index, r.label) == ref, (name, i)
            assert (r.exit_index, r.label) == (int(sim_exit[i]), int(sim_pred[i])), (name, i)
            seen_exits.add(r.exit_index)
    assert seen_exits == set(range(runner.num_exits))


def test_macs_are_the_manifest_costs_of_the_stages_that_ran(runner, images):
    m = runner.manifest
    for k in range(runner.num_exits):
        runner.set_rule(FixedExitRule(k))
        r = runner(images[0])
        want = sum(s.costs.segment_macs + s.costs.head_macs for s in m.stages[:k + 1])
        assert (r.exit_index, r.stages_run, r.macs) == (k, k + 1, want)
        assert r.latency_ms > 0
    assert r.macs == m.cumulative_macs()[-1]


def test_thresholds_changed_at_run_time_take_effect(runner, images, trace):
    if not all(c is not None for c in trace.confidence[:-1]):
        runner.set_rule(MaxSoftmaxRule([0.0] * (runner.num_exits - 1)))
    else:
        runner.set_rule(ConfidenceRule([0.5] * (runner.num_exits - 1)))
    runner.set_thresholds([0.0] * (runner.num_exits - 1))  # every input leaves at exit 0
    assert {runner(img).exit_index for img in images[:8]} == {0}
    runner.set_thresholds([1.0] * (runner.num_exits - 1))  # no early exit passes: all run to the end
    assert {runner(img).exit_index for img in images[:8]} == {runner.num_exits - 1}
    with pytest.raises(UsageError, match="out of range"):
        runner.set_thresholds([1.5] * (runner.num_exits - 1))
    with pytest.raises(UsageError, match="thresholds"):
        runner.set_thresholds([0.5] * runner.num_exits)


def test_probabilities_and_score_match_the_trace(runner, images, trace):
    runner.set_rule(FinalExitRule())
    r = runner.classify(images[3])
    p = _softmax(trace.logits[-1][3]) if trace.scores[-1] == "softmax" else _sigmoid(trace.logits[-1][3])
    np.testing.assert_allclose(r.probabilities, p, rtol=1e-5, atol=1e-6)
    assert r.score == pytest.approx(float(p[r.label]), rel=1e-5)
    assert r.label_name == runner.labels[r.label]


def test_every_input_kind_gives_the_same_answer(runner, images, tmp_path):
    from PIL import Image

    img = images[5]
    runner.set_rule(FinalExitRule())
    mode = runner.manifest.preprocessing.color_mode
    pil = Image.fromarray(img[:, :, 0] if mode == "L" else img, mode)
    pil.save(tmp_path / "x.png")
    q = runner.preprocess(img)
    assert q.dtype == np.int8 and q.shape == img.shape
    # float pixels in [0, 1] quantize to within one step of the uint8 lookup table
    assert np.abs(runner.preprocess(img.astype(np.float32) / 255).astype(int) - q).max() <= 1
    for variant in (img[None], pil, str(tmp_path / "x.png"), tmp_path / "x.png"):
        np.testing.assert_array_equal(runner.preprocess(variant), q)
    labels = {runner(v).label for v in (img, img[None], pil, str(tmp_path / "x.png"))}
    assert len(labels) == 1
    # a larger image file is resized
    big = Image.fromarray(np.kron(img[:, :, 0] if mode == "L" else img, np.ones((2, 2, 1)[:img.ndim - 1], np.uint8)))
    big.save(tmp_path / "big.png")
    h, w = runner.manifest.preprocessing.size
    small = np.asarray(big.resize((w, h), Image.BILINEAR)).reshape(img.shape)  # what "resized with Pillow" means
    np.testing.assert_array_equal(runner.preprocess(str(tmp_path / "big.png")), runner.preprocess(small))
    assert runner(str(tmp_path / "big.png")).label == runner(small).label


@pytest.mark.parametrize("make, match", [
    (lambda h, w, c: np.zeros((h + 1, w, c), np.uint8), "pixels"),
    (lambda h, w, c: np.zeros((h, w, c + 1), np.uint8), "channels"),
    (lambda h, w, c: np.zeros((2, h, w, c), np.uint8), "batch"),
    (lambda h, w, c: np.zeros((h, w, c), np.int32), "dtype"),
    (lambda h, w, c: np.full((h, w, c), np.nan, np.float32), "NaN"),
    (lambda h, w, c: np.full((h, w, c), np.inf, np.float32), "NaN or Inf"),
    (lambda h, w, c: np.full((h, w, c), 200.0, np.float32), "range"),
    (lambda h, w, c: [[1, 2]], "cannot classify"),
], ids=["size", "channels", "batch", "dtype", "nan", "inf", "float-range", "list"])
def test_bad_inputs_raise_input_error_with_one_line(runner, make, match):
    h, w = runner.manifest.preprocessing.size
    with pytest.raises(InputError, match=match) as info:
        runner(make(h, w, runner.manifest.preprocessing.channels))
    assert "\n" not in str(info.value)


def test_bad_files_raise_input_error(runner, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    for name, match in (("missing.png", "no such file"), ("notes.png", "not an image"), ("cut.png", "image")):
        with pytest.raises(InputError, match=match):
            runner(str(tmp_path / name))


def test_stats_count_exits_and_are_json(runner, images, trace):
    runner.set_rule(_mixing_rules(trace)["max_softmax"])
    runner.reset_stats()
    results = [runner(img) for img in images]
    d = json.loads(json.dumps(runner.stats.to_dict()))
    assert d["total"] == len(images)
    counts = np.bincount([r.exit_index for r in results], minlength=runner.num_exits)
    assert [e["count"] for e in d["exits"]] == counts.tolist()
    assert sum(e["share"] for e in d["exits"]) == pytest.approx(1.0)
    assert d["mean_macs"] == pytest.approx(np.mean([r.macs for r in results]))


def test_load_warms_up_without_counting_it(bundle_dir, images):
    """The load runs a zero image through every stage and the monolithic model (first-call costs paid there), yet
    the statistics start empty and the first counted input is the caller's."""
    fresh = Runner(bundle_dir, power_sensor=None)
    assert fresh.stats.total == 0 and fresh._mono is not None
    fresh(images[0])
    assert fresh.stats.to_dict()["total"] == 1


def test_trace_records_every_exit(runner, images, trace):
    assert trace.num_inputs == len(images) and trace.num_exits == runner.num_exits
    assert trace.stage_latency_ms.shape == (len(images), runner.num_exits)
    assert all(l.shape == (len(images), runner.manifest.num_classes) and l.dtype == np.float32 for l in trace.logits)
    labels = np.array([0, 1, 2, 3])
    labelled = runner.trace(images[:4], labels=labels)
    final = np.argmax(labelled.logits[-1], axis=1)                          # [4] the last exit's answers
    assert labelled.accuracy(FinalExitRule().simulate(labelled)[1]) == np.mean(final == labels)
    assert labelled.accuracy(np.array([0, 1, 2, 9])) == 0.75
    with pytest.raises(UsageError, match="labels"):
        runner.trace(images[:2], labels=[1])


def test_monolithic_runs_with_the_same_preprocessing(runner, images):
    from edgeexit.runtime.interpreter import create_interpreter

    assert runner.has_monolithic  # the session bundle is converted with its monolithic model
    # a fresh interpreter of monolithic.tflite fed the same int8 input (the Runner's own cannot use set_tensor)
    interp = create_interpreter(runner.bundle.monolithic_file, runner.backend)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    m = runner.manifest
    assert m.monolithic.input.quantization == m.stages[0].input.quantization  # so runner.preprocess is its input
    for img in images[:10]:
        interp.set_tensor(inp["index"], runner.preprocess(img)[None])
        interp.invoke()
        want = int(np.argmax(interp.get_tensor(out["index"])[0]))
        r = runner.run_monolithic(img)
        assert r.label == want and r.latency_ms > 0
        assert r.label_name == runner.labels[want]


def test_a_bundle_without_monolithic_model_refuses_run_monolithic(bundle_without_monolithic, images):
    from edgeexit import BundleError

    runner = Runner(bundle_without_monolithic, power_sensor=None)
    assert not runner.has_monolithic
    assert runner(images[0]).exit_index in range(runner.num_exits)  # the early-exit path is unaffected
    message = "this bundle has no monolithic.tflite; re-convert with the monolithic baseline to compare against it"
    for call, arg in ((runner.run_monolithic, images[0]), (runner.run_monolithic_batch, np.stack(images[:2]))):
        with pytest.raises(BundleError) as info:
            call(arg)
        assert str(info.value) == message


def test_bundle_rule_and_operating_points(bundle_dir):
    runner = Runner(bundle_dir, power_sensor=None)
    assert runner.rule.kind == runner.manifest.exit_rule.kind
    with pytest.raises(UsageError, match="operating point"):
        runner.set_rule("no-such-point")
    with pytest.raises(UsageError, match="exit 99"):
        runner.set_rule(FixedExitRule(99))


#: The whole public API of ``import edgeexit`` (a name added or dropped is an API change: update README and this).
PUBLIC_API = {
    "Runner", "Result", "MonolithicResult", "Energy", "EnergyModel", "load_bundle", "write_manifest_atomic", "Bundle",
    "Manifest", "ExitRule", "ConfidenceRule", "MaxSoftmaxRule", "EntropyRule", "ClassExclusionRule", "FinalExitRule",
    "FixedExitRule", "rule_from_spec", "Trace", "EdgeExitError", "UsageError", "BundleError", "InputError",
    "InterpreterError", "TuningError", "__version__"}


def test_public_api_is_small_and_explicit():
    assert len(edgeexit.__all__) == len(set(edgeexit.__all__))
    assert set(edgeexit.__all__) == PUBLIC_API
    namespace: dict = {}
    exec("from edgeexit import *", namespace)  # every listed name resolves
    assert set(namespace) - {"__builtins__"} == PUBLIC_API
    assert issubclass(edgeexit.BundleError, edgeexit.EdgeExitError) and callable(edgeexit.Runner)


def test_batch_answers_equal_one_by_one_for_every_rule(runner, images, trace):
    batch = np.stack(images)                                   # [B, H, W, C] uint8
    for name, rule in _mixing_rules(trace).items():
        runner.set_rule(rule)
        one = [runner(img) for img in images]
        for got in (runner.classify_batch(batch), runner.classify_batch(list(images))):
            assert got.labels.tolist() == [r.label for r in one], name
            assert got.exit_index.tolist() == [r.exit_index for r in one], name
            assert got.macs.tolist() == [r.macs for r in one], name
            np.testing.assert_allclose(got[7].probabilities, one[7].probabilities, rtol=1e-6)
            assert got[7].label_name == one[7].label_name
    assert len(runner.classify_batch(batch[:0])) == 0


def test_fast_input_path_equals_the_preprocessor(runner, images):
    """uint8 arrays of the bundle's size skip the general preprocessing; the int8 input must be identical."""
    stage0 = runner._stages[0].inp
    h, w = runner.manifest.preprocessing.size
    for img in images[:5]:
        for variant in (img, img[None]) + ((img[:, :, 0],) if img.shape[2] == 1 else ()):
            stage0.fill(0)
            runner._input.write(variant)
            np.testing.assert_array_equal(stage0[0], runner.preprocess(img))
    noncontig = np.asfortranarray(images[0])
    assert runner(noncontig).label == runner(np.ascontiguousarray(images[0])).label


def test_one_runner_shared_by_threads_answers_like_one_thread(runner, images, trace):
    import threading

    runner.set_rule(_mixing_rules(trace)["class_exclusion"])
    want = [(r.label, r.exit_index) for r in (runner(img) for img in images)]
    wrong, errors = [], []

    def work(seed: int) -> None:
        order = np.random.default_rng(seed).permutation(len(images))
        try:
            for _ in range(125):   # 125 x 40 images = 5,000 calls per thread
                for i in order:
                    r = runner(images[i])
                    if (r.label, r.exit_index) != want[i]:
                        wrong.append(i)
        except Exception as exc:  # noqa: BLE001 - any failure in a thread fails the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong   # 2 threads x 5,000 calls, every answer as in one thread


@pytest.mark.parametrize("x,dof,p", [(3.841459, 1, 0.05), (6.634897, 1, 0.01), (11.070498, 5, 0.05),
                                     (43.772972, 30, 0.05), (0.0, 3, 1.0)], ids=["1dof", "1dof-1pct", "5dof", "30dof",
                                                                                 "zero"])
def test_chi_square_survival_matches_the_tables(x, dof, p):
    from edgeexit.runtime.stats import chi2_sf

    assert chi2_sf(x, dof) == pytest.approx(p, rel=1e-5)


def test_drift_flags_shifted_inputs_and_not_the_tuning_distribution(tiny_bundle_copy):
    """A point tuned on synthetic digits (exit shares stored with their n, as `tune` stores them): new samples of
    the same task raise no drift, noise images and a different class mix do."""
    from synthetic import synthetic_digits
    from edgeexit.runtime.bundle import read_manifest, write_manifest_atomic
    from edgeexit.runtime.points import NamedPoint, OperatingPoint, OperatingPoints

    images, labels = synthetic_digits(600, seed=11)
    trace = Runner(tiny_bundle_copy, power_sensor=None).trace(images, labels)
    top = [np.max(np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True), 1)
           for z in trace.logits]
    thresholds = tuple(float(np.quantile(t, 0.5)) for t in top[:-1])   # sends the tuning images to every exit
    exits, pred = MaxSoftmaxRule(thresholds).simulate(trace)
    shares = np.bincount(exits, minlength=trace.num_exits) / exits.size
    assert shares.min() > 0.1
    point = OperatingPoint(rule="max_softmax", thresholds=thresholds, accuracy=float(np.mean(pred == labels)),
                           avg_macs_fraction=0.5, est_latency_ms=0.1, energy_mj=None, exit_fractions=tuple(shares))
    manifest = read_manifest(tiny_bundle_copy)[1]
    stored = NamedPoint({"kind": "max_softmax", "thresholds": list(thresholds)}, metrics=point, data="synthetic",
                        n=600)
    write_manifest_atomic(tiny_bundle_copy, manifest.replace(operating_points=OperatingPoints(named={"tuned": stored})))

    runner = Runner(tiny_bundle_copy, rule="tuned", power_sensor=None)
    assert runner.stats.reference.n == 600

    def drift(batch):
        runner.reset_stats()
        for image in batch:
            runner(image)
        return runner.stats.to_dict()["drift"]

    same = [drift(synthetic_digits(300, seed=seed)[0]) for seed in range(1, 9)]
    assert not any(d["drift"] for d in same), [d["p_value"] for d in same]
    assert all(d["test"].startswith("chi-square homogeneity") and d["dof"] == trace.num_exits - 1 for d in same)
    noise = drift(np.random.default_rng(0).integers(0, 256, (300, 28, 28, 1), dtype=np.uint8))
    assert noise["drift"] and noise["p_value"] < 1e-6
    x, y = synthetic_digits(1000, seed=3)
    assert drift(x[y < 5][:300])["drift"]                      # another class mix
    runner.set_thresholds([0.0] * (trace.num_exits - 1))       # a rule that is not a stored point: no reference
    assert runner.stats.to_dict()["drift"] is None
    from edgeexit.runtime.rules import ForcedExitRule

    runner.set_rule(ForcedExitRule(MaxSoftmaxRule(thresholds), 1))   # bench's timing rules cannot be stored
    assert runner.stats.drift() is None
