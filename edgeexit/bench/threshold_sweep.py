"""The threshold sweep: accuracy against MACs and estimated whole-call latency for many rules, from one trace.

Each point's exits are decided from the trace's raw outputs exactly as the device decides them; its latency is
*estimated* from the measured exit costs (:class:`~edgeexit.bench.timing.ExitCostTable`): the mean over inputs of
the whole-call cost of leaving at the exit each input takes under the point's rule.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np

from ..energy import BOARDS, Board, EnergyModel
from ..errors import EdgeExitError, UsageError
from ..runtime.manifest import Manifest
from ..runtime.rules import RULES, ExitRule, FixedExitRule, rule_from_spec
from ..runtime.trace import Trace
from .timing import ExitCostTable

log = logging.getLogger(__name__)

#: Points of the global-threshold grid of each rule kind (plus the rule's end points).
GRID_POINTS = 21
#: Columns of the sweep CSV.
SWEEP_COLUMNS = ("name", "source", "kind", "thresholds", "accuracy", "avg_macs", "mac_fraction", "est_latency_ms",
                 "proxy_mj", "exit_shares")


def threshold_grid(kind: str, num_classes: int, points: int = GRID_POINTS) -> list[float]:
    """Global thresholds (the same at every exit) spanning a rule's useful range, from permissive to strict.

    confidence / max_softmax: 0..1 plus 0.99 and 0.999 (int8 exits are often very confident);
    entropy: ln K (almost everything leaves at exit 0) down to 0 nats (nothing leaves early);
    class_exclusion: beta 0.01..0.99.

    Raises:
        UsageError: a rule without thresholds.
    """
    if kind in ("confidence", "max_softmax"):
        grid = list(np.linspace(0.0, 1.0, points)) + [0.99, 0.999]
    elif kind == "entropy":
        grid = list(np.linspace(math.log(num_classes), 0.0, points))
    elif kind == "class_exclusion":
        grid = list(np.linspace(0.01, 0.99, points))
    else:
        raise UsageError(f"rule '{kind}' has no thresholds to sweep; expected one of confidence, max_softmax, "
                         "entropy, class_exclusion")
    return sorted({round(float(t), 6) for t in grid}, reverse=(kind == "entropy"))


def grid_kind(manifest: Manifest, run_rule: ExitRule | None) -> str:
    """The rule kind the grid sweeps: the measured rule's (else the bundle's) kind when it has thresholds,
    else max_softmax; max_softmax also when an early exit has no confidence output."""
    base = run_rule if run_rule is not None and run_rule.uses_thresholds else rule_from_spec(manifest.exit_rule)
    kind = base.kind if base.uses_thresholds else "max_softmax"
    if kind == "confidence" and not all("confidence" in s.outputs for s in manifest.stages[:-1]):
        kind = "max_softmax"
    return kind


def sweep_point(name: str, source: str, rule: ExitRule, trace: Trace, manifest: Manifest,
                costs: ExitCostTable, board: Board = BOARDS["generic"]) -> tuple[dict[str, Any], np.ndarray]:
    """One point: accuracy, MACs, estimated latency and operation-proxy energy (on ``board``) of ``rule``."""
    exit_index, prediction = rule.simulate(trace)                   # [N] int64, [N] int64
    cum_macs = np.asarray(manifest.cumulative_macs(), dtype=np.float64)
    cum_ops = np.asarray(EnergyModel(manifest, board).proxy_mj)
    spec = rule.to_spec()
    macs = cum_macs[exit_index]
    n, e = trace.num_inputs, trace.num_exits
    return {"name": name, "source": source, "kind": spec.kind, "thresholds": list(spec.thresholds),
            "exit": spec.exit, "accuracy": trace.accuracy(prediction), "avg_macs": float(macs.mean()),
            "mac_fraction": float(macs.mean()) / max(manifest.full_macs, 1),
            "est_latency_ms": costs.estimate_ms(spec.kind, exit_index), "proxy_mj": float(cum_ops[exit_index].mean()),
            "exit_shares": [float(v) for v in np.bincount(exit_index, minlength=e) / n]}, exit_index


def named_rules(manifest: Manifest, run_rule: ExitRule | None) -> list[tuple[str, str, ExitRule]]:
    """(name, source, rule) of the bundle's own rule, the measured rule (if different) and every stored point."""
    bundle_rule = rule_from_spec(manifest.exit_rule)
    out = [(f"bundle ({rule_text(bundle_rule)})", "bundle", bundle_rule)]
    if run_rule is not None and run_rule.to_spec() != bundle_rule.to_spec():
        out.append((f"run ({rule_text(run_rule)})", "run", run_rule))
    for name in manifest.operating_points:
        try:
            spec = manifest.point_rule(name)
        except EdgeExitError as exc:
            log.warning("operating point %r skipped (%s)", name, exc)
            continue
        if spec is not None:
            out.append((f"point '{name}'", "operating_point", rule_from_spec(spec)))
    return out


def sweep_tradeoff(trace: Trace, manifest: Manifest, costs: ExitCostTable, run_rule: ExitRule | None = None,
                   extra_rules: Sequence[tuple[str, str, ExitRule]] = (), board: Board = BOARDS["generic"]
                   ) -> dict[str, Any]:
    """Accuracy against average MACs and estimated latency for a grid of global thresholds and named rules.

    Named points: the bundle's own rule, the measured rule (when it differs), the bundle's operating points,
    ``extra_rules`` as (name, source, rule), and every exit on its own ("fixed"). ``proxy_mj``: the operation
    proxy with ``board``'s cache.

    Returns:
        {"rule": grid kind, "latency_is_estimated": True, "latency_note", "points": [...]} (see ``SWEEP_COLUMNS``).
    """
    if trace.labels is None:
        raise UsageError("the sweep needs a trace with labels: Runner.trace(images, labels)")
    kind = grid_kind(manifest, run_rule)
    points: list[dict[str, Any]] = []
    e = trace.num_exits

    def add(name: str, source: str, rule: ExitRule) -> None:
        try:
            point, _ = sweep_point(name, source, rule, trace, manifest, costs, board)
        except UsageError as exc:  # e.g. an operating point for another number of exits
            log.warning("sweep: skipped %s (%s)", name, exc)
            return
        points.append(point)

    if e > 1:
        for t in threshold_grid(kind, manifest.num_classes):
            add(f"{kind} T={t:g}", "grid", RULES[kind]([t] * (e - 1)))
    for name, source, rule in [*named_rules(manifest, run_rule), *extra_rules]:
        add(name, source, rule)
    for k in range(e):
        add(f"exit {k} only", "fixed", FixedExitRule(k))
    return {"rule": kind, "latency_is_estimated": True,
            "latency_note": "estimated: sum over exits of each exit's share x the measured whole-call latency of an "
                            "input forced to leave there (exit_costs)",
            "points": points}


def rule_text(rule: ExitRule) -> str:
    spec = rule.to_spec()
    if spec.kind == "fixed":
        return f"fixed exit {spec.exit}"
    if not spec.thresholds:
        return spec.kind
    return f"{spec.kind} {','.join(f'{t:g}' for t in spec.thresholds)}"
