"""Exit rules: when an input may leave the network at an exit, and what it answers there.

One class per kind in :data:`edgeexit.runtime.manifest.EXIT_RULES`. Exits are numbered 0..E-1; thresholds have
one value per exit except the last, which always exits.

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
R of the last exit's logits).

**Fallback** (``fallback``, confidence / max_softmax / entropy only): what an input answers when no early exit
stops it. ``final`` (the default): the last exit's argmax. ``most_confident`` (Shallow-Deep Networks): the
argmax of the exit, among ALL exits (the last one included), with the highest score under the rule's own
measure -- ``sigmoid(c_i)`` (confidence; the last exit then needs a confidence output too), ``max softmax``
(max_softmax), ``-H`` (entropy); equal scores go to the earliest exit. Such an input still runs every stage:
it leaves the network at the last exit (``simulate``'s ``exit_index``, its costs) and is answered from exit
``answer_exit`` (:meth:`ExitRule.simulate_answers`; ``Result.exit_index`` on the device). Scores are compared
on the same exact integers / float64 values the thresholds are (max_softmax: ``sum_j E(d_j)``, entropy:
``ln A + B / A``, confidence: the confidence byte's value), so per-input and vectorised answers are equal.
class_exclusion has no per-exit score (its last exit already answers from every exit's candidate set), and
final / fixed never fall back: they take ``final`` only.

**Deciding on the device.** A rule is compiled once per bundle (:meth:`ExitRule.compile`) into a
:class:`Decider` that works on the exits' raw int8 (or uint8) outputs: every threshold is mapped into the
quantized domain once, as tables over the 256 byte values, so deciding an input costs a few Python integer
operations on its K logit bytes and no numpy call. Bundles with int16 activations get the same tables over the
65536 int16 values (d = q_max - q_j is then 0..65535; E(d) and G(d) are 0 from where exp(-s d) 2^F < 0.5 on);
a negative int16 value indexes them like its uint16 view, as a signed byte indexes a 256-entry table like its
uint8 view. class_exclusion is refused on int16 outputs (its tables are [256, 256]): use an int8 bundle.
The same tables drive the vectorised :meth:`Decider.decide_many` (``simulate``, tuning,
``Runner.classify_batch``), and sums are exact integers, so the per-input and the vectorised decisions are
equal bit for bit (tests keep them equal).

With ``x_j = s (q_j - z)`` the dequantized logits, ``d_j = q_max - q_j >= 0`` (steps below the top logit) and
``F = 32`` fraction bits, the tables are ``E(d) = round(2^F exp(-s d))`` and ``G(d) = round(2^F s d exp(-s d))``:

* max_softmax: ``1 / max softmax = sum_j exp(x_j - x_max)``, so stop iff ``sum_j E(d_j) <= floor(2^F / T)``;
* entropy: ``H = ln Z - sum_j e_j z_j / Z`` with ``z = x - x_max``, so with ``A = sum_j E(d_j)`` and
  ``B = sum_j G(d_j)``, stop iff ``ln A + B / A < T + F ln 2`` (float64, from the exact integers A and B);
* confidence: stop iff the confidence byte's value ``s_c (q_c - z_c) > ln(T / (1 - T))`` (a 256-entry table);
* class_exclusion: class c is kept iff ``exp(x_c - x_max) > beta`` (softmax) or
  ``sigmoid(x_c) > beta sigmoid(x_max)`` (sigmoid): a table over (top byte, class byte) pairs.

A trace of a float network (no raw outputs) is decided with the same formulas in float64.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import UsageError
from .manifest import FALLBACKS, ExitRuleSpec
from .trace import ExitQuant, RawOutputs, Trace, unsigned

CONTINUE = -1  # a decision that lets the input go on to the next stage
FRACTION_BITS = 32
_ONE = 1 << FRACTION_BITS


def exit_scores(logits: np.ndarray, kind: str) -> np.ndarray:
    """Class scores of logits ``[..., K]``: softmax over the last axis, or an elementwise sigmoid."""
    z = np.asarray(logits, dtype=np.float64)
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _argmax_step(q: list[int], conf: Any, state: Any) -> tuple[int, Any]:
    """Leave here with the argmax (the first of equal logits, like numpy)."""
    return q.index(max(q)), state


def _ordered(raw: np.ndarray) -> np.ndarray:
    """Raw int8/uint8 outputs as int16 values (int16 outputs as int32) that order like the real values (scales are
    positive) and whose differences do not overflow."""
    return raw.astype(np.int32 if raw.dtype.itemsize == 2 else np.int16)


def _exp_tables(scale: float, levels: int = 256) -> tuple[list[int], list[int]]:
    """E(d) and G(d) for d = 0..levels-1 quantization steps below the top logit (see the module docstring)."""
    d = np.arange(levels, dtype=np.float64) * float(scale)
    e = np.exp(-d)
    return np.rint(e * _ONE).astype(np.int64).tolist(), np.rint(d * e * _ONE).astype(np.int64).tolist()


class Decider:
    """An exit rule compiled for the exits of one bundle (see the module docstring).

    Per input, ``steps[k]`` decides at exit k (None: the input goes on without the exit's outputs being read):
    ``label, state = steps[k](q, conf, state)`` with ``q`` the exit's logits as a list of ints (``tolist()`` of
    the int8/uint8 output), ``conf`` the confidence output (a one-element integer array, or None) and ``state``
    from :meth:`start`; ``label`` is the answer or :data:`CONTINUE`. Each step is a closure over its exit's
    tables (the Runner's hot path calls it directly). :meth:`decide_many` does the same for ``[n, K]`` arrays.
    """

    def __init__(self, rule: "ExitRule", quant: Sequence[ExitQuant]):
        self.rule = rule
        self.quant = tuple(quant)
        self.num_exits = len(self.quant)
        self.last = self.num_exits - 1
        self.steps: tuple[Callable[[list[int], Any, Any], tuple[int, Any]] | None, ...] = ()
        #: True when the last step may answer from an earlier exit: its state is then ``(score, exit, q)`` of the
        #: exit that answered (the Runner reports that exit and its logits)
        self.picks = False

    @property
    def inspects(self) -> tuple[bool, ...]:
        return tuple(step is not None for step in self.steps)

    def start(self) -> Any:
        return None

    def start_many(self, n: int) -> np.ndarray | None:
        return None

    def decide(self, k: int, q: list[int], conf: Any, state: Any) -> tuple[int, Any]:
        """Decide at exit k for one input (``steps[k]``; exits without a step let every input go on)."""
        step = self.steps[k]
        return (CONTINUE, state) if step is None else step(q, conf, state)

    def decide_many(self, k: int, logits: np.ndarray, conf: np.ndarray | None,
                    state: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Decide at exit k for n inputs: ``logits`` [n, K] and ``conf`` [n] raw; returns (labels [n], state)."""
        raise NotImplementedError

    def simulate(self, raw: RawOutputs) -> tuple[np.ndarray, np.ndarray]:
        """``(exit_index [N], prediction [N])`` (int64) for raw outputs of every exit."""
        exit_index, prediction, _ = self.simulate_answers(raw)
        return exit_index, prediction

    def simulate_answers(self, raw: RawOutputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(exit_index [N], prediction [N], answer_exit [N])`` (int64): where each input left the network (what
        it paid for), its answer, and the exit that answer came from (``exit_index`` unless it fell back)."""
        n = int(raw.logits[0].shape[0])
        exit_index = np.full(n, self.last, dtype=np.int64)
        prediction = np.zeros(n, dtype=np.int64)
        answer_exit = np.full(n, self.last, dtype=np.int64)
        alive = np.arange(n)
        state = self.start_many(n)
        for k in range(self.num_exits):
            if alive.size == 0:
                break
            if not self.inspects[k]:
                continue
            conf = raw.confidence[k]
            labels, state = self.decide_many(k, raw.logits[k][alive], None if conf is None else conf[alive], state)
            stop = labels != CONTINUE
            exit_index[alive[stop]] = k
            prediction[alive[stop]] = labels[stop]
            answer_exit[alive[stop]] = state[stop, 1] if self.picks and k == self.last else k
            alive = alive[~stop]
            if state is not None:
                state = state[~stop]
        return exit_index, prediction, answer_exit


class _ThresholdDecider(Decider):
    """Stateless rules: each exit stops an input on its own statistic (confidence, max_softmax, entropy)."""

    def __init__(self, rule: "ExitRule", quant: Sequence[ExitQuant]):
        super().__init__(rule, quant)
        self.tables = [rule._tables(k, quant[k]) for k in range(self.last)]
        self.steps = (*(rule._step(t) for t in self.tables), _argmax_step)

    def decide_many(self, k: int, logits: np.ndarray, conf: np.ndarray | None,
                    state: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        values = _ordered(logits)
        labels = values.argmax(axis=-1).astype(np.int64)
        if k < self.last:
            labels[~self.rule._stop_many(self.tables[k], values, conf)] = CONTINUE
        return labels, state


class _MostConfidentDecider(_ThresholdDecider):
    """A threshold rule with the ``most_confident`` fallback: every early exit decides as without it; an input it
    does not stop keeps the best ``(score, exit, q)`` seen so far as its state (a later exit replaces it only
    with a strictly higher score), and the last exit answers the argmax of the best exit, itself included.
    Many inputs: the state is ``[n, 3]`` float64 rows (score, exit, label); scores are exact there (integers
    below 2^53, or the same float64 values)."""

    def __init__(self, rule: "ExitRule", quant: Sequence[ExitQuant]):
        super().__init__(rule, quant)
        self.picks = True
        self.measures = [rule._measure_tables(k, quant[k]) for k in range(self.num_exits)]
        self.steps = (*(self._keep_best(k, step) for k, step in enumerate(self.steps[:-1])), self._answer)

    def _keep_best(self, k: int,
                   inner: Callable[[list[int], Any, Any], tuple[int, Any]]) -> Callable[..., tuple[int, Any]]:
        measure = self.rule._measure(self.measures[k])

        def step(q: list[int], conf: Any, state: Any) -> tuple[int, Any]:
            label = inner(q, conf, None)[0]
            if label >= 0:
                return label, state
            score = measure(q, conf)
            if state is None or score > state[0]:
                state = (score, k, q)
            return CONTINUE, state
        return step

    @property
    def _answer(self) -> Callable[[list[int], Any, Any], tuple[int, Any]]:
        measure, last = self.rule._measure(self.measures[self.last]), self.last

        def step(q: list[int], conf: Any, state: Any) -> tuple[int, Any]:
            score = measure(q, conf)
            if state is None or score > state[0]:
                state = (score, last, q)
            best = state[2]
            return best.index(max(best)), state
        return step

    def start_many(self, n: int) -> np.ndarray:
        return np.tile(np.array([-np.inf, -1.0, -1.0]), (n, 1))            # [n, 3] (score, exit, label)

    def decide_many(self, k: int, logits: np.ndarray, conf: np.ndarray | None,
                    state: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        labels, _ = super().decide_many(k, logits, conf, None)
        score = self.rule._measure_many(self.measures[k], _ordered(logits), conf)   # [n] float64
        better = score > state[:, 0]
        state = state.copy()
        state[better] = np.stack([score, np.full_like(score, k), _ordered(logits).argmax(axis=-1)], axis=-1)[better]
        if k == self.last:
            labels = state[:, 2].astype(np.int64)
        return labels, state

    def best_exits(self, raw: RawOutputs) -> np.ndarray:
        """[N] int64: the exit with the highest score for every input (the earliest of equal scores)."""
        scores = np.stack([self.rule._measure_many(self.measures[k], _ordered(raw.logits[k]), raw.confidence[k])
                           for k in range(self.num_exits)])                   # [E, N]
        return scores.argmax(axis=0).astype(np.int64)


class ExitRule:
    """Base class: validation, the float-trace path, compilation into a :class:`Decider`."""

    kind: str = ""
    uses_confidence: bool = False
    _range: tuple[float, float] = (0.0, 1.0)
    _decider = _ThresholdDecider

    #: whether the rule has a per-exit score that the ``most_confident`` fallback can compare
    _scores_exits: bool = True

    def __init__(self, thresholds: Sequence[float] = (), fallback: str = "final"):
        self.thresholds = _check_thresholds(self.kind, thresholds, self._range)
        self.fallback = _check_fallback(self.kind, fallback, self._scores_exits)
        self.num_exits: int | None = None
        self._compiled: dict[tuple[ExitQuant, ...], Decider] = {}

    # ---- configuration -------------------------------------------------------------------------------
    def prepare(self, num_exits: int, scores: Sequence[str], has_confidence: Sequence[bool]) -> None:
        """Check that the rule fits a network with ``num_exits`` exits; UsageError if it does not."""
        if self.uses_thresholds and len(self.thresholds) != num_exits - 1:
            raise UsageError(f"rule '{self.kind}' has {len(self.thresholds)} thresholds but the bundle has "
                             f"{num_exits} exits: give {num_exits - 1} (one per exit except the last)")
        if self.uses_confidence and not all(has_confidence[:-1]):
            missing = [i for i, c in enumerate(has_confidence[:-1]) if not c]
            raise UsageError(f"rule 'confidence' needs a confidence output at every early exit, exits {missing} "
                             "have none: use max_softmax, entropy or class_exclusion for this bundle")
        if self.uses_confidence and self.fallback == "most_confident" and not has_confidence[-1]:
            raise UsageError("rule 'confidence' with fallback most_confident compares every exit's confidence, but "
                             "the last exit has no confidence output: use fallback final, or max_softmax / entropy")
        self.num_exits = num_exits

    def compile(self, quant: Sequence[ExitQuant]) -> Decider:
        """This rule for exits with the given output quantization (checked, then cached)."""
        key = tuple(quant)
        decider = self._compiled.get(key)
        if decider is None:
            self.prepare(len(key), [x.scores for x in key], [x.confidence is not None for x in key])
            make = _MostConfidentDecider if self.fallback == "most_confident" else self._decider
            decider = self._compiled[key] = make(self, key)
        return decider

    @property
    def uses_thresholds(self) -> bool:
        return True

    def with_thresholds(self, thresholds: Sequence[float]) -> "ExitRule":
        """A new rule of the same kind and fallback with other thresholds (validated)."""
        return type(self)(thresholds, fallback=self.fallback)

    def to_spec(self) -> ExitRuleSpec:
        """This rule as a manifest :class:`ExitRuleSpec`."""
        return ExitRuleSpec(kind=self.kind, thresholds=tuple(self.thresholds), fallback=self.fallback)

    def __repr__(self) -> str:
        fallback = "" if self.fallback == "final" else f", fallback={self.fallback!r}"
        return f"{type(self).__name__}({list(self.thresholds)}{fallback})"

    # ---- many inputs ---------------------------------------------------------------------------------
    def simulate(self, trace: Trace) -> tuple[np.ndarray, np.ndarray]:
        """Apply the rule to every input of a trace: ``(exit_index [N] int64, prediction [N] int64)``.

        A Runner's trace is decided on its raw outputs, exactly as the device decides; a float network's
        trace with the float64 formulas.
        """
        exit_index, prediction, _ = self.simulate_answers(trace)
        return exit_index, prediction

    def simulate_answers(self, trace: Trace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`simulate`, plus ``answer_exit [N]`` int64: the exit each answer came from (``exit_index``
        except for inputs the ``most_confident`` fallback answered from an earlier exit)."""
        if trace.raw is not None:
            return self.compile(trace.raw.quant).simulate_answers(trace.raw)
        self.prepare(trace.num_exits, trace.scores, [c is not None for c in trace.confidence])
        exit_index, prediction = self._simulate_float(trace)
        answer_exit = exit_index.copy()
        if self.fallback == "most_confident":
            rest = exit_index == trace.num_exits - 1
            best = self.most_confident_exit(trace)[rest]
            answer_exit[rest] = best
            argmax = np.stack([np.asarray(z).argmax(axis=-1) for z in trace.logits])       # [E, N]
            prediction[rest] = argmax[best, np.flatnonzero(rest)]
        return exit_index, prediction, answer_exit

    def most_confident_exit(self, trace: Trace) -> np.ndarray:
        """[N] int64: per input, the exit with the highest score under this rule's measure (the earliest of equal
        scores) -- the exit the ``most_confident`` fallback answers from; it does not depend on the thresholds."""
        if not self._scores_exits:
            raise UsageError(f"rule '{self.kind}' has no per-exit score to compare")
        rule = self if self.fallback == "most_confident" else type(self)(self.thresholds, fallback="most_confident")
        if trace.raw is not None:
            return rule.compile(trace.raw.quant).best_exits(trace.raw)
        rule.prepare(trace.num_exits, trace.scores, [c is not None for c in trace.confidence])
        scores = np.stack([self._measure_float(np.asarray(trace.logits[k], dtype=np.float64), trace.confidence[k])
                           for k in range(trace.num_exits)])                  # [E, N]
        return scores.argmax(axis=0).astype(np.int64)

    def _simulate_float(self, trace: Trace) -> tuple[np.ndarray, np.ndarray]:
        n, last = trace.num_inputs, trace.num_exits - 1
        exit_index = np.full(n, last, dtype=np.int64)
        prediction = np.asarray(trace.logits[last]).argmax(axis=-1).astype(np.int64)
        done = np.zeros(n, dtype=bool)
        for k in range(last):
            logits = np.asarray(trace.logits[k], dtype=np.float64)
            stop = self._stop_float(k, logits, trace.confidence[k]) & ~done
            exit_index[stop] = k
            prediction[stop] = logits[stop].argmax(axis=-1)
            done |= stop
        return exit_index, prediction

    # ---- per kind ------------------------------------------------------------------------------------
    def _tables(self, k: int, quant: ExitQuant) -> Any:
        raise NotImplementedError

    def _step(self, tables: Any) -> Callable[[list[int], Any, Any], tuple[int, Any]]:
        """The per-input decision at one exit, as a closure over the exit's tables."""
        raise NotImplementedError

    def _stop_many(self, tables: Any, values: np.ndarray, conf: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def _stop_float(self, k: int, logits: np.ndarray, conf: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    # the score the most_confident fallback compares (higher = more confident), per exit: tables, one input
    # (a closure), many inputs ([n] float64) and a float trace ([n] float64)
    def _measure_tables(self, k: int, quant: ExitQuant) -> Any:
        raise NotImplementedError

    def _measure(self, tables: Any) -> Callable[[list[int], Any], Any]:
        raise NotImplementedError

    def _measure_many(self, tables: Any, values: np.ndarray, conf: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def _measure_float(self, logits: np.ndarray, conf: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError


def _check_fallback(kind: str, fallback: Any, scores_exits: bool) -> str:
    if fallback not in FALLBACKS:
        raise UsageError(f"rule '{kind}': fallback {fallback!r:.40} is not known; expected one of "
                         f"{', '.join(FALLBACKS)}")
    if fallback != "final" and not scores_exits:
        raise UsageError(f"rule '{kind}' takes fallback final only; most_confident works with confidence, max_softmax "
                         "and entropy")
    return fallback


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


def _logit(t: float) -> float:
    return -math.inf if t == 0 else math.inf if t == 1 else math.log(t / (1 - t))


class ConfidenceRule(ExitRule):
    """Leave at exit i when ``sigmoid(c_i) > T_i`` (c_i = the confidence head's logit), T_i in [0, 1]."""

    kind = "confidence"
    uses_confidence = True

    def _tables(self, k: int, quant: ExitQuant) -> tuple[bytes, np.ndarray]:
        stop = quant.confidence_byte_values() > _logit(self.thresholds[k])   # [levels] by confidence value
        return bytes(stop.astype(np.uint8)), stop

    def _step(self, tables: tuple[bytes, np.ndarray]) -> Callable[[list[int], Any, Any], tuple[int, Any]]:
        stop = tables[0]

        def step(q: list[int], conf: Any, state: Any) -> tuple[int, Any]:
            if stop[conf[0]]:   # a signed value indexes the table modulo its length, like its unsigned view
                return q.index(max(q)), state
            return CONTINUE, state
        return step

    def _stop_many(self, tables: tuple[bytes, np.ndarray], values: np.ndarray, conf: np.ndarray | None) -> np.ndarray:
        return tables[1][unsigned(np.asarray(conf).reshape(-1))]

    def _stop_float(self, k: int, logits: np.ndarray, conf: np.ndarray | None) -> np.ndarray:
        if conf is None:
            raise UsageError(f"rule 'confidence': exit {k} has no confidence output")
        return np.asarray(conf, dtype=np.float64).reshape(-1) > _logit(self.thresholds[k])

    def _measure_tables(self, k: int, quant: ExitQuant) -> tuple[list[float], np.ndarray]:
        values = quant.confidence_byte_values()                                  # [levels] float64 logits
        return values.tolist(), values

    def _measure(self, tables: tuple[list[float], np.ndarray]) -> Callable[[list[int], Any], Any]:
        values = tables[0]
        return lambda q, conf: values[conf[0]]     # a signed value indexes the list like its unsigned view

    def _measure_many(self, tables: tuple[list[float], np.ndarray], values: np.ndarray,
                      conf: np.ndarray | None) -> np.ndarray:
        return tables[1][unsigned(np.asarray(conf).reshape(-1))]

    def _measure_float(self, logits: np.ndarray, conf: np.ndarray | None) -> np.ndarray:
        return np.asarray(conf, dtype=np.float64).reshape(-1)     # sigmoid is monotone: compare the logits


class MaxSoftmaxRule(ExitRule):
    """Leave at exit i when ``max softmax(logits_i) >= T_i``, T_i in [0, 1]."""

    kind = "max_softmax"

    def _tables(self, k: int, quant: ExitQuant) -> tuple[list[int], np.ndarray, float]:
        e, _ = _exp_tables(quant.scale, quant.levels)
        t = self.thresholds[k]
        limit = math.inf if t == 0 else math.floor(_ONE / t)
        return e, np.asarray(e, dtype=np.int64), limit

    def _step(self, tables: tuple[list[int], np.ndarray, float]) -> Callable[[list[int], Any, Any], tuple[int, Any]]:
        e, _, limit = tables

        def step(q: list[int], conf: Any, state: Any) -> tuple[int, Any]:
            m = max(q)
            if sum([e[m - v] for v in q]) <= limit:
                return q.index(m), state
            return CONTINUE, state
        return step

    def _stop_many(self, tables: tuple[list[int], np.ndarray, float], values: np.ndarray,
                   conf: np.ndarray | None) -> np.ndarray:
        _, e, limit = tables
        return e[values.max(axis=-1, keepdims=True) - values].sum(axis=-1) <= limit

    def _stop_float(self, k: int, logits: np.ndarray, conf: np.ndarray | None) -> np.ndarray:
        t = self.thresholds[k]
        if t == 0:
            return np.ones(logits.shape[0], dtype=bool)
        return np.exp(logits - logits.max(axis=-1, keepdims=True)).sum(axis=-1) <= 1.0 / t

    def _measure_tables(self, k: int, quant: ExitQuant) -> tuple[list[int], np.ndarray]:
        e, _ = _exp_tables(quant.scale, quant.levels)
        return e, np.asarray(e, dtype=np.int64)

    def _measure(self, tables: tuple[list[int], np.ndarray]) -> Callable[[list[int], Any], Any]:
        e = tables[0]

        def measure(q: list[int], conf: Any) -> int:
            m = max(q)
            return -sum([e[m - v] for v in q])      # -2^F / max softmax, an exact integer
        return measure

    def _measure_many(self, tables: tuple[list[int], np.ndarray], values: np.ndarray,
                      conf: np.ndarray | None) -> np.ndarray:
        return -tables[1][values.max(axis=-1, keepdims=True) - values].sum(axis=-1).astype(np.float64)

    def _measure_float(self, logits: np.ndarray, conf: np.ndarray | None) -> np.ndarray:
        return 1.0 / np.exp(logits - logits.max(axis=-1, keepdims=True)).sum(axis=-1)


class EntropyRule(ExitRule):
    """Leave at exit i when the entropy of softmax(logits_i) is below T_i nats (T_i >= 0)."""

    kind = "entropy"
    _range = (0.0, math.inf)

    def _tables(self, k: int, quant: ExitQuant) -> tuple[list[int], list[int], np.ndarray, np.ndarray, float]:
        e, g = _exp_tables(quant.scale, quant.levels)
        return e, g, np.asarray(e, dtype=np.int64), np.asarray(g, dtype=np.int64), \
            self.thresholds[k] + FRACTION_BITS * math.log(2.0)

    def _step(self, tables: Any) -> Callable[[list[int], Any, Any], tuple[int, Any]]:
        e, g, _, _, limit = tables
        log = math.log

        def step(q: list[int], conf: Any, state: Any) -> tuple[int, Any]:
            m = max(q)
            a = sum([e[m - v] for v in q])
            b = sum([g[m - v] for v in q])
            if log(a) + b / a < limit:
                return q.index(m), state
            return CONTINUE, state
        return step

    def _stop_many(self, tables: Any, values: np.ndarray, conf: np.ndarray | None) -> np.ndarray:
        _, _, e, g, limit = tables
        d = values.max(axis=-1, keepdims=True) - values
        a, b = e[d].sum(axis=-1).tolist(), g[d].sum(axis=-1).tolist()
        # the same float64 expression on the same integers as the per-input step (math.log, int / int)
        h = np.fromiter((math.log(x) + y / x for x, y in zip(a, b)), dtype=np.float64, count=len(a))
        return h < limit

    def _stop_float(self, k: int, logits: np.ndarray, conf: np.ndarray | None) -> np.ndarray:
        z = logits - logits.max(axis=-1, keepdims=True)
        e = np.exp(z)
        total = e.sum(axis=-1)
        return np.log(total) - (e * z).sum(axis=-1) / total < self.thresholds[k]

    def _measure_tables(self, k: int, quant: ExitQuant) -> tuple[list[int], list[int], np.ndarray, np.ndarray]:
        e, g = _exp_tables(quant.scale, quant.levels)
        return e, g, np.asarray(e, dtype=np.int64), np.asarray(g, dtype=np.int64)

    def _measure(self, tables: Any) -> Callable[[list[int], Any], Any]:
        e, g, _, _ = tables
        log = math.log

        def measure(q: list[int], conf: Any) -> float:
            m = max(q)
            a = sum([e[m - v] for v in q])
            return -(log(a) + sum([g[m - v] for v in q]) / a)     # -(H + F ln 2): lower entropy scores higher
        return measure

    def _measure_many(self, tables: Any, values: np.ndarray, conf: np.ndarray | None) -> np.ndarray:
        _, _, e, g = tables
        d = values.max(axis=-1, keepdims=True) - values
        a, b = e[d].sum(axis=-1).tolist(), g[d].sum(axis=-1).tolist()
        return np.fromiter((-(math.log(x) + y / x) for x, y in zip(a, b)), dtype=np.float64, count=len(a))

    def _measure_float(self, logits: np.ndarray, conf: np.ndarray | None) -> np.ndarray:
        z = logits - logits.max(axis=-1, keepdims=True)
        e = np.exp(z)
        total = e.sum(axis=-1)
        return -(np.log(total) - (e * z).sum(axis=-1) / total)


def narrow_candidates(remaining: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One exit of class exclusion on candidate sets ``[n, K]`` bool: intersect with the classes the exit keeps,
    unless that leaves none (then the set stays); returns ``(remaining, one class left [n])``."""
    keep = remaining & kept
    remaining = np.where(keep.any(axis=-1, keepdims=True), keep, remaining)
    return remaining, np.count_nonzero(remaining, axis=-1) == 1


def _int8_only(quant: Sequence[ExitQuant]) -> None:
    """class_exclusion's tables are [256, 256] over (top byte, class byte): UsageError for int16 outputs."""
    if any(x.levels != 256 for x in quant):
        raise UsageError("rule 'class_exclusion' runs on int8 bundles only and this bundle has int16 activations; "
                         "use an int8 bundle (edgeexit convert without --precision int16) for class_exclusion, or "
                         "max_softmax, entropy or confidence on this one")


def _keep_table(quant: ExitQuant, beta: float) -> np.ndarray:
    """[256, 256] bool over (top byte m, class byte c): ``s_c > beta * s_max`` in float64."""
    _int8_only([quant])
    v = quant.byte_values()
    if quant.scores == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-v))
        return s[None, :] > beta * s[:, None]
    return np.exp(np.minimum(v[None, :] - v[:, None], 0.0)) > beta


class _ClassExclusionDecider(Decider):
    """Candidate sets per input: a Python int with byte c = 1 while class c remains (per input), or an
    ``[n, K]`` bool array (many inputs)."""

    def __init__(self, rule: "ClassExclusionRule", quant: Sequence[ExitQuant]):
        _int8_only(quant)
        super().__init__(rule, quant)
        self.keep = [rule.keep_table(k, quant[k]) for k in range(self.last)]   # [256, 256] bool: [top, class]
        self.every_class = int.from_bytes(b"\x01" * self.quant[0].num_classes, "little")
        self.steps = (*(self._narrow([bytes(row.astype(np.uint8)) for row in t]) for t in self.keep),
                      self._answer)

    def start(self) -> int:
        return self.every_class

    @staticmethod
    def _narrow(rows: list[bytes]) -> Callable[[list[int], Any, int], tuple[int, int]]:
        """An early exit: intersect the candidate set with the classes this exit keeps; leave at one class."""
        from_bytes = int.from_bytes

        def step(q: list[int], conf: Any, state: int) -> tuple[int, int]:
            row = rows[max(q)]   # int8 tops index the table modulo 256, like their uint8 view
            keep = from_bytes(bytes([row[v] for v in q]), "little") & state
            if keep:
                state = keep
            if state & (state - 1) == 0:   # one class left
                return (state.bit_length() - 1) >> 3, state
            return CONTINUE, state
        return step

    def _answer(self, q: list[int], conf: Any, state: int) -> tuple[int, int]:
        """The last exit: the argmax of its logits over the remaining classes."""
        if state == self.every_class:
            return q.index(max(q)), state
        best, label = None, -1
        for c, v in enumerate(q):
            if (state >> (c << 3)) & 1 and (best is None or v > best):
                best, label = v, c
        return label, state

    def start_many(self, n: int) -> np.ndarray:
        return np.ones((n, self.quant[0].num_classes), dtype=bool)

    def decide_many(self, k: int, logits: np.ndarray, conf: np.ndarray | None,
                    state: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        values = _ordered(logits)
        if k == self.last:
            return np.where(state, values, np.int16(-32768)).argmax(axis=-1).astype(np.int64), state
        top = values.max(axis=-1) & 0xFF                                         # [n] byte of the top logit
        state, single = narrow_candidates(state, self.keep[k][top[:, None], logits.view(np.uint8)])
        return np.where(single, state.argmax(axis=-1), CONTINUE).astype(np.int64), state


class ClassExclusionRule(ExitRule):
    """Class-based early exit with candidate sets (one beta in [0, 1] per early exit)."""

    kind = "class_exclusion"
    _decider = _ClassExclusionDecider
    _scores_exits = False

    def keep_table(self, k: int, quant: ExitQuant) -> np.ndarray:
        """[256, 256] bool: class byte c is kept at exit k when the top logit's byte is m (``[m, c]``)."""
        return _keep_table(quant, self.thresholds[k])

    def kept(self, trace: Trace, k: int, beta: float | None = None) -> np.ndarray:
        """[N, K] bool: the classes exit k keeps (before intersecting with the earlier candidate set), with
        this rule's beta or ``beta``; decided on the trace's raw outputs when it has them, as on the device."""
        beta = self.thresholds[k] if beta is None else float(beta)
        if trace.raw is not None:
            q = trace.raw.logits[k]
            top = _ordered(q).max(axis=-1) & 0xFF
            return _keep_table(trace.raw.quant[k], beta)[top[:, None], q.view(np.uint8)]
        z = np.asarray(trace.logits[k], dtype=np.float64)
        if trace.scores[k] == "sigmoid":
            s = 1.0 / (1.0 + np.exp(-z))
            return s > beta * s.max(axis=-1, keepdims=True)
        return np.exp(z - z.max(axis=-1, keepdims=True)) > beta

    def _simulate_float(self, trace: Trace) -> tuple[np.ndarray, np.ndarray]:
        n, last = trace.num_inputs, trace.num_exits - 1
        remaining = np.ones(trace.logits[0].shape, dtype=bool)  # [N, K]
        exit_index = np.full(n, last, dtype=np.int64)
        prediction = np.zeros(n, dtype=np.int64)
        done = np.zeros(n, dtype=bool)
        for k in range(last):
            remaining, single = narrow_candidates(remaining, self.kept(trace, k))
            single &= ~done   # a single candidate stays single: earlier exits keep their answer
            exit_index[single] = k
            prediction[single] = remaining[single].argmax(axis=-1)
            done |= single
        rest = ~done
        prediction[rest] = np.where(remaining[rest], trace.logits[last][rest], -np.inf).argmax(axis=-1)
        return exit_index, prediction


class _OneExitDecider(Decider):
    """Rules that never look at an exit before the one they stop at (final, fixed)."""

    def __init__(self, rule: "ExitRule", quant: Sequence[ExitQuant]):
        super().__init__(rule, quant)
        self.stop = rule.exit if isinstance(rule, FixedExitRule) else self.last
        self.steps = tuple(_argmax_step if k == self.stop else None for k in range(self.num_exits))

    def decide_many(self, k: int, logits: np.ndarray, conf: np.ndarray | None,
                    state: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        return _ordered(logits).argmax(axis=-1).astype(np.int64), state


class FinalExitRule(ExitRule):
    """Every input runs to the last exit (the network without early exits)."""

    kind = "final"
    _decider = _OneExitDecider
    _scores_exits = False

    def __init__(self, thresholds: Sequence[float] = (), fallback: str = "final"):
        super().__init__((), fallback)

    @property
    def uses_thresholds(self) -> bool:
        return False

    def with_thresholds(self, thresholds: Sequence[float]) -> "ExitRule":
        raise UsageError("rule 'final' has no thresholds; choose a threshold rule (confidence, max_softmax, "
                         "entropy, class_exclusion) first")

    def _stop_float(self, k: int, logits: np.ndarray, conf: np.ndarray | None) -> np.ndarray:
        return np.zeros(logits.shape[0], dtype=bool)

    def __repr__(self) -> str:
        return "FinalExitRule()"


class FixedExitRule(ExitRule):
    """Every input leaves at exit ``exit`` (0-based)."""

    kind = "fixed"
    _decider = _OneExitDecider
    _scores_exits = False

    def __init__(self, exit: int):
        super().__init__(())
        if isinstance(exit, bool) or not isinstance(exit, (int, np.integer)) or exit < 0:
            raise UsageError(f"rule 'fixed': exit must be an integer >= 0, got {exit!r}")
        self.exit = int(exit)

    @property
    def uses_thresholds(self) -> bool:
        return False

    def prepare(self, num_exits: int, scores: Sequence[str], has_confidence: Sequence[bool]) -> None:
        if self.exit >= num_exits:
            raise UsageError(f"rule 'fixed': exit {self.exit} does not exist; the bundle has exits 0..{num_exits - 1}")
        super().prepare(num_exits, scores, has_confidence)

    def with_thresholds(self, thresholds: Sequence[float]) -> "ExitRule":
        raise UsageError("rule 'fixed' has no thresholds; use FixedExitRule(exit) to choose another exit")

    def _stop_float(self, k: int, logits: np.ndarray, conf: np.ndarray | None) -> np.ndarray:
        return np.full(logits.shape[0], k == self.exit, dtype=bool)

    def to_spec(self) -> ExitRuleSpec:
        return ExitRuleSpec(kind=self.kind, thresholds=(), exit=self.exit)

    def __repr__(self) -> str:
        return f"FixedExitRule({self.exit})"


class _ForcedDecider(Decider):
    def __init__(self, rule: "ForcedExitRule", quant: Sequence[ExitQuant]):
        super().__init__(rule, quant)
        self.inner = rule.rule.compile(quant)
        self.stop = rule.exit
        inner = self.inner.steps
        self.steps = tuple(self._going_on(inner[k]) if k < self.stop and inner[k] is not None else
                           self._leaving(inner[k]) if k == self.stop else None for k in range(self.num_exits))

    @staticmethod
    def _going_on(inner: Callable[[list[int], Any, Any], tuple[int, Any]]) -> Callable[..., tuple[int, Any]]:
        def step(q: list[int], conf: Any, state: Any) -> tuple[int, Any]:
            return CONTINUE, inner(q, conf, state)[1]   # the decision is made, and ignored
        return step

    @staticmethod
    def _leaving(inner: Callable[[list[int], Any, Any], tuple[int, Any]] | None) -> Callable[..., tuple[int, Any]]:
        def step(q: list[int], conf: Any, state: Any) -> tuple[int, Any]:
            label, state = inner(q, conf, state) if inner is not None else (CONTINUE, state)
            return (q.index(max(q)) if label == CONTINUE else label), state
        return step

    def start(self) -> Any:
        return self.inner.start()

    def start_many(self, n: int) -> np.ndarray | None:
        return self.inner.start_many(n)

    def decide_many(self, k: int, logits: np.ndarray, conf: np.ndarray | None,
                    state: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        if self.inner.inspects[k]:
            labels, state = self.inner.decide_many(k, logits, conf, state)
        else:
            labels = np.full(logits.shape[0], CONTINUE, dtype=np.int64)
        if k < self.stop:
            return np.full(logits.shape[0], CONTINUE, dtype=np.int64), state
        fallback = _ordered(logits).argmax(axis=-1).astype(np.int64)
        return np.where(labels == CONTINUE, fallback, labels), state


class ForcedExitRule(ExitRule):
    """``rule`` evaluated at every exit up to ``exit`` (all of its decision work), but never allowed to stop
    before ``exit``; at ``exit`` it answers what ``rule`` answers there, or the exit's argmax.

    Benchmarks use it to time what an input leaving at ``exit`` costs under ``rule``; ``ForcedExitRule(rule,
    E - 1)`` is the network "forced to the last exit" with the real rule's decision cost at every exit.
    """

    kind = "forced"
    _decider = _ForcedDecider
    _scores_exits = False

    def __init__(self, rule: ExitRule, exit: int):
        super().__init__(())
        if not isinstance(rule, ExitRule):
            raise UsageError(f"ForcedExitRule needs an ExitRule, got {type(rule).__name__}")
        if isinstance(exit, bool) or not isinstance(exit, (int, np.integer)) or exit < 0:
            raise UsageError(f"ForcedExitRule: exit must be an integer >= 0, got {exit!r}")
        self.rule, self.exit = rule, int(exit)
        self.uses_confidence = rule.uses_confidence

    @property
    def uses_thresholds(self) -> bool:
        return False

    def prepare(self, num_exits: int, scores: Sequence[str], has_confidence: Sequence[bool]) -> None:
        if self.exit >= num_exits:
            raise UsageError(f"ForcedExitRule: exit {self.exit} does not exist; the bundle has exits "
                             f"0..{num_exits - 1}")
        self.rule.prepare(num_exits, scores, has_confidence)
        self.num_exits = num_exits

    def with_thresholds(self, thresholds: Sequence[float]) -> "ExitRule":
        return ForcedExitRule(self.rule.with_thresholds(thresholds), self.exit)

    def to_spec(self) -> ExitRuleSpec:
        raise UsageError("a forced-exit rule is a benchmark device and cannot be stored in a manifest")

    def _simulate_float(self, trace: Trace) -> tuple[np.ndarray, np.ndarray]:
        exit_index = np.full(trace.num_inputs, self.exit, dtype=np.int64)
        return exit_index, np.asarray(trace.logits[self.exit]).argmax(axis=-1).astype(np.int64)

    def __repr__(self) -> str:
        return f"ForcedExitRule({self.rule!r}, {self.exit})"


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
        if spec.fallback != "final":
            raise UsageError("rule 'fixed' takes fallback final only")
        return FixedExitRule(spec.exit)
    return RULES[spec.kind](spec.thresholds, fallback=spec.fallback)
