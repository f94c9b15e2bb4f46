"""Replaying exit rules on a recorded :class:`~edgeexit.runtime.trace.Trace`: the per-exit costs of a bundle,
what one rule achieves, and the level evaluators the front search uses.

For the independent rules (confidence, max_softmax, entropy) each exit's statistic is turned into a *level* per
input: candidate thresholds are taken at quantiles of that exit's statistic (midpoints between distinct observed
values, so the strictness of the comparison never matters), ordered from strict (level 0) to permissive, and an
input passes exit i at level L iff its level there is <= L. The exit an input takes under a level vector is then
one comparison and one argmax over [E-1, N]; with the ``most_confident`` fallback an input that passes no early
exit is correct when its most confident exit is (that exit does not depend on the thresholds). class_exclusion
(whose candidate sets carry over from exit to exit) is simulated exactly per candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..energy import BOARDS, Board, EnergyModel
from ..errors import TuningError, UsageError
from ..runtime.manifest import ExitRuleSpec, Manifest
from ..runtime.points import COST_KINDS, OperatingPoint
from ..runtime.rules import RULES, ClassExclusionRule, exit_scores, narrow_candidates, rule_from_spec
from ..runtime.trace import Trace

#: Rules whose per-exit parameters can be tuned.
TUNABLE_RULES = ("confidence", "max_softmax", "entropy", "class_exclusion")
#: class_exclusion betas stay inside the range the method's authors search.
BETA_RANGE = (0.01, 0.99)


@dataclass(frozen=True)
class ExitCosts:
    """What leaving at exit i costs on average, per exit (cumulative: every stage and head up to i).

    Attributes:
        macs_fraction: [E] MACs up to exit i (all heads paid for included) / MACs of the full network.
        latency_ms: [E] sum of the measured per-stage latencies (median over the trace) up to exit i.
        energy_mj: [E] energy of leaving at exit i in mJ, of kind ``energy_kind``, or None when there is none.
        energy_kind: "measured", "board_estimate" or "proxy" (see :mod:`edgeexit.energy.model`).
    """

    macs_fraction: np.ndarray
    latency_ms: np.ndarray
    energy_mj: np.ndarray | None = None
    energy_kind: str = "proxy"

    def vector(self, kind: str) -> np.ndarray:
        """The [E] cost vector of ``kind`` ("macs", "latency" or "energy")."""
        if kind == "macs":
            return self.macs_fraction
        if kind == "latency":
            return self.latency_ms
        if kind == "energy" and self.energy_mj is not None:
            return self.energy_mj
        if kind == "energy":
            raise TuningError("an energy target needs an energy estimate per stage, but this trace has none; use "
                              "--budget-latency-ms or --budget-macs instead")
        raise UsageError(f"unknown cost kind {kind!r}; expected one of {', '.join(COST_KINDS)}")


def exit_costs(manifest: Manifest, measured: Any = None, rule: str | None = None, board: Board | None = None,
               energy_kind: str | None = None) -> ExitCosts:
    """Per-exit cumulative costs of a bundle.

    MACs: :meth:`Manifest.cumulative_macs` / ``full_macs`` (every head paid for). Latency: the measured whole-call
    latency of an input leaving at each exit under a ``rule``-kind rule (an
    :class:`~edgeexit.bench.timing.ExitCostTable`); zeros without one. Energy: of ``energy_kind`` on ``board``
    (default ``generic``) from :class:`edgeexit.energy.EnergyModel`: measured (stored in the bundle by ``bench
    --store-energy``), board estimate (the latency above x the board's active power) or the operation proxy;
    None picks measured when the bundle has it for the board, else the proxy.

    Raises:
        TuningError: the table has another number of exits than the bundle; an energy kind the bundle or the
            timing has no figures for.
    """
    e = manifest.num_exits
    macs = np.asarray(manifest.cumulative_macs(), dtype=np.float64) / max(manifest.full_macs, 1)
    latency = np.zeros(e)
    if measured is not None and rule is not None:
        latency = measured.for_rule(rule)
        if latency.shape[0] != e:
            raise TuningError(f"the exit costs have {latency.shape[0]} exits but the bundle has {e}; measure them "
                              "with this bundle's Runner")
    model = EnergyModel(manifest, board or BOARDS["generic"])
    kind = energy_kind or model.default_kind()
    if kind == "board_estimate" and not np.any(latency):
        raise TuningError("a board-estimate energy needs the exit costs timed on this device: give --cost-images > 0")
    energy = model.exit_vector(kind, latency)
    if energy is None:
        raise TuningError(f"the bundle holds no measured energy for board {model.board.name}; measure it there with "
                          "`edgeexit bench --store-energy`, or use --energy-kind proxy or board_estimate")
    return ExitCosts(macs_fraction=macs, latency_ms=latency, energy_mj=energy, energy_kind=kind)


def evaluate_rule(trace: Trace, spec: ExitRuleSpec, costs: ExitCosts) -> OperatingPoint:
    """What an exit rule achieves on a labelled trace (accuracy, average costs, exit fractions).

    Raises:
        UsageError: a rule that does not fit the trace (thresholds count, no confidence outputs).
    """
    exit_index, prediction = rule_from_spec(spec).simulate(trace)
    labels = labels_of(trace)
    frac = np.bincount(exit_index, minlength=trace.num_exits) / max(trace.num_inputs, 1)
    return OperatingPoint(rule=spec.kind, thresholds=tuple(spec.thresholds),
                          accuracy=float(np.mean(prediction == labels)),
                          avg_macs_fraction=float(frac @ costs.macs_fraction),
                          est_latency_ms=float(frac @ costs.latency_ms),
                          energy_mj=None if costs.energy_mj is None else float(frac @ costs.energy_mj),
                          exit_fractions=tuple(float(f) for f in frac), fallback=spec.fallback)


def _predictions(trace: Trace) -> np.ndarray:
    """[E, N] int64 argmax of every exit's logits."""
    return np.stack([np.asarray(z).argmax(axis=-1) for z in trace.logits]).astype(np.int64)


def labels_of(trace: Trace) -> np.ndarray:
    if trace.labels is None:
        raise TuningError("the tuning trace has no labels; trace a labelled validation set "
                          "(Runner.trace(images, labels))")
    return np.asarray(trace.labels, dtype=np.int64)


class _LevelEvaluator:
    """Exit decisions of an independent rule as levels: input n passes exit i at level L iff level[i, n] <= L.

    Which inputs pass a candidate threshold is decided by the rule's own ``simulate`` (on a two-exit view of
    the trace), so tuned thresholds behave on the device exactly as they did here.
    """

    def __init__(self, trace: Trace, kind: str, levels: int, fallback: str = "final"):
        self.kind = kind
        self.num_exits = trace.num_exits
        self.labels = labels_of(trace)
        self.correct = _predictions(trace) == self.labels[None, :]   # [E, N] bool
        self.candidates: list[np.ndarray] = []                       # per exit: thresholds, strict -> permissive
        last = trace.num_exits - 1
        rows = []
        for i in range(last):
            values, strict, permissive, descending = _statistic(trace, kind, i)
            cands = _candidates(values, levels, strict, permissive, descending)
            view = trace.select([i, last])
            ok = np.stack([RULES[kind]((float(t),)).simulate(view)[0] == 0 for t in cands])  # [Q, N] bool
            first = np.where(ok.any(axis=0), ok.argmax(axis=0), len(cands))
            self.candidates.append(cands)
            rows.append(first.astype(np.int32))
        self.level = np.stack(rows)                                  # [E-1, N] int32
        self._n = int(self.labels.shape[0])
        self._cols = np.arange(self._n)                              # [N]
        self._exit_ids = np.arange(last, dtype=np.int64)[:, None]     # [E-1, 1]
        answered = self.correct.copy()                               # [E, N]: row = exit an input left at
        if fallback != "final":
            # an input no early exit stops answers from its most confident exit, whatever the thresholds
            best = RULES[kind]([0.0] * last, fallback=fallback).most_confident_exit(trace)   # [N]
            answered[last] = self.correct[best, self._cols]
        self._correct_flat = answered.ravel()                        # [E * N], row = exit

    def max_levels(self) -> np.ndarray:
        return np.array([len(c) - 1 for c in self.candidates], dtype=np.int64)

    def thresholds(self, levels: np.ndarray) -> tuple[float, ...]:
        return tuple(float(self.candidates[i][int(l)]) for i, l in enumerate(levels))

    def outcome(self, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(exit index [N] int64, correct [N] bool) under ``levels`` [E-1]."""
        # the earliest passing exit wins; the last exit always passes
        exit_index = np.where(self.level <= levels[:, None], self._exit_ids, self.num_exits - 1).min(axis=0)
        return exit_index, self._correct_flat[exit_index * self._n + self._cols]


class _ClassExclusionEvaluator:
    """The candidate-set rule for any beta vector, with every exit's "kept classes" precomputed per candidate.

    Which classes an exit keeps for a candidate beta comes from the rule itself
    (:meth:`~edgeexit.runtime.rules.ClassExclusionRule.kept`, on the trace's raw outputs as on the device); an
    empty set keeps the previous one, as in the rule; a test keeps the two equal. Candidate
    sets are bit masks (one uint64 per input) when there are at most 63 classes, boolean [N, K] otherwise.
    """

    def __init__(self, trace: Trace, levels: int):
        self.num_exits = trace.num_exits
        self.labels = labels_of(trace)
        last = trace.num_exits - 1
        self.final_logits = np.asarray(trace.logits[last])                     # [N, K]
        self.num_classes = int(self.final_logits.shape[-1])
        self.bits = self.num_classes <= 63
        self._weights = np.left_shift(np.uint64(1), np.arange(self.num_classes, dtype=np.uint64))  # [K] uint64
        self.candidates: list[np.ndarray] = []
        self.keep: list[np.ndarray] = []         # per exit: [Q, N] uint64 masks, or [Q, N, K] bool
        rule = ClassExclusionRule([0.0] * last)
        for i in range(last):
            s = exit_scores(trace.logits[i], trace.scores[i])                   # [N, K] float64
            srt = np.sort(s, axis=1)
            ratio = srt[:, -2] / np.maximum(srt[:, -1], np.finfo(np.float64).tiny)  # beta >= ratio: one class left
            cands = _candidates(np.clip(ratio, *BETA_RANGE), levels, BETA_RANGE[0], BETA_RANGE[1], descending=False)
            masks = [rule.kept(trace, i, beta) for beta in cands]               # Q x [N, K] bool, as on the device
            self.candidates.append(cands)
            self.keep.append(np.stack([self._pack(m) for m in masks]) if self.bits else np.stack(masks))

    def _pack(self, mask: np.ndarray) -> np.ndarray:
        """[N, K] bool -> [N] uint64 bit masks."""
        return (mask.astype(np.uint64) * self._weights).sum(axis=-1, dtype=np.uint64)

    def max_levels(self) -> np.ndarray:
        return np.array([len(c) - 1 for c in self.candidates], dtype=np.int64)

    def thresholds(self, levels: np.ndarray) -> tuple[float, ...]:
        return tuple(float(self.candidates[i][int(l)]) for i, l in enumerate(levels))

    def outcome(self, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.labels.shape[0]
        exit_index = np.full(n, self.num_exits - 1, dtype=np.int64)
        prediction = np.zeros(n, dtype=np.int64)
        done = np.zeros(n, dtype=bool)
        if self.bits:
            remaining = np.full(n, int(self._weights.sum()), dtype=np.uint64)   # [N] every class
            for k, level in enumerate(levels):
                keep = remaining & self.keep[k][int(level)]
                take = (keep != 0) & ~done
                remaining = np.where(take, keep, remaining)
                single = ((remaining & (remaining - np.uint64(1))) == 0) & ~done
                exit_index[single] = k
                prediction[single] = np.log2(remaining[single].astype(np.float64)).astype(np.int64)
                done |= single
            rest = ~done
            alive = (remaining[rest, None] & self._weights[None, :]) != 0       # [n_rest, K]
        else:
            remaining_b = np.ones(self.final_logits.shape, dtype=bool)          # [N, K]
            for k, level in enumerate(levels):
                remaining_b, single = narrow_candidates(remaining_b, self.keep[k][int(level)])
                single &= ~done
                exit_index[single] = k
                prediction[single] = remaining_b[single].argmax(axis=-1)
                done |= single
            rest = ~done
            alive = remaining_b[rest]
        prediction[rest] = np.where(alive, self.final_logits[rest], -np.inf).argmax(axis=-1)
        return exit_index, prediction == self.labels


def _statistic(trace: Trace, kind: str, i: int) -> tuple[np.ndarray, float, float, bool]:
    """(values [N] float64, strictest threshold, most permissive threshold, permissive = lower) of exit i."""
    if kind == "confidence":
        conf = trace.confidence[i]
        if conf is None:
            raise TuningError(f"rule 'confidence' needs a confidence output on every early exit, but exit {i} has "
                              "none; tune with --rule max_softmax or --rule entropy instead")
        return 1.0 / (1.0 + np.exp(-np.asarray(conf, dtype=np.float64).reshape(-1))), 1.0, 0.0, True
    z = np.asarray(trace.logits[i], dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=-1)
    if kind == "max_softmax":
        return 1.0 / total, 1.0, 0.0, True
    if kind == "entropy":
        h = np.log(total) - (e * z).sum(axis=-1) / total
        return h, 0.0, math.log(z.shape[-1]) + 1e-3, False
    raise UsageError(f"rule {kind!r} has no per-exit statistic; tunable rules: {', '.join(TUNABLE_RULES)}")


def _candidates(values: np.ndarray, levels: int, strict: float, permissive: float, descending: bool) -> np.ndarray:
    """Candidate thresholds ordered strict -> permissive: the two ends plus up to ``levels`` midpoints between
    distinct observed values, placed at quantiles of ``values``."""
    u = np.unique(values)                                   # ascending distinct values
    mids = (u[:-1] + u[1:]) / 2.0
    if mids.size > levels:
        qs = np.quantile(values, np.linspace(0.0, 1.0, levels + 2)[1:-1])
        mids = np.unique(mids[np.clip(np.searchsorted(mids, qs), 0, mids.size - 1)])
    lo, hi = min(strict, permissive), max(strict, permissive)
    mids = mids[(mids > lo) & (mids < hi)]
    ordered = mids[::-1] if descending else mids
    return np.concatenate([[strict], ordered, [permissive]]).astype(np.float64)
