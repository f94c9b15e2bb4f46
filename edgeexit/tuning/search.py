"""The accuracy / cost trade-off front of an exit rule on one trace, and the point that meets a target.

The front is built by two greedy walks (from "everything runs to the end" down to "everything leaves at the
first exit", and back up), each step taking the move with the best accuracy-per-cost ratio, then refined for the
target by coordinate descent over every exit's levels (see :mod:`edgeexit.tuning.evaluate`). Every evaluated
point is kept; the Pareto set of (average cost, accuracy) is the front. Costs are linear in the exit histogram,
so every point carries its average MACs fraction, estimated latency and energy.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import TuningError, UsageError
from ..runtime.points import OperatingPoint
from ..runtime.trace import Trace
from .evaluate import TUNABLE_RULES, ExitCosts, _ClassExclusionEvaluator, _LevelEvaluator
from .results import Target, TuneResult, fmt_cost

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


def _evaluator(trace: Trace, kind: str, levels: int) -> Any:
    if kind not in TUNABLE_RULES:
        raise UsageError(f"rule {kind!r} cannot be tuned; choose one of {', '.join(TUNABLE_RULES)}")
    if trace.num_exits < 2:
        raise TuningError("the bundle has a single exit; there are no thresholds to tune")
    if trace.num_inputs < 1:
        raise TuningError("the tuning trace is empty; give at least one labelled validation input")
    if kind == "class_exclusion":
        return _ClassExclusionEvaluator(trace, levels)
    return _LevelEvaluator(trace, kind, levels)


def _point(search: _Search, ev: Any, key: tuple[int, ...], costs: ExitCosts, kind: str) -> OperatingPoint:
    acc, _, hist = search.seen[key]
    frac = hist / max(search.n, 1)
    energy = None if costs.energy_mj is None else float(frac @ costs.energy_mj)
    return OperatingPoint(rule=kind, thresholds=ev.thresholds(np.asarray(key)), accuracy=acc,
                          avg_macs_fraction=float(frac @ costs.macs_fraction),
                          est_latency_ms=float(frac @ costs.latency_ms), energy_mj=energy,
                          exit_fractions=tuple(float(f) for f in frac))


def search_front(trace: Trace, costs: ExitCosts, rule: str, target: Target, *,
                 levels: int = DEFAULT_LEVELS) -> TuneResult:
    """Search the accuracy / cost front of ``rule`` on a traced set and choose the point meeting ``target``.

    Args:
        trace: every exit's outputs on the tuning set, with labels (``Runner.trace``).
        costs: per-exit cumulative costs (see :func:`exit_costs`).
        rule: one of :data:`TUNABLE_RULES`.
        target: the accuracy floor or cost budget.
        levels: candidate thresholds per exit (quantiles of the exit's statistic).

    Returns:
        A :class:`TuneResult` whose ``front`` is sorted by cost with non-decreasing accuracy.

    Raises:
        TuningError: no point meets the target (the message names what the closest point achieves).
        UsageError: a rule that cannot be tuned or a bad ``levels``.
    """
    if not isinstance(levels, int) or levels < 1:
        raise UsageError(f"levels must be a positive integer, got {levels!r}")
    t0 = time.perf_counter()
    kind = target.cost_kind
    ev = _evaluator(trace, rule, levels)
    search = _Search(ev, costs.vector(kind))
    final_accuracy = float(ev.correct[-1].mean()) if hasattr(ev, "correct") else float(
        (np.asarray(trace.logits[-1]).argmax(axis=-1) == ev.labels).mean())
    strictest = np.zeros(trace.num_exits - 1, dtype=np.int64)
    search.greedy(strictest, step=+1)
    search.greedy(ev.max_levels().copy(), step=-1)
    better = _objective(target, final_accuracy)
    start = _choose_key(search.front(), target, final_accuracy)
    search.refine(np.asarray(start if start is not None else search.front()[-1][0], dtype=np.int64), better)
    front = search.front()
    key = _choose_key(front, target, final_accuracy)
    if key is None:
        raise TuningError(_unmet_message(front, target, final_accuracy, kind))
    points = tuple(_point(search, ev, k, costs, rule) for k, _, _, _ in front)
    chosen = _point(search, ev, key, costs, rule)
    dt = time.perf_counter() - t0
    log.info("tune %s: %d threshold vectors evaluated, front of %d points, %.3f s", rule, len(search.seen),
             len(points), dt)
    return TuneResult(chosen=chosen, front=points, cost_kind=kind, final_accuracy=final_accuracy, target=target,
                      n=trace.num_inputs, search_s=dt, evaluated=len(search.seen), exit_costs=costs)


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
