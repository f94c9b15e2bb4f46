"""Threshold tuning: the accuracy / cost trade-off front of an exit rule, searched on one traced validation set.

Every stage runs ONCE per validation input (a :class:`~edgeexit.runtime.trace.Trace`); the search then only
re-decides exits with numpy. For the independent rules (confidence, max_softmax, entropy) each exit's
statistic is turned into a *level* per input: candidate thresholds are taken at quantiles of that exit's
statistic (midpoints between distinct observed values, so the strictness of the comparison never matters),
ordered from strict (level 0) to permissive, and an input passes exit i at level L iff its level there is
<= L. The exit an input takes under a level vector is then one comparison and one argmax over [E-1, N].
class_exclusion (whose candidate sets carry over from exit to exit) is simulated exactly per candidate.

The front is built by two greedy walks (from "everything runs to the end" down to "everything leaves at the
first exit", and back up), each step taking the move with the best accuracy-per-cost ratio, then refined
for the target by coordinate descent over every exit's levels. Every evaluated point is kept; the Pareto set
of (average cost, accuracy) is the front. Costs are linear in the exit histogram, so every point carries its
average MACs fraction, estimated latency and energy.

Operating points are stored in the manifest's ``operating_points``: ``"original"`` (the rule the bundle had
before its first tuning, kept recoverable), one entry per tuned name, ``"front"`` and ``"exit_costs"`` (the
per-exit cost estimates the front was computed with). A Runner switches
between them at run time with :func:`use_operating_point`, by name or by budget.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import BundleError, EdgeExitError, TuningError, UsageError
from ..runtime.manifest import EXIT_RULES, ExitRuleSpec, Manifest
from ..energy import BOARDS, KIND_LABELS, KINDS, Board, EnergyModel
from ..progress import Progress, reporting
from ..runtime.rules import RULES, ClassExclusionRule, exit_scores, rule_from_spec
from ..runtime.trace import Trace

log = logging.getLogger(__name__)

#: Rules whose per-exit parameters can be tuned.
TUNABLE_RULES = ("confidence", "max_softmax", "entropy", "class_exclusion")
#: Average costs a front can be built against.
COST_KINDS = ("macs", "latency", "energy")
#: Names in ``operating_points`` that are not tuned points.
RESERVED_NAMES = ("original", "front", "exit_costs")
#: Images that time the exit costs during tuning (see :func:`tune_bundle`).
DEFAULT_COST_IMAGES = 500
#: Candidate thresholds per exit (quantiles of the exit's statistic), not counting the two ends.
DEFAULT_LEVELS = 64
#: At most this many front points are written into a manifest (evenly spread over the cost range).
MAX_STORED_FRONT = 64
#: class_exclusion betas stay inside the range the method's authors search.
BETA_RANGE = (0.01, 0.99)
#: Operating points are stored rounded to 6 decimals: budgets are compared within that rounding.
_STORED_TOL = 1e-6


# ----------------------------------------------------------------------------------------------- data types

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


@dataclass(frozen=True)
class OperatingPoint:
    """One exit rule with its thresholds and what it achieved on the tuning data."""

    rule: str
    thresholds: tuple[float, ...]
    accuracy: float                # fraction correct on the tuning data
    avg_macs_fraction: float       # average MACs per input / full network MACs
    est_latency_ms: float          # average estimated latency per input
    energy_mj: float | None        # average energy per input, mJ, of the front's kind (ExitCosts.energy_kind)
    exit_fractions: tuple[float, ...]  # share of inputs leaving at each exit

    def cost(self, kind: str) -> float:
        """The point's average cost of ``kind`` ("macs", "latency", "energy")."""
        if kind == "macs":
            return self.avg_macs_fraction
        if kind == "latency":
            return self.est_latency_ms
        if kind == "energy":
            if self.energy_mj is None:
                raise TuningError("this operating point has no energy estimate; choose by latency or MACs")
            return self.energy_mj
        raise UsageError(f"unknown cost kind {kind!r}; expected one of {', '.join(COST_KINDS)}")

    def rule_spec(self) -> ExitRuleSpec:
        """The point as the manifest's exit rule."""
        return ExitRuleSpec(kind=self.rule, thresholds=tuple(self.thresholds), exit=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; ``kind`` / ``thresholds`` read as an ExitRuleSpec (``Runner(rule=NAME)``)."""
        return {"kind": self.rule, "thresholds": [float(t) for t in self.thresholds],
                "accuracy": round(self.accuracy, 6), "avg_macs_fraction": round(self.avg_macs_fraction, 6),
                "est_latency_ms": round(self.est_latency_ms, 6),
                "energy_mj": None if self.energy_mj is None else round(self.energy_mj, 9),
                "exit_fractions": [round(f, 6) for f in self.exit_fractions]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "operating point") -> "OperatingPoint":
        """Parse a stored point; raises TuningError when fields are missing or of the wrong type."""
        try:
            rule = str(d["kind"])
            thresholds = tuple(float(t) for t in d["thresholds"])
            energy = d.get("energy_mj")
            return cls(rule=rule, thresholds=thresholds, accuracy=float(d["accuracy"]),
                       avg_macs_fraction=float(d["avg_macs_fraction"]), est_latency_ms=float(d["est_latency_ms"]),
                       energy_mj=None if energy is None else float(energy),
                       exit_fractions=tuple(float(f) for f in d.get("exit_fractions", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise TuningError(f"{where} in the manifest is incomplete ({type(exc).__name__}: {exc}); re-run "
                              "`edgeexit tune` on the bundle") from None


@dataclass(frozen=True)
class Target:
    """What the tuned point must meet: an accuracy floor, or one cost budget. Exactly one field is set.

    Attributes:
        max_drop_pp: accuracy may fall at most this many percentage points below the final exit's accuracy
            on the same data; the cheapest such point (by ``cost_kind``) is chosen.
        min_accuracy: an absolute accuracy floor (fraction in [0, 1]); the cheapest point reaching it.
        no_worse_than: the name of a rule to beat: an operating point stored in the bundle, or "current" (the
            bundle's exit rule). :func:`tune_bundle` evaluates it on the same trace and turns it into
            ``min_accuracy``; it keeps the reference when no cheaper point is at least as accurate.
        budget_macs: average MACs as a fraction of the full network; the most accurate point within it.
        budget_latency_ms: average estimated latency per input in ms.
        budget_energy_mj: average energy per input in mJ.
        energy_kind: the energy budgets and fronts are in ("measured", "board_estimate", "proxy"); None: measured
            when the bundle holds measured figures for the board, else the operation proxy. Not a target itself.
    """

    max_drop_pp: float | None = None
    budget_macs: float | None = None
    budget_latency_ms: float | None = None
    budget_energy_mj: float | None = None
    min_accuracy: float | None = None
    no_worse_than: str | None = None
    minimize: str = "latency"
    energy_kind: str | None = None

    def __post_init__(self) -> None:
        if self.minimize not in COST_KINDS:
            raise UsageError(f"minimize must be one of {', '.join(COST_KINDS)}, got {self.minimize!r}")
        if self.energy_kind is not None and self.energy_kind not in KINDS:
            raise UsageError(f"energy kind {self.energy_kind!r} is not one of {', '.join(KINDS)}")
        given = {k: v for k, v in self.__dict__.items() if v is not None and k not in ("minimize", "energy_kind")}
        if len(given) != 1:
            raise UsageError(f"give exactly one tuning target (--max-drop, --no-worse-than, --budget-macs, "
                             f"--budget-latency-ms or --budget-energy-mj), got {sorted(given) or 'none'}")
        (key, value), = given.items()
        if key == "no_worse_than":
            if not isinstance(value, str) or not value:
                raise UsageError(f"no_worse_than must name an operating point or 'current', got {value!r}")
            return
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise UsageError(f"target {key}={value!r} must be a finite number >= 0")
        if key == "min_accuracy" and value > 1:
            raise UsageError(f"target min_accuracy={value!r} is a fraction of correct answers; give a number in [0, 1]")
        if key not in ("max_drop_pp", "min_accuracy") and value == 0:
            raise UsageError(f"target {key}=0 cannot be met by any network; give a positive budget")

    @property
    def is_accuracy_target(self) -> bool:
        """True for an accuracy floor (cheapest point that meets it), False for a cost budget."""
        return self.max_drop_pp is not None or self.min_accuracy is not None or self.no_worse_than is not None

    def floor(self, final_accuracy: float) -> float | None:
        """The accuracy the chosen point must reach, given the final exit's; None for a cost budget.

        Raises:
            UsageError: a ``no_worse_than`` target that :func:`tune_bundle` has not resolved yet.
        """
        if self.no_worse_than is not None:
            raise UsageError(f"target 'no worse than {self.no_worse_than}' needs the reference evaluated on the same "
                             "data: use tune_bundle, or pass Target(min_accuracy=<its accuracy>)")
        if self.min_accuracy is not None:
            return float(self.min_accuracy)
        if self.max_drop_pp is not None:
            return final_accuracy - self.max_drop_pp / 100.0
        return None

    @property
    def cost_kind(self) -> str:
        """The cost the front is built against: the budget's kind, or ``minimize`` for an accuracy target."""
        if self.budget_latency_ms is not None:
            return "latency"
        if self.budget_energy_mj is not None:
            return "energy"
        if self.budget_macs is not None:
            return "macs"
        return self.minimize

    @property
    def budget(self) -> float | None:
        """The cost budget, or None for an accuracy target."""
        for v in (self.budget_macs, self.budget_latency_ms, self.budget_energy_mj):
            if v is not None:
                return float(v)
        return None

    def describe(self) -> str:
        if self.max_drop_pp is not None:
            return f"accuracy drop <= {self.max_drop_pp:g} pp"
        if self.min_accuracy is not None:
            return f"accuracy >= {100 * self.min_accuracy:.2f}%"
        if self.no_worse_than is not None:
            return f"accuracy no worse than '{self.no_worse_than}', lowest {_cost_label(self.cost_kind)}"
        kind = f" ({KIND_LABELS[self.energy_kind]})" if self.cost_kind == "energy" and self.energy_kind else ""
        return f"average {_cost_label(self.cost_kind)}{kind} <= {_fmt_cost(self.cost_kind, self.budget or 0.0)}"

    def to_dict(self) -> dict[str, float | str]:
        out = {k: (v if isinstance(v, str) else float(v)) for k, v in self.__dict__.items()
               if v is not None and k != "minimize"}
        if self.is_accuracy_target:
            out["minimize"] = self.minimize
        return out


@dataclass(frozen=True)
class TuneResult:
    """The outcome of a search: the chosen point and the whole front.

    Attributes:
        chosen: the point that meets the target.
        front: the Pareto front, sorted by ``cost_kind`` ascending; accuracy never decreases along it.
        cost_kind: "macs", "latency" or "energy".
        final_accuracy: accuracy of the final exit alone on the same data.
        target: what was asked for.
        n: number of tuning inputs.
        data: where the tuning data came from.
        search_s: wall time of the search itself (not the trace).
        evaluated: number of threshold vectors evaluated.
        reference: for a ``no_worse_than`` target, the reference rule evaluated on the same data (``chosen``
            is the reference itself when no cheaper point is at least as accurate); ``target`` then holds
            the resolved ``min_accuracy``.
        reference_name: the name the reference was asked for by.
        margin_pp: how far above the reference's accuracy the floor was set.
    """

    chosen: OperatingPoint
    front: tuple[OperatingPoint, ...]
    cost_kind: str
    final_accuracy: float
    target: Target
    n: int
    data: str = ""
    search_s: float = 0.0
    evaluated: int = 0
    exit_costs: ExitCosts | None = None
    reference: OperatingPoint | None = None
    reference_name: str | None = None
    margin_pp: float = 0.0

    def target_dict(self) -> dict[str, Any]:
        """The target as asked and as resolved (with the reference point for ``no_worse_than``)."""
        d: dict[str, Any] = dict(self.target.to_dict())
        if self.reference is not None:
            d.update(no_worse_than=self.reference_name, margin_pp=self.margin_pp, reference=self.reference.to_dict())
        return d

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen.to_dict(), "cost_kind": self.cost_kind,
                "final_accuracy": round(self.final_accuracy, 6), "target": self.target_dict(), "n": self.n,
                "data": self.data, "search_s": round(self.search_s, 4), "evaluated": self.evaluated,
                "front": [p.to_dict() for p in self.front]}


def _cost_label(kind: str) -> str:
    return {"macs": "MACs", "latency": "latency", "energy": "energy"}.get(kind, kind)


def _fmt_cost(kind: str, value: float) -> str:
    if kind == "macs":
        return f"{100 * value:.1f}% of the full MACs"
    if kind == "latency":
        return f"{value:.4g} ms"
    return f"{value:.4g} mJ"


# --------------------------------------------------------------------------------------------- evaluators

def _predictions(trace: Trace) -> np.ndarray:
    """[E, N] int64 argmax of every exit's logits."""
    return np.stack([np.asarray(z).argmax(axis=-1) for z in trace.logits]).astype(np.int64)


def _labels(trace: Trace) -> np.ndarray:
    if trace.labels is None:
        raise TuningError("the tuning trace has no labels; trace a labelled validation set "
                          "(Runner.trace(images, labels))")
    return np.asarray(trace.labels, dtype=np.int64)


class _LevelEvaluator:
    """Exit decisions of an independent rule as levels: input n passes exit i at level L iff level[i, n] <= L.

    Which inputs pass a candidate threshold is decided by the rule's own ``simulate`` (on a two-exit view of
    the trace), so tuned thresholds behave on the device exactly as they did here.
    """

    def __init__(self, trace: Trace, kind: str, levels: int):
        self.kind = kind
        self.num_exits = trace.num_exits
        self.labels = _labels(trace)
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
        self._correct_flat = self.correct.ravel()                    # [E * N], row = exit

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
        self.labels = _labels(trace)
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
                keep_b = remaining_b & self.keep[k][int(level)]
                take = keep_b.any(axis=-1) & ~done
                remaining_b[take] = keep_b[take]
                single = (np.count_nonzero(remaining_b, axis=-1) == 1) & ~done
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


# ------------------------------------------------------------------------------------------------- search

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
                f"at {_fmt_cost(kind, cost)}; {fix}")
    _, acc, cost, _ = min(front, key=lambda p: (p[2], -p[1]))
    return (f"no operating point fits the budget of {_fmt_cost(kind, target.budget or 0.0)}: the cheapest point "
            f"costs {_fmt_cost(kind, cost)} (accuracy {100 * acc:.2f}%); raise the budget")


# --------------------------------------------------------------------------------------- trace -> costs

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
    labels = _labels(trace)
    frac = np.bincount(exit_index, minlength=trace.num_exits) / max(trace.num_inputs, 1)
    return OperatingPoint(rule=spec.kind, thresholds=tuple(spec.thresholds),
                          accuracy=float(np.mean(prediction == labels)),
                          avg_macs_fraction=float(frac @ costs.macs_fraction),
                          est_latency_ms=float(frac @ costs.latency_ms),
                          energy_mj=None if costs.energy_mj is None else float(frac @ costs.energy_mj),
                          exit_fractions=tuple(float(f) for f in frac))


# ------------------------------------------------------------------------------------ bundle <-> tuning

def updated_manifest(manifest: Manifest, result: TuneResult, name: str, original: OperatingPoint | None = None,
                     max_front: int = MAX_STORED_FRONT, table: Any = None) -> Manifest:
    """The manifest with the tuned point stored under ``name``, the front, and ``exit_rule`` = the chosen point.

    ``operating_points["original"]`` is set to the bundle's exit rule before its FIRST tuning and never
    overwritten afterwards, so the converter's thresholds stay recoverable.

    Raises:
        UsageError: ``name`` is empty, reserved ("original", "front") or not a plain identifier.
    """
    check_point_name(name)
    points = dict(manifest.operating_points)
    if "original" not in points:
        spec = manifest.exit_rule
        entry: dict[str, Any] = {"kind": spec.kind, "thresholds": list(spec.thresholds), "exit": spec.exit}
        if original is not None:
            entry.update({k: v for k, v in original.to_dict().items() if k not in ("kind", "thresholds")})
            entry.update({"data": result.data, "n": result.n})
        points["original"] = entry
    points[name] = {**result.chosen.to_dict(), "data": result.data, "n": result.n,
                    "target": result.target_dict(), "final_accuracy": round(result.final_accuracy, 6)}
    points["front"] = [p.to_dict() for p in thin_front(result.front, result.cost_kind, max_front)]
    if result.exit_costs is not None:
        c = result.exit_costs
        points["exit_costs"] = {"macs_fraction": [round(float(v), 6) for v in c.macs_fraction],
                                "energy_mj": None if c.energy_mj is None else [float(v) for v in c.energy_mj],
                                "energy_kind": c.energy_kind,
                                **(table.to_dict() if table is not None else {"latency_ms": {}})}
    return manifest.replace(operating_points=points, exit_rule=result.chosen.rule_spec())


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


def tune_bundle(bundle: str | os.PathLike[str], data: str, target: Target, *, rule: str | None = None,
                name: str = "tuned", split: str = "test", limit: int | None = None, dry_run: bool = False,
                levels: int = DEFAULT_LEVELS, backend: str = "auto", margin_pp: float | None = None,
                progress: Progress | None = None, cost_images: int = DEFAULT_COST_IMAGES,
                board: str | Board | None = None) -> TuneResult:
    """Trace a labelled validation set once, search the front, and store the chosen point in the bundle.

    Args:
        bundle: the bundle directory.
        data: a dataset spec for :func:`edgeexit.bench.datasets.load_dataset`.
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
            percentage points on the tuning data (a finite tuning set overstates what carries over); None =
            one binomial standard error of the reference's accuracy there (0.14 pp at 99 % on 5,000 inputs).
        progress: ``progress("trace", done, total)`` while the images are traced (see :mod:`edgeexit.progress`).
        board: the board profile energy costs are for (None / "auto": detect it).
        cost_images: how many of the images time the exit costs (the whole-call latency of an input forced to
            leave at each exit, per rule kind; :func:`edgeexit.bench.timing.measure_exit_costs`), which the
            latency of every candidate point is estimated from; 0 = no latency estimates.

    Returns:
        The :class:`TuneResult`.

    Raises:
        BundleError: the bundle is invalid; DatasetError: the data cannot be read or does not fit;
        TuningError: the target cannot be met; UsageError: bad arguments.
    """
    from ..runtime.bundle import load_bundle, write_manifest_atomic  # noqa: PLC0415
    from ..bench.datasets import check_dataset, load_dataset  # noqa: PLC0415
    from ..runtime.runner import Runner  # noqa: PLC0415

    check_point_name(name)
    if margin_pp is not None and not (isinstance(margin_pp, (int, float)) and math.isfinite(margin_pp)
                                      and margin_pp >= 0):
        raise UsageError(f"margin must be a finite number of percentage points >= 0, got {margin_pp!r}")
    loaded = load_bundle(bundle, backend=backend)
    manifest = loaded.manifest
    kind = rule or (manifest.exit_rule.kind if manifest.exit_rule.kind in TUNABLE_RULES else "max_softmax")
    if kind != "any" and kind not in TUNABLE_RULES:
        raise UsageError(f"--rule {kind} cannot be tuned; choose one of {', '.join(TUNABLE_RULES)} or any")
    images = load_dataset(data, split=split, limit=limit)
    check_dataset(manifest, images)
    runner = Runner(loaded, backend=backend, rule=ExitRuleSpec("final", ()), power_sensor=None, board=board)
    seq = reporting(images.images, len(images), "trace", progress)
    log.info("tracing %d images through %d stages", len(images), manifest.num_exits)
    trace = runner.trace(seq, images.labels)
    searched = TUNABLE_RULES if kind == "any" else (kind,)
    ref_spec = reference_rule(manifest, target.no_worse_than) if target.no_worse_than is not None else None
    table = _measure_costs(runner, images.images, searched, manifest, ref_spec, cost_images)
    if table is None and target.cost_kind == "latency":
        if target.budget_latency_ms is not None:
            raise UsageError("a latency budget needs the exit costs timed on this device: give --cost-images > 0")
        log.info("no exit costs timed (cost_images=0): minimizing MACs instead of latency")
        target = dataclasses.replace(target, minimize="macs")

    def costs_for(rule_kind: str) -> ExitCosts:
        return exit_costs(manifest, table, rule_kind, runner.board, target.energy_kind)

    reference = (evaluate_rule(trace, ref_spec, costs_for(ref_spec.kind))
                 if ref_spec is not None else None)
    results, errors = [], []
    for k in searched:
        costs = costs_for(k)
        try:
            if reference is not None:
                results.append(_beat_reference(trace, costs, k, reference, target.no_worse_than, levels, margin_pp))
            else:
                results.append(search_front(trace, costs, k, target, levels=levels))
        except (TuningError, UsageError) as exc:
            if kind != "any":
                raise
            errors.append(exc)
            log.info("rule %s: %s", k, exc)
    if not results:
        raise errors[0]
    result = dataclasses.replace(_best(results, target), data=images.name)
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


def _measure_costs(runner: Any, images: np.ndarray, searched: Sequence[str], manifest: Manifest,
                   reference: ExitRuleSpec | None, cost_images: int) -> Any:
    """Time the exit costs of every rule kind tuning needs, on the first ``cost_images`` images (None if 0)."""
    from ..bench.timing import COST_KINDS, measure_exit_costs  # noqa: PLC0415

    if isinstance(cost_images, bool) or not isinstance(cost_images, int) or cost_images < 0:
        raise UsageError(f"cost_images must be an integer >= 0, got {cost_images!r}")
    if cost_images == 0:
        return None
    rules = [rule_from_spec(s) for s in (reference, manifest.exit_rule) if s is not None]
    kinds = [k for k in COST_KINDS if k in {*searched, *(r.kind for r in rules)} or k == "fixed"]
    log.info("timing exit costs (%s) on %d images", ", ".join(kinds), min(cost_images, len(images)))
    return measure_exit_costs(runner, list(images[:cost_images]), kinds, rules=rules, repeat=3)


def reference_rule(manifest: Manifest, name: str) -> ExitRuleSpec:
    """The rule called ``name``: "current" (the bundle's exit rule) or one of its stored operating points
    ("original" is the current rule until the bundle is tuned for the first time).

    Raises:
        UsageError: no such operating point (the message lists the names there are).
    """
    points = manifest.operating_points
    if name == "current" or (name == "original" and "original" not in points):  # not tuned yet: still the original
        return manifest.exit_rule
    try:
        rule = manifest.point_rule(name) if name not in RESERVED_NAMES or name == "original" else None
    except BundleError as exc:
        raise UsageError(str(exc)) from None
    if rule is None:
        names = sorted(k for k, v in points.items() if isinstance(v, Mapping) and k not in ("exit_costs",))
        raise UsageError(f"--no-worse-than {name!r}: the bundle has no such operating point; use 'current' or one "
                         f"of {names or 'none (tune once first)'}")
    return rule


def standard_error_pp(accuracy: float, n: int) -> float:
    """The binomial standard error of an accuracy measured on ``n`` inputs, in percentage points."""
    return 100.0 * math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / max(n, 1))


def _beat_reference(trace: Trace, costs: ExitCosts, kind: str, reference: OperatingPoint, name: str,
                    levels: int, margin_pp: float | None = None) -> TuneResult:
    """Cheapest point at least ``margin_pp`` more accurate than ``reference`` (the rule called ``name``, evaluated
    on this trace), or the reference itself when no point is cheaper. The margin (default: one standard error
    of the reference's accuracy on this trace) keeps the advantage on data the search did not see."""
    if margin_pp is None:
        margin_pp = standard_error_pp(reference.accuracy, trace.num_inputs)
    floor = min(1.0, reference.accuracy + margin_pp / 100.0)
    result = dataclasses.replace(search_front(trace, costs, kind, Target(min_accuracy=floor), levels=levels),
                                 reference=reference, reference_name=name, margin_pp=float(margin_pp))
    cost = result.cost_kind
    if reference.cost(cost) <= result.chosen.cost(cost):
        log.info("no point of the %s front is cheaper than %r at its accuracy; keeping the reference", kind, name)
        result = dataclasses.replace(result, chosen=reference)
    return result


def _best(results: Sequence[TuneResult], target: Target) -> TuneResult:
    """Of several rules' results: the cheapest chosen point (accuracy target) or the most accurate (budget)."""
    if len(results) == 1:
        return results[0]
    kind = results[0].cost_kind
    if target.is_accuracy_target:
        return min(results, key=lambda r: (r.chosen.cost(kind), -r.chosen.accuracy))
    return max(results, key=lambda r: (r.chosen.accuracy, -r.chosen.cost(kind)))


# ------------------------------------------------------------------------------ run-time point switching

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
        parts += [f"{_cost_label(k)} <= {_fmt_cost(k, v)}" for k, v in self.limits().items()]
        return ", ".join(parts) or "no constraint"


@dataclass(frozen=True)
class OperatingPoints:
    """The operating points stored in a manifest: named ones and the trade-off front (sorted by MACs)."""

    named: Mapping[str, OperatingPoint] = field(default_factory=dict)
    specs: Mapping[str, ExitRuleSpec] = field(default_factory=dict)  # every named point's rule (metrics or not)
    front: tuple[OperatingPoint, ...] = ()

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "OperatingPoints":
        """Read ``manifest.operating_points``; entries without metrics are usable by name only."""
        named: dict[str, OperatingPoint] = {}
        specs: dict[str, ExitRuleSpec] = {}
        front: list[OperatingPoint] = []
        for key, value in manifest.operating_points.items():
            if key == "exit_costs":
                continue
            if key == "front":
                if isinstance(value, list):
                    front = [OperatingPoint.from_dict(v, f"operating_points.front[{i}]") for i, v in enumerate(value)]
                continue
            if not isinstance(value, Mapping):
                continue
            try:
                specs[key] = manifest.point_rule(key)
            except EdgeExitError as exc:
                log.warning("operating point %r is unusable: %s", key, exc)
                continue
            if "accuracy" in value and "avg_macs_fraction" in value:
                named[key] = OperatingPoint.from_dict({**value, "kind": specs[key].kind,
                                                      "thresholds": list(specs[key].thresholds)},
                                                     f"operating_points.{key}")
        front.sort(key=lambda p: (p.avg_macs_fraction, p.accuracy))
        return cls(named=named, specs=specs, front=tuple(front))

    def candidates(self) -> list[OperatingPoint]:
        """Every point with metrics: the front and the named points."""
        return list(self.front) + [p for p in self.named.values() if p not in self.front]

    def select(self, budget: Budget) -> OperatingPoint:
        """The point a :class:`Budget` asks for.

        Raises:
            TuningError: no stored point meets it (the message names the closest one), or there are none.
        """
        points = self.candidates()
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
                              f"{_fmt_cost(first, cheapest.cost(first))} at {100 * cheapest.accuracy:.2f}% accuracy")
        best = max(points, key=lambda p: p.accuracy)
        raise TuningError(f"no operating point meets {budget.describe()}: the most accurate reaches "
                          f"{100 * best.accuracy:.2f}% at {_fmt_cost('macs', best.avg_macs_fraction)}")


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
        points = OperatingPoints.from_manifest(runner.manifest)
        if choice not in points.specs:
            raise UsageError(f"the bundle has no operating point {choice!r}; it has "
                             f"{sorted(points.specs) or 'none'} (create them with `edgeexit tune`)")
        spec = points.specs[choice]
    elif isinstance(choice, Budget):
        spec = OperatingPoints.from_manifest(runner.manifest).select(choice).rule_spec()
    elif isinstance(choice, OperatingPoint):
        spec = choice.rule_spec()
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
