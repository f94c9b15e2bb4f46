"""Class-based early exit (*Early Classification for Dynamic Inference of Neural Networks*): candidate-class
exclusion and the authors' beta search.

Every early exit has a :class:`~edgeexit.workstation.models.heads.ClassHead` or :class:`~edgeexit.workstation.models.heads.SpatialClassHead`
(one independent sigmoid score per class). At run time the candidate set shrinks exit by exit,
``R_k = R_{k-1} ∩ {c : s_c > beta_k * max s}``; an input stops as soon as one class is left, else the final
classifier answers argmax over R (rule ``class_exclusion`` of :mod:`edgeexit.runtime.rules`).

Models: EENet-style networks built with class heads (``head="class"``, trained with the class loss) or a
frozen backbone with class exits (:func:`attach_class_exits`, trained with :func:`train_class_exits`).

The betas are searched on a labelled validation trace exactly as the authors do (:func:`beta_search`): per
exit, in order, raise beta_k from 0.01 in steps of 0.01 until the accuracy drops below the baseline (the
final classifier alone) minus 0.1 percentage points, then back off two steps, clamped to [0.01, 0.99].
:func:`tune_bundle_betas` does it on the int8 outputs of a converted bundle (``Runner.trace``), so the betas
fit the quantized exits, and stores them as the bundle's exit rule with exclusion statistics.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from edgeexit.progress import Progress
from edgeexit.errors import TuningError, UsageError
from edgeexit.runtime.manifest import ExitRuleSpec
from edgeexit.runtime.trace import Trace
from edgeexit.runtime.rules import ClassExclusionRule, narrow_candidates, rule_from_spec

log = logging.getLogger(__name__)

BETA_START = 0.01
BETA_STEP = 0.01
BETA_MIN, BETA_MAX = 0.01, 0.99
BACKOFF_STEPS = 2
TOLERANCE = 0.001  # 0.1 percentage points


@dataclass
class ExclusionStats:
    """How the candidate sets shrink, per exit, on a trace at given betas.

    Attributes:
        reached: share of inputs that reach exit k.
        exited: share of inputs that leave at exit k.
        excluded_mean: mean number of classes exit k removed from R, over the inputs that reached it.
        remaining_mean: mean |R_k| after exit k, over the inputs that reached it.
    """

    reached: list[float]
    exited: list[float]
    excluded_mean: list[float]
    remaining_mean: list[float]

    def to_dict(self) -> dict[str, list[float]]:
        return {k: [round(float(v), 6) for v in getattr(self, k)]
                for k in ("reached", "exited", "excluded_mean", "remaining_mean")}


@dataclass
class BetaSearchResult:
    """The searched betas and what they achieve on the search trace."""

    betas: tuple[float, ...]
    baseline_accuracy: float     # the final classifier alone
    accuracy: float              # class exclusion at ``betas``
    exit_fractions: list[float]
    stats: ExclusionStats
    history: list[list[tuple[float, float]]] = field(default_factory=list)  # per exit: (beta, accuracy) tried

    def to_dict(self) -> dict[str, Any]:
        return {"betas": list(self.betas), "baseline_accuracy": self.baseline_accuracy, "accuracy": self.accuracy,
                "exit_fractions": self.exit_fractions, "exclusion": self.stats.to_dict()}


def _accuracy(trace: Trace, betas: Sequence[float]) -> tuple[float, np.ndarray]:
    exit_index, prediction = rule_from_spec(ExitRuleSpec("class_exclusion", tuple(betas))).simulate(trace)
    return float(np.mean(prediction == trace.labels)), exit_index


def _check_trace(trace: Trace) -> None:
    if trace.labels is None:
        raise UsageError("the beta search needs a labelled trace; pass labels to Runner.trace(images, labels)")
    if trace.num_exits < 2:
        raise UsageError(f"the trace has {trace.num_exits} exit; class exclusion needs at least one early exit")
    if trace.num_inputs == 0:
        raise UsageError("the trace is empty; trace at least one validation image")


def beta_search(trace: Trace, tolerance: float = TOLERANCE, step: float = BETA_STEP,
                backoff: int = BACKOFF_STEPS) -> BetaSearchResult:
    """The authors' per-exit beta search on a labelled trace.

    For exit k = 0, 1, ... (earlier exits fixed at their searched betas, later ones at 0.01): beta_k starts
    at 0.01 and rises by ``step`` while class exclusion stays at or above ``baseline - tolerance``; at the
    first beta below it, beta_k = that beta - ``backoff`` steps; clamped to [0.01, 0.99]. The baseline is the
    final exit's accuracy on the trace.

    Args:
        trace: every exit's outputs on validation images, with labels (``Runner.trace`` or a float trace).
        tolerance: allowed accuracy drop as a fraction (0.001 = 0.1 percentage points).
        step: beta increment.
        backoff: steps to go back from the first failing beta.

    Returns:
        A :class:`BetaSearchResult`.
    """
    _check_trace(trace)
    baseline = float(np.mean(trace.logits[-1].argmax(axis=1) == trace.labels))
    floor = baseline - tolerance
    n_early = trace.num_exits - 1
    betas = [BETA_MIN] * n_early
    history: list[list[tuple[float, float]]] = []
    levels = int(round((BETA_MAX - BETA_START) / step))
    for k in range(n_early):
        tried = []
        chosen = BETA_MAX
        for i in range(levels + 1):  # 0.01 .. 0.99; no failure at all keeps 0.99
            beta = round(BETA_START + i * step, 6)
            acc, _ = _accuracy(trace, betas[:k] + [beta] + betas[k + 1:])
            tried.append((beta, acc))
            if acc < floor:
                chosen = beta - backoff * step
                break
        betas[k] = round(min(BETA_MAX, max(BETA_MIN, chosen)), 6)
        history.append(tried)
        log.info("exit %d: beta %.2f (%d values tried)", k, betas[k], len(tried))
    acc, exit_index = _accuracy(trace, betas)
    frac = np.bincount(exit_index, minlength=trace.num_exits) / trace.num_inputs
    return BetaSearchResult(tuple(betas), baseline, acc, [float(v) for v in frac], exclusion_stats(trace, betas),
                            history)


def exclusion_stats(trace: Trace, betas: Sequence[float]) -> ExclusionStats:
    """Per-exit candidate-set statistics of class exclusion at ``betas`` on ``trace``.

    Follows the rule: an empty R_k keeps R_{k-1}; an input stops when |R_k| = 1; the final exit excludes
    nothing (it answers argmax over R).
    """
    n, e = trace.num_inputs, trace.num_exits
    rule = ClassExclusionRule(list(betas))
    remaining = np.ones(trace.logits[0].shape, dtype=bool)  # [N, K]
    active = np.ones(n, dtype=bool)
    reached, exited, excluded, left = [], [], [], []
    for k in range(e - 1):
        reached.append(float(active.mean()))
        before = np.count_nonzero(remaining, axis=-1)
        remaining, _ = narrow_candidates(remaining, rule.kept(trace, k))         # as the device decides
        after = np.count_nonzero(remaining, axis=-1)
        excluded.append(float((before - after)[active].mean()) if active.any() else 0.0)
        left.append(float(after[active].mean()) if active.any() else 0.0)
        stop = active & (after == 1)
        exited.append(float(stop.mean()))
        active &= ~stop
    reached.append(float(active.mean()))
    exited.append(float(active.mean()))
    excluded.append(0.0)
    left.append(float(np.count_nonzero(remaining, axis=-1)[active].mean()) if active.any() else 0.0)
    return ExclusionStats(reached, exited, excluded, left)


def attach_class_exits(backbone: Any, input_shape: Sequence[int], labels: Sequence[str], head: str = "pool",
                       hidden: int | None = None, **kwargs: Any) -> Any:
    """A frozen backbone with class-based exits (per-class sigmoid logits) at the exit points.

    Args:
        backbone, input_shape, labels: as :func:`edgeexit.workstation.posttrain.pteenet.attach_branches`.
        head: "pool" (global average pool + Linear(C, K), :class:`~edgeexit.workstation.models.heads.ClassHead`) or "spatial"
            (whole-map conv -> BN -> ReLU -> Linear(hidden, K), :class:`~edgeexit.workstation.models.heads.SpatialClassHead`;
            for the early maps of narrow networks, where C pooled numbers say too little).
        hidden: width of the "spatial" head (None: the feature map's channels); not allowed with "pool".
        **kwargs: the other arguments of :func:`edgeexit.workstation.posttrain.pteenet.attach_branches` (``exits_after`` or
            ``placement`` and ``num_exits``, ``features_end``, ``mean``/``std``, ``backbone_desc``).

    Returns:
        A StagedModel whose final exit is the backbone's own classifier; its spec records ``head`` and
        ``hidden``, so ``edgeexit.workstation.catalog.registry.build(model.spec)`` rebuilds it.

    Raises:
        UsageError: an unknown head kind, a bad ``hidden``, or ``branch`` other than "class" in kwargs.
    """
    from .pteenet import attach_branches

    if kwargs.pop("branch", "class") != "class":
        raise UsageError("attach_class_exits always attaches class heads; use pteenet.attach_branches for others")
    return attach_branches(backbone, input_shape, labels, branch="class", class_head_kind=head, hidden=hidden,
                           **kwargs)


def train_class_exits(model: Any, train_set: Any, val_set: Any, epochs: int = 3, pos_weight: float | None = None,
                      config: Any = None, progress: Progress | None = None) -> Any:
    """Train the class exits of a frozen-backbone model with the class-based loss.

    Args:
        model: from :func:`attach_class_exits`.
        train_set, val_set: uint8 image sets.
        epochs: training epochs (ignored when ``config`` is given).
        pos_weight: BCE positive-class weight (default K - 1: one positive balances K - 1 negatives).
        config: a full :class:`edgeexit.workstation.training.train.TrainConfig` (its loss must be "class").

    Returns:
        The :class:`edgeexit.workstation.training.train.TrainResult`; the backbone is checked bit-identical.
    """
    from .pteenet import train_branches
    from ..training.train import TrainConfig

    if config is None:
        config = TrainConfig(loss="class", epochs=epochs,
                             class_pos_weight=float(pos_weight if pos_weight is not None else model.num_classes - 1))
    if config.loss != "class":
        raise UsageError(f"class exits train with the class loss, got loss '{config.loss}'")
    return train_branches(model, train_set, val_set, config, progress=progress)


def tune_bundle_betas(bundle: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray,
                      tolerance: float = TOLERANCE, write: bool = True, backend: str = "auto",
                      data_name: str = "validation") -> tuple[BetaSearchResult, Trace]:
    """Search the betas on the bundle's int8 outputs and store them as its exit rule.

    Args:
        bundle: a converted bundle whose early exits have sigmoid (class) scores.
        images: [N, H, W, C] uint8 validation images (not the test set).
        labels: [N] int labels.
        tolerance: allowed accuracy drop (fraction).
        write: replace the manifest's ``exit_rule`` with ``class_exclusion`` at the searched betas and record
            the search (``training["class_exclusion"]``).
        backend: TFLite interpreter backend.
        data_name: recorded in the manifest.

    Returns:
        (the search result, the int8 trace it was computed on).

    Raises:
        TuningError: a bundle without class-based early exits.
    """
    from edgeexit.runtime.bundle import read_manifest, write_manifest_atomic
    from edgeexit.runtime.runner import Runner

    runner = Runner(bundle, backend=backend, power_sensor=None)
    kinds = [s.scores for s in runner.manifest.stages[:-1]]
    if any(k != "sigmoid" for k in kinds):
        raise TuningError(f"{bundle}: early exits score with {kinds}; the beta search needs class-based (sigmoid) "
                          "exits: train with class heads")
    trace = runner.trace(list(images), np.asarray(labels))
    result = beta_search(trace, tolerance=tolerance)
    if write:
        root, manifest = read_manifest(bundle)
        training = dict(manifest.training)
        training["class_exclusion"] = {**result.to_dict(), "searched_on": f"int8 trace of {len(labels)} "
                                       f"{data_name} images", "tolerance": tolerance, "step": BETA_STEP,
                                       "backoff_steps": BACKOFF_STEPS}
        write_manifest_atomic(root, manifest.replace(exit_rule=ExitRuleSpec("class_exclusion", result.betas),
                                                     training=training))
        log.info("wrote class_exclusion betas %s to %s", result.betas, root)
    return result, trace
