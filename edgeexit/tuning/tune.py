"""Threshold tuning: the accuracy / cost trade-off front of an exit rule, searched on one traced validation set.

Every stage runs ONCE per validation input (a :class:`~edgeexit.runtime.trace.Trace`); the search then only
re-decides exits with numpy. :func:`tune_bundle` traces a labelled set through a bundle, times the exit
costs, searches, and stores the chosen point. The steps live in their own modules:
:mod:`~edgeexit.tuning.evaluate` (replaying rules on the trace), :mod:`~edgeexit.tuning.search` (the front and
the chosen point), :mod:`~edgeexit.tuning.store` (the manifest's operating points), :mod:`~edgeexit.tuning.switch`
(choosing a stored point at run time).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Sequence

import numpy as np

from ..energy import Board
from ..errors import BundleError, TuningError, UsageError
from ..progress import Progress, reporting
from ..runtime.manifest import FALLBACK_RULES, FALLBACKS, ExitRuleSpec, Manifest
from ..runtime.points import OperatingPoint
from ..runtime.rules import rule_from_spec
from ..runtime.trace import Trace
from .evaluate import TUNABLE_RULES, ExitCosts, evaluate_rule, exit_costs
from .guarantee import DEFAULT_RISK, check_risk
from .results import Target, TuneResult
from .search import DEFAULT_LEVELS, cheapest, search_front, search_guaranteed
from .store import check_point_name, reference_rule, updated_manifest

log = logging.getLogger(__name__)

#: Images that time the exit costs during tuning (see :func:`tune_bundle`).
DEFAULT_COST_IMAGES = 500
#: Relative run-to-run noise of timed costs: two points (or rule kinds) whose estimated latency (or latency-based
#: energy) differ by less are equal, and the fewer MACs decide. Six timings of the MNIST default's exit costs on one
#: loaded 2-core machine spread by 1-7 % of their median (most at exit 0, where most inputs leave):
#: benchmarks/results/exit_cost_noise.json.
COST_NOISE = 0.07


def tune_bundle(bundle: str | os.PathLike[str], data: str, target: Target, *, rule: str | None = None,
                name: str = "tuned", split: str = "test", limit: int | None = None, dry_run: bool = False,
                levels: int = DEFAULT_LEVELS, backend: str = "auto", margin_pp: float | None = None,
                progress: Progress | None = None, cost_images: int = DEFAULT_COST_IMAGES,
                board: str | Board | None = None, risk: float = DEFAULT_RISK, force: bool = False,
                retime: bool = False, fallback: str = "final") -> TuneResult:
    """Trace a labelled validation set once, search the front, and store the chosen point in the bundle.

    Args:
        bundle: the bundle directory.
        data: a dataset spec for :func:`edgeexit.datasets.load_dataset`.
        target: accuracy floor or cost budget.
        rule: rule kind to tune (default: the bundle's own kind when tunable, else max_softmax), or "any":
            search every tunable kind and keep the one whose chosen point is best for the target.
        name: name of the stored operating point.
        split: dataset split ("train" or "test") for named datasets.
        limit: use only the first ``limit`` images.
        dry_run: search and report, but do not write the manifest.
        levels: candidate thresholds per exit.
        backend: interpreter backend.
        margin_pp: for a ``no_worse_than`` target, the chosen point must beat the reference by this many
            percentage points: guaranteed on new data (default 0), or with ``risk=1`` on the tuning data (default
            one binomial standard error of the reference's accuracy there, 0.14 pp at 99 % on 5,000 inputs).
        risk: the target holds on new data from the tuning distribution with probability at least ``1 - risk``
            (:func:`~edgeexit.tuning.search.search_guaranteed`, Learn then Test); 1 = the point estimate on the
            tuning data, with no guarantee. With ``rule="any"`` each kind is tested at ``risk / kinds``.
        force: replace an operating point that is already stored under ``name``.
        progress: ``progress("trace", done, total)`` while the images are traced (see :mod:`edgeexit.progress`).
        board: the board profile energy costs are for (None / "auto": detect it).
        cost_images: how many of the images time the exit costs (the whole-call latency of an input forced to
            leave at each exit, per rule kind; :func:`edgeexit.bench.timing.measure_exit_costs`), which the
            latency of every candidate point is estimated from; 0 = no latency estimates. Costs this machine
            timed before, stored in the bundle by an earlier tune, are used as they are (so two tunes of the same
            bundle and data choose the same point, and a re-tune on a slow board skips the timing) unless
            ``retime``.
        retime: time the exit costs again even when the bundle holds costs timed on this machine.
        fallback: what an input no early exit stops answers: "final" (the last exit) or "most_confident" (the
            exit with the highest score; confidence, max_softmax and entropy only). The chosen point and the
            front carry it; every input the fallback answers is charged every stage.

    Returns:
        The :class:`TuneResult`.

    Raises:
        BundleError: the bundle is invalid; DatasetError: the data cannot be read or does not fit;
        TuningError: the target cannot be met; UsageError: bad arguments.
    """
    from ..runtime.bundle import load_bundle, write_manifest_atomic  # noqa: PLC0415
    from ..datasets import check_dataset, load_dataset  # noqa: PLC0415
    from ..runtime.runner import Runner  # noqa: PLC0415

    check_point_name(name)
    risk = check_risk(risk)
    if margin_pp is not None and not (isinstance(margin_pp, (int, float)) and math.isfinite(margin_pp)
                                      and margin_pp >= 0):
        raise UsageError(f"margin must be a finite number of percentage points >= 0, got {margin_pp!r}")
    loaded = load_bundle(bundle, backend=backend)
    manifest = loaded.manifest
    kind = rule or (manifest.exit_rule.kind if manifest.exit_rule.kind in TUNABLE_RULES else "max_softmax")
    if kind != "any" and kind not in TUNABLE_RULES:
        raise UsageError(f"--rule {kind} cannot be tuned; choose one of {', '.join(TUNABLE_RULES)} or any")
    if fallback not in FALLBACKS:
        raise UsageError(f"fallback {fallback!r:.40} is not known; expected one of {', '.join(FALLBACKS)}")
    if fallback != "final" and kind not in (*FALLBACK_RULES, "any"):
        raise UsageError(f"--rule {kind} takes --fallback final only; most_confident works with "
                         f"{', '.join(FALLBACK_RULES)} (or --rule any)")
    # every argument is checked before the long work (reading and tracing the data, timing)
    ref_spec = reference_rule(manifest, target.no_worse_than) if target.no_worse_than is not None else None
    if not dry_run and name in manifest.operating_points.named and not force:
        raise UsageError(f"the bundle already has an operating point {name!r}; give --force to replace it, or "
                         "--name NEW to store the new point beside it")
    # says what it leaves out, before the long work
    searched = _fitting_rules(manifest, fallback) if kind == "any" else (kind,)
    images = load_dataset(data, split=split, limit=limit)
    check_dataset(manifest, images)
    runner = Runner(loaded, backend=backend, rule=ExitRuleSpec("final", ()), power_sensor=None, board=board)
    seq = reporting(images.images, len(images), "trace", progress)
    log.info("tracing %d images through %d stages", len(images), manifest.num_exits)
    trace = runner.trace(seq, images.labels)
    table = _stored_costs(manifest, searched, ref_spec, cost_images, runner) if not retime else None
    if table is None:
        table = _measure_costs(runner, images.images, searched, manifest, ref_spec, cost_images, progress)
    if table is None and target.cost_kind == "latency":
        if target.budget_latency_ms is not None:
            raise UsageError("a latency budget needs the exit costs timed on this device: give --cost-images > 0")
        log.info("no exit costs timed (cost_images=0): minimizing MACs instead of latency")
        target = dataclasses.replace(target, minimize="macs")

    def costs_for(rule_kind: str) -> ExitCosts:
        return exit_costs(manifest, table, rule_kind, runner.board, target.energy_kind)

    reference = (evaluate_rule(trace, ref_spec, costs_for(ref_spec.kind))
                 if ref_spec is not None else None)
    tolerance = COST_NOISE if target.cost_kind == "latency" or (
        target.cost_kind == "energy" and costs_for(searched[0]).energy_kind != "proxy") else 0.0
    results, errors = [], []
    for k in searched:
        costs = costs_for(k)
        try:
            if risk < 1:
                log.info("rule %s: guaranteed search at level %.4g", k, risk / len(searched))
                results.append(search_guaranteed(trace, costs, k, target, risk=risk, delta=risk / len(searched),
                                                 levels=levels, reference=ref_spec,
                                                 reference_name=target.no_worse_than, margin_pp=margin_pp or 0.0,
                                                 reference_costs=None if ref_spec is None else costs_for(ref_spec.kind),
                                                 tolerance=tolerance, fallback=fallback))
            elif reference is not None:
                results.append(_beat_reference(trace, costs, k, reference, target, levels, margin_pp, fallback))
            else:
                results.append(search_front(trace, costs, k, target, levels=levels, fallback=fallback))
        except (TuningError, UsageError) as exc:
            if kind != "any":
                raise
            errors.append(exc)
            log.info("rule %s: %s", k, exc)
    if not results:
        raise errors[0]
    result = dataclasses.replace(_best(results, target, tolerance), data=images.name)
    if not dry_run:
        original = None
        if "original" not in manifest.operating_points:
            try:
                original = evaluate_rule(trace, manifest.exit_rule, costs_for(manifest.exit_rule.kind))
            except UsageError as exc:
                log.warning("the bundle's own rule cannot be evaluated on this trace: %s", exc)
        path = write_manifest_atomic(loaded.path, updated_manifest(manifest, result, name, original, table=table))
        log.info("wrote operating point %r to %s", name, path)
    return result


def _fitting_rules(manifest: Manifest, fallback: str = "final") -> tuple[str, ...]:
    """The tunable rule kinds that can run on this bundle (``--rule any``) with ``fallback``; the others are logged
    with the reason."""
    left_out = {}
    if any("confidence" not in stage.outputs for stage in manifest.stages[:-1]):
        left_out["confidence"] = "an early exit has no confidence output"
    elif fallback == "most_confident" and "confidence" not in manifest.stages[-1].outputs:
        left_out["confidence"] = "fallback most_confident needs a confidence output at the last exit too"
    if fallback != "final":
        left_out["class_exclusion"] = f"it takes fallback final only (not {fallback})"
    if manifest.activations != "int8" and "class_exclusion" not in left_out:
        left_out["class_exclusion"] = f"it runs on int8 bundles only (this one has {manifest.activations} activations)"
    for k, why in left_out.items():
        log.warning("--rule any: %s left out: %s", k, why)
    return tuple(k for k in TUNABLE_RULES if k not in left_out)


def _cost_kinds(searched: Sequence[str], manifest: Manifest, reference: ExitRuleSpec | None) -> list[str]:
    """The rule kinds whose exit costs tuning needs: the searched ones, the reference's, the bundle's own, fixed."""
    from ..bench.timing import COST_KINDS  # noqa: PLC0415

    rules = [s.kind for s in (reference, manifest.exit_rule) if s is not None]
    wanted = {*searched, *("fixed" if k == "final" else k for k in rules), "fixed"}
    return [k for k in COST_KINDS if k in wanted]


def _stored_costs(manifest: Manifest, searched: Sequence[str], reference: ExitRuleSpec | None,
                  cost_images: int, runner: Any) -> Any:
    """The exit costs an earlier tune timed on this machine with this interpreter and stored in the bundle, when
    they cover every rule kind needed and every exit; else None (they are timed again)."""
    from ..bench.timing import ExitCostTable, backend_label, timed_elsewhere  # noqa: PLC0415

    stored = manifest.operating_points.exit_costs
    if cost_images == 0 or not stored or not stored.get("latency_ms") or timed_elsewhere(stored) is not None:
        return None
    try:
        table = ExitCostTable.from_dict(stored)
    except BundleError:
        return None
    kinds = _cost_kinds(searched, manifest, reference)
    if table.backend != backend_label(runner) or any(len(table.latency_ms.get(k, ())) != manifest.num_exits
                                                      for k in kinds):
        return None
    log.info("using the exit costs timed on this machine (%s, %s) stored in the bundle (%d images); --retime "
             "times them again", table.machine, table.backend, table.inputs)
    return table


def _measure_costs(runner: Any, images: np.ndarray, searched: Sequence[str], manifest: Manifest,
                   reference: ExitRuleSpec | None, cost_images: int, progress: Progress | None = None) -> Any:
    """Time the exit costs of every rule kind tuning needs, on the first ``cost_images`` images (None if 0)."""
    from ..bench.timing import measure_exit_costs  # noqa: PLC0415

    if isinstance(cost_images, bool) or not isinstance(cost_images, int) or cost_images < 0:
        raise UsageError(f"cost_images must be an integer >= 0, got {cost_images!r}")
    if cost_images == 0:
        return None
    rules = [rule_from_spec(s) for s in (reference, manifest.exit_rule) if s is not None]
    kinds = _cost_kinds(searched, manifest, reference)
    log.info("timing exit costs (%s) on %d images", ", ".join(kinds), min(cost_images, len(images)))
    return measure_exit_costs(runner, list(images[:cost_images]), kinds, rules=rules, repeat=3, progress=progress)


def standard_error_pp(accuracy: float, n: int) -> float:
    """The binomial standard error of an accuracy measured on ``n`` inputs, in percentage points."""
    return 100.0 * math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / max(n, 1))


def _beat_reference(trace: Trace, costs: ExitCosts, kind: str, reference: OperatingPoint, target: Target,
                    levels: int, margin_pp: float | None = None, fallback: str = "final") -> TuneResult:
    """The point estimate (``risk=1``): the cheapest point at least ``margin_pp`` more accurate than ``reference``
    (the rule ``target.no_worse_than`` names, evaluated on this trace), or the reference itself when no point is
    cheaper. The margin (default: one standard error of the reference's accuracy on this trace) narrows, but does
    not close, the gap to data the search did not see."""
    if margin_pp is None:
        margin_pp = standard_error_pp(reference.accuracy, trace.num_inputs)
    floor = min(1.0, reference.accuracy + margin_pp / 100.0)
    resolved = Target(min_accuracy=floor, minimize=target.minimize, energy_kind=target.energy_kind)
    result = dataclasses.replace(search_front(trace, costs, kind, resolved, levels=levels, fallback=fallback),
                                 reference=reference, reference_name=target.no_worse_than, margin_pp=float(margin_pp))
    cost = result.cost_kind
    if reference.cost(cost) <= result.chosen.cost(cost):
        log.info("no point of the %s front is cheaper than %r at its accuracy; keeping the reference", kind,
                 target.no_worse_than)
        result = dataclasses.replace(result, chosen=reference)
    return result


def _best(results: Sequence[TuneResult], target: Target, tolerance: float = 0.0) -> TuneResult:
    """Of several rules' results: the cheapest chosen point (accuracy target) or the most accurate (budget).
    Costs within ``tolerance`` (relative measurement noise) of each other are equal: fewer MACs decide."""
    if len(results) == 1:
        return results[0]
    kind = results[0].cost_kind
    if target.is_accuracy_target:
        best = cheapest([r.chosen for r in results], kind, tolerance)
        return next(r for r in results if r.chosen is best)
    top = max(r.chosen.accuracy for r in results)
    best = cheapest([r.chosen for r in results if r.chosen.accuracy >= top - 1e-12], kind, tolerance)
    return next(r for r in results if r.chosen is best)
