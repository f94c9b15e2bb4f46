"""Writing a tuning result into a bundle's manifest, and reading stored points back by name."""

from __future__ import annotations

import difflib
from typing import Any, Sequence

import numpy as np

from ..errors import BundleError, UsageError
from ..runtime.manifest import EXIT_RULES, ExitRuleSpec, Manifest
from ..runtime.points import RESERVED_NAMES, NamedPoint, OperatingPoint, OperatingPoints
from .results import TuneResult

#: At most this many front points are written into a manifest (evenly spread over the cost range).
MAX_STORED_FRONT = 64


def updated_manifest(manifest: Manifest, result: TuneResult, name: str, original: OperatingPoint | None = None,
                     max_front: int = MAX_STORED_FRONT, table: Any = None) -> Manifest:
    """The manifest with the tuned point stored under ``name``, the front, and ``exit_rule`` = the chosen point.

    ``operating_points["original"]`` is set to the bundle's exit rule before its FIRST tuning and never
    overwritten afterwards, so the converter's thresholds stay recoverable.

    Raises:
        UsageError: ``name`` is empty, reserved ("original", "front") or not a plain identifier.
    """
    check_point_name(name)
    stored = manifest.operating_points
    named = dict(stored.named)
    if "original" not in named and "original" not in stored.unreadable:
        spec = manifest.exit_rule
        rule = spec.to_dict()
        named["original"] = (NamedPoint(rule) if original is None else
                             NamedPoint(rule, metrics=original, data=result.data, n=result.n))
    chosen = result.chosen
    named[name] = NamedPoint({"kind": chosen.rule, "thresholds": [float(t) for t in chosen.thresholds],
                              **({} if chosen.fallback == "final" else {"fallback": chosen.fallback})},
                             metrics=chosen, data=result.data, n=result.n, target=result.target_dict(),
                             final_accuracy=round(result.final_accuracy, 6),
                             extra={"guarantee": result.guarantee_dict()})
    costs = stored.exit_costs
    if result.exit_costs is not None:
        c = result.exit_costs
        costs = {"macs_fraction": [round(float(v), 6) for v in c.macs_fraction],
                 "energy_mj": None if c.energy_mj is None else [float(v) for v in c.energy_mj],
                 "energy_kind": c.energy_kind,
                 **(table.to_dict() if table is not None else {"latency_ms": {}})}
    points = OperatingPoints(named=named, front=tuple(thin_front(result.front, result.cost_kind, max_front)),
                             exit_costs=costs, unreadable={k: v for k, v in stored.unreadable.items() if k != name})
    return manifest.replace(operating_points=points, exit_rule=rule_spec(chosen))


def rule_spec(point: OperatingPoint) -> ExitRuleSpec:
    """A point's exit rule, as the manifest and the Runner take it."""
    return ExitRuleSpec(kind=point.rule, thresholds=tuple(point.thresholds), exit=None, fallback=point.fallback)


def check_point_name(name: str) -> None:
    """UsageError unless ``name`` can name an operating point."""
    if not isinstance(name, str) or not name or name in RESERVED_NAMES or name in EXIT_RULES or not all(
            ch.isalnum() or ch in "-_." for ch in name):
        raise UsageError(f"operating point name {name!r} is not usable; give letters, digits, '-', '_' or '.', not "
                         f"{', '.join(RESERVED_NAMES)} or a rule kind")


def thin_front(front: Sequence[OperatingPoint], cost_kind: str, max_points: int) -> list[OperatingPoint]:
    """At most ``max_points`` front points, evenly spread over the cost range (both ends kept)."""
    if len(front) <= max_points:
        return list(front)
    costs = np.array([p.cost(cost_kind) for p in front])
    wanted = np.linspace(costs[0], costs[-1], max_points)
    idx = sorted(set(int(np.abs(costs - w).argmin()) for w in wanted) | {0, len(front) - 1})
    return [front[i] for i in idx]


def reference_rule(manifest: Manifest, name: str) -> ExitRuleSpec:
    """The rule called ``name``: "current" (the bundle's exit rule) or one of its stored operating points
    ("original" is the current rule until the bundle is tuned for the first time).

    Raises:
        UsageError: no such operating point (the message lists the names there are).
    """
    points = manifest.operating_points
    if name == "current" or (name == "original" and "original" not in list(points)):  # not tuned: the original
        return manifest.exit_rule
    try:
        rule = manifest.point_rule(name) if name not in RESERVED_NAMES or name == "original" else None
    except BundleError as exc:
        raise UsageError(str(exc)) from None
    if rule is None:
        names = sorted({*points.named, "current", "original"})
        near = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise UsageError(f"--no-worse-than {name!r}: the bundle has no such operating point; {hint}use one of "
                         f"{', '.join(names)}")
    return rule
