"""Choosing among a bundle's stored operating points at run time (by name or by budget) and switching a
running Runner to one, without reloading."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..errors import BundleError, TuningError, UsageError
from ..runtime.manifest import ExitRuleSpec
from ..runtime.points import OperatingPoint, OperatingPoints
from .evaluate import TUNABLE_RULES
from .results import cost_label, fmt_cost
from .store import rule_spec

log = logging.getLogger(__name__)

#: Operating points are stored rounded to 6 decimals: budgets are compared within that rounding.
_STORED_TOL = 1e-6


@dataclass(frozen=True)
class Budget:
    """A run-time choice among stored operating points.

    With any cost limit set, the most accurate point within every limit (and above ``min_accuracy``) is
    chosen; with only ``min_accuracy``, the cheapest point (by ``cost``) that reaches it.
    """

    min_accuracy: float | None = None
    max_macs_fraction: float | None = None
    max_latency_ms: float | None = None
    max_energy_mj: float | None = None
    cost: str = "macs"

    def limits(self) -> dict[str, float]:
        """cost kind -> limit, for the limits that are set."""
        pairs = (("macs", self.max_macs_fraction), ("latency", self.max_latency_ms), ("energy", self.max_energy_mj))
        return {k: float(v) for k, v in pairs if v is not None}

    def describe(self) -> str:
        parts = [f"accuracy >= {100 * self.min_accuracy:.2f}%"] if self.min_accuracy is not None else []
        parts += [f"{cost_label(k)} <= {fmt_cost(k, v)}" for k, v in self.limits().items()]
        return ", ".join(parts) or "no constraint"


def select_point(stored: OperatingPoints, budget: Budget) -> OperatingPoint:
    """The stored point (front or named, with metrics) a :class:`Budget` asks for.

    Raises:
        TuningError: no stored point meets it (the message names the closest one), or there are none.
    """
    points = stored.candidates()
    if not points:
        raise TuningError("the bundle has no tuned operating points; run `edgeexit tune` first")
    limits = budget.limits()
    # stored points are rounded to 6 decimals: compare within that rounding
    ok = [p for p in points if all(p.cost(k) <= v + _STORED_TOL for k, v in limits.items())
          and (budget.min_accuracy is None or p.accuracy >= budget.min_accuracy - _STORED_TOL)]
    if ok and limits:
        first = next(iter(limits))
        return max(ok, key=lambda p: (p.accuracy, -p.cost(first)))
    if ok:
        return min(ok, key=lambda p: (p.cost(budget.cost), -p.accuracy))
    if limits:
        first, value = next(iter(limits.items()))
        cheapest = min(points, key=lambda p: (p.cost(first), -p.accuracy))
        raise TuningError(f"no operating point meets {budget.describe()}: the cheapest costs "
                          f"{fmt_cost(first, cheapest.cost(first))} at {100 * cheapest.accuracy:.2f}% accuracy")
    best = max(points, key=lambda p: p.accuracy)
    raise TuningError(f"no operating point meets {budget.describe()}: the most accurate reaches "
                      f"{100 * best.accuracy:.2f}% at {fmt_cost('macs', best.avg_macs_fraction)}")


def use_operating_point(runner: Any, choice: str | Budget | OperatingPoint | ExitRuleSpec) -> ExitRuleSpec:
    """Switch a running :class:`~edgeexit.runtime.runner.Runner` to another operating point, without reloading.

    Args:
        runner: the Runner (anything with ``manifest``, ``rule``, ``set_rule`` and ``set_thresholds``).
        choice: a stored point's name, a :class:`Budget` (chosen among the stored points), a point, or a rule.

    Returns:
        The exit rule now in use.

    Raises:
        UsageError: an unknown name; TuningError: a budget no stored point meets.
    """
    if isinstance(choice, str):
        try:
            spec = runner.manifest.point_rule(choice)
        except BundleError as exc:
            raise UsageError(str(exc)) from None
        if spec is None:
            raise UsageError(f"the bundle has no operating point {choice!r}; it has "
                             f"{sorted(runner.manifest.operating_points.named) or 'none'} (create them with "
                             "`edgeexit tune`)")
    elif isinstance(choice, Budget):
        spec = rule_spec(select_point(runner.manifest.operating_points, choice))
    elif isinstance(choice, OperatingPoint):
        spec = rule_spec(choice)
    elif isinstance(choice, ExitRuleSpec):
        spec = choice
    else:
        raise UsageError(f"choose an operating point by name, Budget, OperatingPoint or ExitRuleSpec, got "
                         f"{type(choice).__name__}")
    if spec.kind == getattr(runner.rule, "kind", None) and spec.kind in TUNABLE_RULES:
        runner.set_thresholds(spec.thresholds)
    else:
        runner.set_rule(spec)
    log.info("operating point: %s %s", spec.kind, list(spec.thresholds))
    return spec
