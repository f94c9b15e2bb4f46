"""The accuracy / cost trade-off front of an exit rule on one trace, and the point that meets a target.

The front is built by two greedy walks (from "everything runs to the end" down to "everything leaves at the
first exit", and back up), each step taking the move with the best accuracy-per-cost ratio, then refined for the
target by coordinate descent over every exit's levels (see :mod:`edgeexit.tuning.evaluate`). Every evaluated
point is kept; the Pareto set of (average cost, accuracy) is the front. Costs are linear in the exit histogram,
so every point carries its average MACs fraction, estimated latency and energy.

:func:`search_front` chooses on the tuning data itself (a point estimate); :func:`search_guaranteed` searches on
one part and tests on the other, so that the target holds on new data (:mod:`edgeexit.tuning.guarantee`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from statistics import NormalDist
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import TuningError, UsageError
from ..runtime.manifest import ExitRuleSpec
from ..runtime.points import OperatingPoint
from ..runtime.rules import rule_from_spec
from ..runtime.trace import Trace
from .evaluate import (TUNABLE_RULES, ExitCosts, _ClassExclusionEvaluator, _LevelEvaluator, evaluate_rule,
                       labels_of)
from .guarantee import DROP_SPLIT, Check, Guarantee, check_risk, fixed_sequence, split
from .results import Target, TuneResult, cost_label, fmt_cost

log = logging.getLogger(__name__)

#: Candidate thresholds per exit (quantiles of the exit's statistic), not counting the two ends.
DEFAULT_LEVELS = 64


class _Search:
    """Keeps every evaluated level vector with its correct count and exit histogram."""

    def __init__(self, ev: Any, cost: np.ndarray):
        self.ev = ev
        self.cost = np.asarray(cost, dtype=np.float64)      # [E] cost of leaving at each exit
        self.n = int(ev.labels.shape[0])
        self.seen: dict[tuple[int, ...], tuple[float, float, np.ndarray]] = {}  # levels -> (acc, cost, hist)

    def eval(self, levels: np.ndarray) -> tuple[float, float]:
        key = tuple(int(v) for v in levels)
        hit = self.seen.get(key)
        if hit is None:
            exit_index, correct = self.ev.outcome(np.asarray(key, dtype=np.int64))
            hist = np.bincount(exit_index, minlength=self.ev.num_exits)
            hit = (float(correct.mean()), float(hist @ self.cost) / self.n, hist)
            self.seen[key] = hit
        return hit[0], hit[1]

    def greedy(self, start: np.ndarray, step: int, lookahead: int = 3) -> None:
        """Walk from ``start`` one exit at a time; ``step`` +1 = more permissive (cheaper), -1 = stricter."""
        top = self.ev.max_levels()
        levels = start.copy()
        acc, cost = self.eval(levels)
        while True:
            best: tuple[float, float, np.ndarray] | None = None
            for j in range(levels.size):
                found = 0
                nxt = levels[j] + step
                while 0 <= nxt <= top[j] and found < lookahead:
                    cand = levels.copy()
                    cand[j] = nxt
                    a, c = self.eval(cand)
                    dc = (cost - c) if step > 0 else (c - cost)    # > 0: cost saved (down) or spent (up)
                    da = (a - acc) if step < 0 else (acc - a)      # accuracy gained (up) or lost (down)
                    nxt += step
                    if dc <= 1e-15:
                        continue
                    found += 1
                    score = -da / dc if step > 0 else da / dc      # higher is better
                    if best is None or score > best[0] or (score == best[0] and dc > best[1]):
                        best = (score, dc, cand)
            if best is None:
                return
            levels = best[2]
            acc, cost = self.eval(levels)

    def refine(self, start: np.ndarray, better: Callable[[float, float, float, float], bool], sweeps: int = 4) -> None:
        """Coordinate descent: per exit, try every level with the others fixed; keep the best by ``better``."""
        top = self.ev.max_levels()
        levels = start.copy()
        acc, cost = self.eval(levels)
        for _ in range(sweeps):
            moved = False
            for j in range(levels.size):
                for l in range(int(top[j]) + 1):
                    if l == levels[j]:
                        continue
                    cand = levels.copy()
                    cand[j] = l
                    a, c = self.eval(cand)
                    if better(a, c, acc, cost):
                        levels, acc, cost, moved = cand, a, c, True
            if not moved:
                return

    def front(self) -> list[tuple[tuple[int, ...], float, float, np.ndarray]]:
        """Pareto set sorted by cost ascending: each point strictly more accurate than every cheaper one."""
        items = sorted(self.seen.items(), key=lambda kv: (kv[1][1], -kv[1][0], kv[0]))
        out, best_acc = [], -1.0
        for key, (acc, cost, hist) in items:
            if acc > best_acc + 1e-12:
                if out and cost <= out[-1][2] + 1e-9:      # same cost up to rounding: keep the more accurate
                    out.pop()
                out.append((key, acc, cost, hist))
                best_acc = acc
        return out


def _evaluator(trace: Trace, kind: str, levels: int, fallback: str = "final") -> Any:
    if kind not in TUNABLE_RULES:
        raise UsageError(f"rule {kind!r} cannot be tuned; choose one of {', '.join(TUNABLE_RULES)}")
    if trace.num_exits < 2:
        raise TuningError("the bundle has a single exit; there are no thresholds to tune")
    if trace.num_inputs < 1:
        raise TuningError("the tuning trace is empty; give at least one labelled validation input")
    if kind == "class_exclusion":
        if fallback != "final":
            raise UsageError("rule class_exclusion takes fallback final only; tune it without --fallback, or tune "
                             "confidence, max_softmax or entropy with --fallback most_confident")
        return _ClassExclusionEvaluator(trace, levels)
    return _LevelEvaluator(trace, kind, levels, fallback)


def _point(search: _Search, ev: Any, key: tuple[int, ...], costs: ExitCosts, kind: str,
           fallback: str = "final") -> OperatingPoint:
    acc, _, hist = search.seen[key]
    frac = hist / max(search.n, 1)
    energy = None if costs.energy_mj is None else float(frac @ costs.energy_mj)
    return OperatingPoint(rule=kind, thresholds=ev.thresholds(np.asarray(key)), accuracy=acc,
                          avg_macs_fraction=float(frac @ costs.macs_fraction),
                          est_latency_ms=float(frac @ costs.latency_ms), energy_mj=energy,
                          exit_fractions=tuple(float(f) for f in frac), fallback=fallback)


def _explore(trace: Trace, costs: ExitCosts, rule: str, target: Target, levels: int,
             fallback: str = "final") -> tuple[Any, "_Search", float]:
    """Search the front of ``rule`` on ``trace`` (greedy walks both ways, refined around the target's point).

    Returns (the level evaluator, the search with every evaluated point, the final exit's accuracy)."""
    if not isinstance(levels, int) or levels < 1:
        raise UsageError(f"levels must be a positive integer, got {levels!r}")
    ev = _evaluator(trace, rule, levels, fallback)
    search = _Search(ev, costs.vector(target.cost_kind))
    final_accuracy = float(ev.correct[-1].mean()) if hasattr(ev, "correct") else float(
        (np.asarray(trace.logits[-1]).argmax(axis=-1) == ev.labels).mean())
    search.greedy(np.zeros(trace.num_exits - 1, dtype=np.int64), step=+1)
    search.greedy(ev.max_levels().copy(), step=-1)
    start = _choose_key(search.front(), target, final_accuracy)
    search.refine(np.asarray(start if start is not None else search.front()[-1][0], dtype=np.int64),
                  _objective(target, final_accuracy))
    return ev, search, final_accuracy


def search_front(trace: Trace, costs: ExitCosts, rule: str, target: Target, *,
                 levels: int = DEFAULT_LEVELS, fallback: str = "final") -> TuneResult:
    """Search the accuracy / cost front of ``rule`` on a traced set and choose the point meeting ``target`` ON
    THAT SET (a point estimate: see :func:`search_guaranteed` for a target that holds on new data).

    Args:
        trace: every exit's outputs on the tuning set, with labels (``Runner.trace``).
        costs: per-exit cumulative costs (see :func:`exit_costs`).
        rule: one of :data:`TUNABLE_RULES`.
        target: the accuracy floor or cost budget.
        levels: candidate thresholds per exit (quantiles of the exit's statistic).
        fallback: what an input no early exit stops answers ("final" or "most_confident"; see
            :mod:`edgeexit.runtime.rules`); the chosen point and the front carry it.

    Returns:
        A :class:`TuneResult` whose ``front`` is sorted by cost with non-decreasing accuracy.

    Raises:
        TuningError: no point meets the target (the message names what the closest point achieves).
        UsageError: a rule that cannot be tuned or a bad ``levels``.
    """
    t0 = time.perf_counter()
    kind = target.cost_kind
    ev, search, final_accuracy = _explore(trace, costs, rule, target, levels, fallback)
    front = search.front()
    key = _choose_key(front, target, final_accuracy)
    if key is None:
        raise TuningError(_unmet_message(front, target, final_accuracy, kind))
    points = tuple(_point(search, ev, k, costs, rule, fallback) for k, _, _, _ in front)
    chosen = _point(search, ev, key, costs, rule, fallback)
    dt = time.perf_counter() - t0
    log.info("tune %s: %d threshold vectors evaluated, front of %d points, %.3f s", rule, len(search.seen),
             len(points), dt)
    return TuneResult(chosen=chosen, front=points, cost_kind=kind, final_accuracy=final_accuracy, target=target,
                      n=trace.num_inputs, search_s=dt, evaluated=len(search.seen), exit_costs=costs)


def search_guaranteed(trace: Trace, costs: ExitCosts, rule: str, target: Target, *, risk: float,
                      delta: float | None = None, levels: int = DEFAULT_LEVELS,
                      reference: ExitRuleSpec | None = None, reference_name: str | None = None,
                      reference_costs: ExitCosts | None = None, margin_pp: float = 0.0,
                      tolerance: float = 0.0, fallback: str = "final") -> TuneResult:
    """The point meeting ``target`` on NEW data with probability at least ``1 - risk`` (Learn then Test; see
    :mod:`edgeexit.tuning.guarantee`).

    The front is searched on a seeded random half of ``trace`` and its points are tested on the other half in
    fixed sequence. The chosen point's stored metrics are those on the whole trace.

    Args:
        trace, costs, rule, levels, fallback: as for :func:`search_front`.
        target: an accuracy target (``max_drop_pp``, ``min_accuracy``; ``no_worse_than`` with ``reference``) or a
            budget.
        risk: the probability the promise may fail; ``delta`` the level of this rule's tests (``risk`` divided by
            the number of rule kinds searched; default ``risk``).
        reference: for ``no_worse_than``: the rule to be no worse than (its name in ``reference_name``); the
            point must beat it by ``margin_pp`` (default 0: no worse). The reference itself is kept when no
            cheaper point passes. ``reference_costs``: the exit costs of the reference's rule kind (default
            ``costs``).
        tolerance: relative cost differences up to this are measurement noise: among the points that pass, the
            cheapest by ``target.cost_kind`` within this tolerance, then the fewest MACs, is chosen.

    Raises:
        TuningError: too few images for the split, or no point can be guaranteed (the message says the bound the
            safest point reaches and how to relax the target).
    """
    t0 = time.perf_counter()
    risk = check_risk(risk)
    delta = risk if delta is None else float(delta)
    rows_s, rows_c = split(trace.num_inputs)
    everything = range(trace.num_exits)
    s_trace, c_trace = trace.select(everything, rows_s), trace.select(everything, rows_c)
    labels_c = labels_of(c_trace)
    kind = target.cost_kind
    ref_point = None
    if reference is not None:
        ref_point = evaluate_rule(trace, reference, reference_costs or costs)
        ref_search = evaluate_rule(s_trace, reference, costs)
        search_target = Target(min_accuracy=min(1.0, ref_search.accuracy + margin_pp / 100.0), minimize=target.minimize,
                               energy_kind=target.energy_kind)
    else:
        search_target = target
    # An accuracy target's path is the MACs front (exact counts: the same data give the same path, whatever the
    # timing noise); the measured cost only chooses among the points that passed. A budget's path is its own kind.
    path_target = dataclasses.replace(search_target, minimize="macs") if target.budget is None else search_target
    ev, search, _ = _explore(s_trace, costs, rule, path_target, levels, fallback)
    points = [_point(search, ev, k, costs, rule, fallback) for k, _, _, _ in search.front()]   # path cost ascending
    labels_s = labels_of(s_trace)
    if target.budget is not None:
        check, path = Check("budget", float(target.budget), cost_per_exit=costs.vector(kind)), points
    elif target.min_accuracy is not None and reference is None:
        check, path = Check("accuracy", float(target.min_accuracy)), points[::-1]     # the most accurate first
    else:
        if reference is not None:
            ref_c = rule_from_spec(reference).simulate(c_trace)[1] == labels_c
            ref_s = rule_from_spec(reference).simulate(s_trace)[1] == labels_s
            check = Check("drop", -margin_pp / 100.0, reference_correct=ref_c)
        else:
            ref_c = np.asarray(c_trace.logits[-1]).argmax(axis=-1) == labels_c
            ref_s = np.asarray(s_trace.logits[-1]).argmax(axis=-1) == labels_s
            check = Check("drop", target.max_drop_pp / 100.0, reference_correct=ref_c)
        path = _drop_path(search, ev, ref_s, costs, rule, delta)

    def outcome(p: OperatingPoint) -> tuple[np.ndarray, np.ndarray]:
        spec = ExitRuleSpec(rule, tuple(p.thresholds), fallback=fallback)
        exit_index, prediction = rule_from_spec(spec).simulate(c_trace)
        return exit_index, prediction == labels_c

    passed, tested = fixed_sequence(path, outcome, check, delta)
    final_accuracy = float((np.asarray(trace.logits[-1]).argmax(axis=-1) == labels_of(trace)).mean())
    unit = {"drop": "pp", "accuracy": "% error"}.get(check.kind, {"macs": "MACs fraction", "latency": "ms",
                                                                 "energy": "mJ"}[kind])
    scale = 100.0 if check.kind in ("drop", "accuracy") else 1.0
    if passed:
        point, bound = _pick(passed, target, kind, tolerance)
        chosen = evaluate_rule(trace, ExitRuleSpec(rule, tuple(point.thresholds), fallback=fallback), costs)
        if check.kind == "drop" and len(passed) == 1 and ref_point is None:
            log.warning("only the strictest %s point (%.1f%% of the MACs) can be guaranteed to keep %s at risk %g on %d "
                        "images; for cheaper points allow a larger drop or give more labelled images", rule,
                        100 * chosen.avg_macs_fraction, _statement(target, None, 0.0), risk, rows_c.size)
    elif ref_point is not None:
        chosen, bound = ref_point, 0.0
    else:
        first = outcome(path[0])
        raise TuningError(_unguaranteed_message(target, check, check.bound(*first, delta) * scale, unit, risk,
                                                rows_c.size, kind, path[0]))
    if ref_point is not None and ref_point.cost(kind) <= chosen.cost(kind):
        log.info("no point of the %s front that passed is cheaper than %r; keeping the reference", rule,
                 reference_name)
        chosen, bound = ref_point, 0.0
    statement = _statement(target, reference_name, margin_pp)
    g = Guarantee(statement=statement, risk=risk, bound=bound * scale, bound_unit=unit,
                  calibration_images=int(rows_c.size), search_images=int(rows_s.size), tested=tested,
                  passed=len(passed))
    dt = time.perf_counter() - t0
    log.info("guaranteed tune %s: %d points tested, %d passed, %.3f s", rule, tested, len(passed), dt)
    # the stored front: every evaluated point of the search, the Pareto set by the target's own cost
    front = pareto([_point(search, ev, key, costs, rule, fallback) for key in search.seen], kind)
    return TuneResult(chosen=chosen, front=tuple(front), cost_kind=kind, final_accuracy=final_accuracy,
                      target=target, n=trace.num_inputs, search_s=dt, evaluated=len(search.seen),
                      exit_costs=costs, reference=ref_point, reference_name=reference_name,
                      margin_pp=float(margin_pp), guarantee=g)


def _drop_path(search: "_Search", ev: Any, reference_correct: np.ndarray, costs: ExitCosts,
               rule: str, delta: float) -> list[OperatingPoint]:
    """The testing order for a drop target, from the SEARCH part only (so the test on the other part stays exact):
    the strictest point first (every threshold at its strict end: nearly every input runs to the final exit), then
    every evaluated point by its estimated bound on the search part, keeping only points cheaper in MACs than every
    safer one. The estimate mirrors the test (an upper bound of ``p_b`` minus a lower bound of ``p_c``, Wilson's
    normal form at the test's levels), so a point that beat the reference on the search part by luck in ``c`` is not
    tested first, where its failure on the calibration part would stop the sequence."""
    n = max(search.n, 1)
    z_b = NormalDist().inv_cdf(1 - delta * DROP_SPLIT)
    z_c = NormalDist().inv_cdf(1 - delta * (1 - DROP_SPLIT))

    def wilson(k: int, z: float, sign: float) -> float:
        return (k + z * z / 2 + sign * z * math.sqrt(k + z * z / 4)) / (n + z * z)

    strictest = tuple(0 for _ in range(len(next(iter(search.seen)))))
    scored = []
    for key, (_, macs_cost, _) in search.seen.items():
        _, correct = ev.outcome(np.asarray(key, dtype=np.int64))
        b = int(np.count_nonzero(reference_correct & ~correct))
        c = int(np.count_nonzero(~reference_correct & correct))
        first = 0 if key == strictest else 1
        scored.append((first, wilson(b, z_b, +1.0) - wilson(c, z_c, -1.0), macs_cost, key))
    path, last_cost = [], math.inf
    for _, _, cost, key in sorted(scored):
        if cost < last_cost - 1e-15:
            path.append(_point(search, ev, key, costs, rule))
            last_cost = cost
    return path


def pareto(points: Sequence[OperatingPoint], kind: str) -> list[OperatingPoint]:
    """The points no other point beats on both ``kind`` cost and accuracy, by cost ascending."""
    out: list[OperatingPoint] = []
    for p in sorted(points, key=lambda p: (p.cost(kind), -p.accuracy, p.avg_macs_fraction)):
        if not out or p.accuracy > out[-1].accuracy + 1e-12:
            out.append(p)
    return out


def cheapest(points: Sequence[OperatingPoint], kind: str, tolerance: float) -> OperatingPoint:
    """The cheapest of ``points`` by ``kind``, where costs within ``tolerance`` (relative) of the cheapest count as
    equal and the fewest MACs, then the highest accuracy, decide: so timing noise does not pick the point."""
    best = min(p.cost(kind) for p in points)
    near = [p for p in points if p.cost(kind) <= best * (1.0 + tolerance) + 1e-15]
    return min(near, key=lambda p: (p.avg_macs_fraction, -p.accuracy, p.cost(kind), p.thresholds))


def _pick(passed: Sequence[tuple[OperatingPoint, float]], target: Target, kind: str,
          tolerance: float) -> tuple[OperatingPoint, float]:
    if target.budget is not None:
        return passed[-1]                   # the most accurate point that passed (the path goes up in cost)
    chosen = cheapest([p for p, _ in passed], kind, tolerance)
    return next((p, b) for p, b in passed if p is chosen)


def _statement(target: Target, reference_name: str | None, margin_pp: float) -> str:
    if reference_name is not None:
        beat = f" by {margin_pp:g} pp" if margin_pp else ""
        return f"accuracy no worse than '{reference_name}'{beat}"
    if target.max_drop_pp is not None:
        return f"accuracy drop <= {target.max_drop_pp:g} pp vs the final exit"
    if target.min_accuracy is not None:
        return f"accuracy >= {100 * target.min_accuracy:.4g}%"
    return f"average {cost_label(target.cost_kind)} <= {fmt_cost(target.cost_kind, target.budget or 0.0)}"


def _unguaranteed_message(target: Target, check: Check, bound: float, unit: str, risk: float, n: int, kind: str,
                          safest: OperatingPoint) -> str:
    what = _statement(target, None, 0.0)
    relax = ("allow a larger --max-drop" if target.max_drop_pp is not None else
             "ask for a lower accuracy" if target.min_accuracy is not None else "raise the budget")
    shown = f"{bound:.3g} {unit}" if check.kind != "accuracy" else f"{100 - bound:.2f}% accuracy"
    return (f"no point of the {safest.rule} front can be guaranteed to keep {what} at risk {risk:g} on {n} "
            f"calibration images: the {'safest' if check.kind != 'budget' else 'cheapest'} point reaches only "
            f"{shown} at {100 * (1 - risk):.4g}% confidence; {relax}, give more labelled images, or --risk 1 "
            "for a point estimate without a guarantee")


def _objective(target: Target, final_accuracy: float) -> Callable[[float, float, float, float], bool]:
    """better(acc, cost, best_acc, best_cost): feasible first, then cheaper (accuracy target) or more accurate."""
    eps = 1e-12
    floor = target.floor(final_accuracy)
    if floor is not None:
        def better(a: float, c: float, ba: float, bc: float) -> bool:
            ok, bok = a >= floor - eps, ba >= floor - eps
            if ok != bok:
                return ok
            if not ok:
                return a > ba + eps
            return c < bc - eps or (abs(c - bc) <= eps and a > ba + eps)
        return better
    budget = target.budget or 0.0

    def better_budget(a: float, c: float, ba: float, bc: float) -> bool:
        ok, bok = c <= budget + eps, bc <= budget + eps
        if ok != bok:
            return ok
        if not ok:
            return c < bc - eps
        return a > ba + eps or (abs(a - ba) <= eps and c < bc - eps)
    return better_budget


def _choose_key(front: Sequence[tuple[tuple[int, ...], float, float, Any]], target: Target,
                final_accuracy: float) -> tuple[int, ...] | None:
    eps = 1e-12
    floor = target.floor(final_accuracy)
    if floor is not None:
        ok = [p for p in front if p[1] >= floor - eps]
        return ok[0][0] if ok else None            # front is sorted by cost: first = cheapest
    ok = [p for p in front if p[2] <= (target.budget or 0.0) + eps]
    return ok[-1][0] if ok else None               # last within budget = most accurate


def _unmet_message(front: Sequence[tuple[tuple[int, ...], float, float, Any]], target: Target,
                   final_accuracy: float, kind: str) -> str:
    floor = target.floor(final_accuracy)
    if floor is not None:
        _, acc, cost, _ = max(front, key=lambda p: (p[1], -p[2]))
        wanted = (f"within {target.max_drop_pp:g} pp of the final exit's {100 * final_accuracy:.2f}%"
                  if target.max_drop_pp is not None else f"at {100 * floor:.2f}% or more")
        fix = "allow a larger --max-drop" if target.max_drop_pp is not None else "ask for a lower accuracy"
        return (f"no operating point keeps the accuracy {wanted}: the most accurate point reaches {100 * acc:.2f}% "
                f"at {fmt_cost(kind, cost)}; {fix}")
    _, acc, cost, _ = min(front, key=lambda p: (p[2], -p[1]))
    return (f"no operating point fits the budget of {fmt_cost(kind, target.budget or 0.0)}: the cheapest point "
            f"costs {fmt_cost(kind, cost)} (accuracy {100 * acc:.2f}%); raise the budget")
