"""Exit rules: when an input may leave the network at an exit, and what it answers there.

One class per kind in :data:`edgeexit.runtime.manifest.EXIT_RULES`. Exits are numbered 0..E-1; thresholds have one
value per exit except the last, which always exits.

=================  =====================================================================================
kind               input leaves at exit i (< E-1) when ...
=================  =====================================================================================
confidence         ``sigmoid(confidence_logit_i) > T_i``  (EENets / PTEENet; ``T_i`` in [0, 1])
max_softmax        ``max softmax(logits_i) >= T_i``       (Shallow-Deep Networks; ``T_i`` in [0, 1])
entropy            ``H(softmax(logits_i)) < T_i`` nats    (BranchyNet; ``T_i`` >= 0)
class_exclusion    the candidate set ``R_i = R_{i-1} ∩ {c : s_c > beta_i max s}`` has one class left
                   (s = the exit's class scores, sigmoid or softmax as the manifest says; ``beta_i`` in
                   [0, 1]; an empty ``R_i`` keeps ``R_{i-1}``); the last exit answers argmax over R
final              never: every input runs to the last exit
fixed              i == the configured exit
=================  =====================================================================================

The answer at an exit is the argmax of its logits (class_exclusion: the remaining class, or the argmax over
R of the final logits). Each rule has a per-input :meth:`ExitRule.decide` (the Runner's hot path) and a
vectorised :meth:`ExitRule.simulate` over a :class:`Trace`; both compute the same comparisons on the same
float32 values, so they agree exactly (a test keeps them equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import UsageError
from .manifest import ExitRuleSpec
from .trace import Trace

CONTINUE = -1  # decide() result: go on to the next stage


# ---- score functions shared by decide and simulate (same float32 ops on [..., K]) ---------------------------
def _softmax_sum(logits: np.ndarray) -> np.ndarray:
    """sum(exp(x - max x)) over the last axis; max softmax = 1 / this."""
    return np.exp(logits - logits.max(axis=-1, keepdims=True)).sum(axis=-1)


def _entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy (nats) of softmax(logits) over the last axis: log Z - sum(e * z) / Z, z = x - max x."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=-1)
    return np.log(total) - (e * z).sum(axis=-1) / total


def _scores(logits: np.ndarray, kind: str) -> np.ndarray:
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class ExitRule:
    """Base class. Subclasses implement ``_stop`` (threshold rules) or override decide/simulate."""

    kind: str = ""
    uses_confidence: bool = False
    #: False when the rule never looks at an exit's outputs before it stops (final, fixed): the Runner then
    #: skips dequantizing them and only reads the outputs of ``stop_exit`` / the last exit.
    inspects_exits: bool = True
    stop_exit: int = -1

    def __init__(self, thresholds: Sequence[float] = ()):
        self.thresholds = _check_thresholds(self.kind, thresholds, self._range)
        self.num_exits: int | None = None

    _range: tuple[float, float] = (0.0, 1.0)

    # ---- configuration -------------------------------------------------------------------------------
    def prepare(self, num_exits: int, scores: Sequence[str], has_confidence: Sequence[bool]) -> None:
        """Bind the rule to a network with ``num_exits`` exits; UsageError if it does not fit."""
        if self.uses_thresholds and len(self.thresholds) != num_exits - 1:
            raise UsageError(f"rule '{self.kind}' has {len(self.thresholds)} thresholds but the bundle has "
                             f"{num_exits} exits: give {num_exits - 1} (one per exit except the last)")
        if self.uses_confidence and not all(has_confidence[:-1]):
            missing = [i for i, c in enumerate(has_confidence[:-1]) if not c]
            raise UsageError(f"rule 'confidence' needs a confidence output at every early exit, exits {missing} "
                             "have none: use max_softmax, entropy or class_exclusion for this bundle")
        self.num_exits = num_exits
        self._score_kinds = tuple(scores)

    @property
    def uses_thresholds(self) -> bool:
        return True

    def with_thresholds(self, thresholds: Sequence[float]) -> "ExitRule":
        """A new rule of the same kind with other thresholds (validated)."""
        return type(self)(thresholds)

    def to_spec(self) -> ExitRuleSpec:
        """This rule as a manifest :class:`ExitRuleSpec`."""
        return ExitRuleSpec(kind=self.kind, thresholds=tuple(self.thresholds))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self.thresholds)})"

    # ---- per input (Runner) --------------------------------------------------------------------------
    def begin(self, num_classes: int) -> Any:
        """Per-input state before exit 0 (None for stateless rules)."""
        return None

    def decide(self, k: int, logits: np.ndarray, confidence: np.ndarray | None, state: Any) -> int:
        """Decide at exit ``k`` for one input.

        Args:
            k: exit index.
            logits: ``[K]`` float32 dequantized logits of exit k.
            confidence: ``[1]`` float32 dequantized confidence logit, or None.
            state: what :meth:`begin` returned (mutated in place by stateful rules).

        Returns:
            The predicted class if the input leaves here, else :data:`CONTINUE`.
        """
        if k == self._last() or self._stop(k, logits, confidence):
            return int(logits.argmax())
        return CONTINUE

    def _stop(self, k: int, logits: np.ndarray, confidence: np.ndarray | None) -> bool | np.ndarray:
        raise NotImplementedError

    def _last(self) -> int:
        if self.num_exits is None:
            raise UsageError(f"rule '{self.kind}' is not bound to a bundle; Runner.set_rule() binds it")
        return self.num_exits - 1

    # ---- vectorised (tuning, benchmarks) -------------------------------------------------------------
    def simulate(self, trace: Trace) -> tuple[np.ndarray, np.ndarray]:
        """Apply the rule to every input of a trace.

        Returns:
            ``(exit_index [N] int64, prediction [N] int64)``.
        """
        self.prepare(trace.num_exits, trace.scores, [c is not None for c in trace.confidence])
        n, last = trace.num_inputs, trace.num_exits - 1
        exit_index = np.full(n, last, dtype=np.int64)
        prediction = trace.logits[last].argmax(axis=-1).astype(np.int64)
        done = np.zeros(n, dtype=bool)
        for k in range(last):
            stop = np.asarray(self._stop(k, trace.logits[k], trace.confidence[k]), dtype=bool) & ~done
            exit_index[stop] = k
            prediction[stop] = trace.logits[k][stop].argmax(axis=-1)
            done |= stop
        return exit_index, prediction


def _check_thresholds(kind: str, values: Sequence[float], valid: tuple[float, float]) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise UsageError(f"rule '{kind}': thresholds must be a sequence of numbers, got {values!r:.60}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise UsageError(f"rule '{kind}': threshold {v!r:.30} is not a number")
        v = float(v)
        if not (math.isfinite(v) and valid[0] <= v <= valid[1]):
            raise UsageError(f"rule '{kind}': threshold {v:g} is out of range; expected {valid[0]:g} <= T <= "
                             f"{valid[1]:g}" + (" (nats)" if kind == "entropy" else ""))
        out.append(v)
    return tuple(out)


class ConfidenceRule(ExitRule):
    """Leave at exit i when ``sigmoid(c_i) > T_i`` (c_i = the confidence head's logit), T_i in [0, 1]."""

    kind = "confidence"
    uses_confidence = True

    def __init__(self, thresholds: Sequence[float]):
        super().__init__(thresholds)
        # sigmoid(c) > T  <=>  c > log(T / (1 - T)): one exact comparison on the float32 logit.
        self._logit = tuple(-math.inf if t == 0 else math.inf if t == 1 else math.log(t / (1 - t))
                            for t in self.thresholds)

    def _stop(self, k: int, logits: np.ndarray, confidence: np.ndarray | None) -> bool | np.ndarray:
        if confidence is None:
            raise UsageError(f"rule 'confidence': exit {k} has no confidence output")
        return confidence.reshape(-1) > self._logit[k] if confidence.ndim > 1 else confidence > self._logit[k]

    def decide(self, k: int, logits: np.ndarray, confidence: np.ndarray | None, state: Any) -> int:
        if k == self._last() or bool(confidence[0] > self._logit[k]):  # type: ignore[index]
            return int(logits.argmax())
        return CONTINUE


class MaxSoftmaxRule(ExitRule):
    """Leave at exit i when ``max softmax(logits_i) >= T_i``, T_i in [0, 1]."""

    kind = "max_softmax"

    def _stop(self, k: int, logits: np.ndarray, confidence: np.ndarray | None) -> bool | np.ndarray:
        t = self.thresholds[k]
        if t == 0:
            return np.ones(logits.shape[:-1], dtype=bool)
        # max p = 1 / sum(exp(x - max x))  >= T  <=>  sum(...) <= 1 / T
        return _softmax_sum(logits) <= np.float32(1.0 / t)


class EntropyRule(ExitRule):
    """Leave at exit i when the entropy of softmax(logits_i) is below T_i nats (T_i >= 0)."""

    kind = "entropy"
    _range = (0.0, math.inf)

    def _stop(self, k: int, logits: np.ndarray, confidence: np.ndarray | None) -> bool | np.ndarray:
        return _entropy(logits) < np.float32(self.thresholds[k])


class ClassExclusionRule(ExitRule):
    """Class-based early exit with candidate sets (one beta in [0, 1] per early exit)."""

    kind = "class_exclusion"

    def begin(self, num_classes: int) -> np.ndarray:
        """A fresh candidate set: every class, ``[K]`` bool (narrowed in place by :meth:`decide`)."""
        return np.ones(num_classes, dtype=bool)

    def decide(self, k: int, logits: np.ndarray, confidence: np.ndarray | None, state: Any) -> int:
        remaining = state
        if k == self._last():
            return int(np.where(remaining, logits, -np.inf).argmax())
        s = _scores(logits, self._score_kinds[k])
        keep = remaining & (s > np.float32(self.thresholds[k]) * s.max())
        if keep.any():
            remaining[:] = keep
        if np.count_nonzero(remaining) == 1:
            return int(remaining.argmax())
        return CONTINUE

    def simulate(self, trace: Trace) -> tuple[np.ndarray, np.ndarray]:
        self.prepare(trace.num_exits, trace.scores, [c is not None for c in trace.confidence])
        n, last = trace.num_inputs, trace.num_exits - 1
        remaining = np.ones(trace.logits[0].shape, dtype=bool)  # [N, K]
        exit_index = np.full(n, last, dtype=np.int64)
        prediction = np.zeros(n, dtype=np.int64)
        done = np.zeros(n, dtype=bool)
        for k in range(last):
            s = _scores(trace.logits[k], trace.scores[k])                      # [N, K]
            keep = remaining & (s > np.float32(self.thresholds[k]) * s.max(axis=-1, keepdims=True))
            nonempty = keep.any(axis=-1) & ~done
            remaining[nonempty] = keep[nonempty]
            single = (np.count_nonzero(remaining, axis=-1) == 1) & ~done
            exit_index[single] = k
            prediction[single] = remaining[single].argmax(axis=-1)
            done |= single
        rest = ~done
        prediction[rest] = np.where(remaining[rest], trace.logits[last][rest], -np.inf).argmax(axis=-1)
        return exit_index, prediction


class FinalExitRule(ExitRule):
    """Every input runs to the last exit (the network without early exits)."""

    kind = "final"
    inspects_exits = False

    def __init__(self, thresholds: Sequence[float] = ()):
        super().__init__(())

    @property
    def uses_thresholds(self) -> bool:
        return False

    def with_thresholds(self, thresholds: Sequence[float]) -> "ExitRule":
        raise UsageError("rule 'final' has no thresholds; choose a threshold rule (confidence, max_softmax, "
                         "entropy, class_exclusion) first")

    def _stop(self, k: int, logits: np.ndarray, confidence: np.ndarray | None) -> bool | np.ndarray:
        return np.zeros(logits.shape[:-1], dtype=bool)

    def __repr__(self) -> str:
        return "FinalExitRule()"


class FixedExitRule(ExitRule):
    """Every input leaves at exit ``exit`` (0-based)."""

    kind = "fixed"
    inspects_exits = False

    def __init__(self, exit: int):
        super().__init__(())
        if isinstance(exit, bool) or not isinstance(exit, (int, np.integer)) or exit < 0:
            raise UsageError(f"rule 'fixed': exit must be an integer >= 0, got {exit!r}")
        self.exit = int(exit)
        self.stop_exit = self.exit

    @property
    def uses_thresholds(self) -> bool:
        return False

    def prepare(self, num_exits: int, scores: Sequence[str], has_confidence: Sequence[bool]) -> None:
        if self.exit >= num_exits:
            raise UsageError(f"rule 'fixed': exit {self.exit} does not exist; the bundle has exits 0..{num_exits - 1}")
        super().prepare(num_exits, scores, has_confidence)

    def with_thresholds(self, thresholds: Sequence[float]) -> "ExitRule":
        raise UsageError("rule 'fixed' has no thresholds; use FixedExitRule(exit) to choose another exit")

    def _stop(self, k: int, logits: np.ndarray, confidence: np.ndarray | None) -> bool | np.ndarray:
        return np.full(logits.shape[:-1], k == self.exit, dtype=bool)

    def to_spec(self) -> ExitRuleSpec:
        return ExitRuleSpec(kind=self.kind, thresholds=(), exit=self.exit)

    def __repr__(self) -> str:
        return f"FixedExitRule({self.exit})"


RULES: dict[str, type[ExitRule]] = {r.kind: r for r in (ConfidenceRule, MaxSoftmaxRule, EntropyRule,
                                                        ClassExclusionRule, FinalExitRule, FixedExitRule)}


def rule_from_spec(spec: ExitRuleSpec) -> ExitRule:
    """Build the rule a manifest's :class:`ExitRuleSpec` describes.

    Raises:
        UsageError: an unknown kind, a missing ``exit`` for "fixed", or thresholds out of range.
    """
    if spec.kind not in RULES:
        raise UsageError(f"unknown exit rule {spec.kind!r}; expected one of {', '.join(RULES)}")
    if spec.kind == "fixed":
        if spec.exit is None:
            raise UsageError("rule 'fixed' needs an exit index (exit_rule.exit)")
        return FixedExitRule(spec.exit)
    return RULES[spec.kind](spec.thresholds)
