"""Tuning targets that hold on new data: Learn-then-Test with fixed-sequence testing along the front.

A point chosen to sit exactly on an accuracy limit of one sample lands on either side of it on the next. The
guaranteed search (Angelopoulos, Bates, Candes, Jordan, Lei, "Learn then Test: Calibrating Predictive Algorithms to
Achieve Risk Control"; applied to early exit by Schuster et al., "Confident Adaptive Language Modeling") turns a
target into a statement about new data from the same distribution:

1. the labelled tuning set is split at random (seeded: the same data give the same split) into a *search* part
   and a *calibration* part;
2. the accuracy / cost front of the rule is searched on the search part only (:mod:`edgeexit.tuning.search`);
3. its points are tested on the calibration part in a fixed order, from the safest to the cheapest (accuracy
   targets) or from the cheapest to the most accurate (budgets); each test rejects "this point misses the target"
   at level ``risk`` with an exact bound, and the walk stops at the first point it cannot reject;
4. the chosen point is the cheapest (or most accurate) point whose test rejected.

Fixed-sequence testing needs no multiplicity correction: with probability at least ``1 - risk`` over the draw of
the calibration images, *every* rejected point meets the target on the distribution they were drawn from, so the
choice among them is free. The assumption is exchangeability: new inputs come from the distribution of the
tuning set (:mod:`edgeexit.runtime.drift` warns on the device when the exit shares say otherwise).

The per-point tests (``n`` calibration images, ``delta`` = the risk):

* accuracy drop <= ``a`` against a reference (the final exit for ``--max-drop``, a stored rule for
  ``--no-worse-than``): with ``b`` images the reference gets right and the point wrong and ``c`` the other way round
  (the paired, McNemar-style counts), the drop is ``p_b - p_c``; Clopper-Pearson bounds at ``0.8 delta`` and ``0.2 delta`` give
  ``p_b <= U(b)`` and ``p_c >= L(c)``, and the point passes when ``U(b) - L(c) <= a``;
* accuracy >= ``f``: the point passes when the Clopper-Pearson upper bound of its error rate is ``<= 1 - f``;
* mean cost <= budget: per-input costs lie in ``[min, max]`` of the exits' costs; the empirical Bernstein bound
  (Maurer and Pontil, "Empirical Bernstein Bounds and Sample Variance Penalization") of the mean must be
  ``<= budget``. The costs per exit are the stored MAC counts, or the exit costs timed on this device: the
  guarantee covers the randomness of which exit new inputs take, not a change of the device's speed.

Only numpy and the standard library are used (the tuner runs on the board).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import TuningError, UsageError

#: Default risk: the target holds on new data with probability at least 95 %.
DEFAULT_RISK = 0.05
#: Share of the tuning images that test the points (the rest searches the front).
CALIBRATION_SHARE = 0.5
#: The split is seeded so that the same data give the same split, run after run.
SPLIT_SEED = 20211004
#: Share of the risk spent on the bound of ``p_b`` (the point wrong where the reference is right) in a drop test
#: (an early exit rarely fixes an error of the final exit, so ``p_c`` is small and its bound gains little);
#: the rest bounds ``p_c`` from below.
DROP_SPLIT = 0.8
#: Each part needs at least this many images for a guarantee worth printing.
MIN_PART = 100

METHOD = ("Learn then Test: front searched on one random part of the tuning images, points tested on the other "
          "in fixed sequence (exact Clopper-Pearson bounds on the paired disagreements; empirical Bernstein for "
          "mean costs)")
ASSUMPTION = "new inputs are exchangeable with the tuning images (drawn from the same distribution)"


def check_risk(risk: Any) -> float:
    """The risk as a float in (0, 1]; UsageError otherwise (1 = no guarantee, the point estimate)."""
    if isinstance(risk, bool) or not isinstance(risk, (int, float)) or not math.isfinite(risk) or not 0 < risk <= 1:
        raise UsageError(f"--risk must be a probability in (0, 1] (0.05: the target holds on new data with "
                         f"probability 95 %; 1: no guarantee), got {risk!r}")
    return float(risk)


def split(n: int, share: float = CALIBRATION_SHARE, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(search rows, calibration rows): a seeded random split of ``n`` inputs, each part sorted.

    Raises:
        TuningError: a part would hold fewer than :data:`MIN_PART` images.
    """
    m = int(round(n * share))
    if m < MIN_PART or n - m < MIN_PART:
        raise TuningError(f"a guaranteed target needs at least {math.ceil(MIN_PART / min(share, 1 - share))} "
                          f"labelled tuning images ({MIN_PART} to search, {MIN_PART} to test), got {n}; give more "
                          "images, or --risk 1 for a point estimate without a guarantee")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[m:]), np.sort(perm[:m])


# --- exact binomial bounds (Clopper-Pearson) ------------------------------------------------------------------

def _log_choose(n: int, k: int) -> np.ndarray:
    """[k + 1] log C(n, i) for i = 0..k (a cumulative sum of log((n - i + 1) / i))."""
    i = np.arange(1, k + 1, dtype=np.float64)
    return np.concatenate([[0.0], np.cumsum(np.log((n - i + 1.0) / i))])


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), exact (a log-space sum)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(k + 1, dtype=np.float64)
    lp = _log_choose(n, k) + i * math.log(p) + (n - i) * math.log1p(-p)
    top = lp.max()
    return float(min(1.0, math.exp(top) * np.exp(lp - top).sum()))


def _bisect(f: Callable[[float], bool], lo: float, hi: float, steps: int = 60) -> float:
    """The boundary in [lo, hi] where the monotone predicate ``f`` turns from True (at lo) to False."""
    for _ in range(steps):
        mid = (lo + hi) / 2.0
        if f(mid):
            lo = mid
        else:
            hi = mid
    return hi


def binomial_upper(k: int, n: int, delta: float) -> float:
    """One-sided Clopper-Pearson upper bound: P(true rate <= bound) >= 1 - delta after ``k`` of ``n``."""
    if n <= 0 or k >= n:
        return 1.0
    return _bisect(lambda p: binomial_cdf(k, n, p) > delta, k / n, 1.0)


def binomial_lower(k: int, n: int, delta: float) -> float:
    """One-sided Clopper-Pearson lower bound: P(true rate >= bound) >= 1 - delta after ``k`` of ``n``."""
    if n <= 0 or k <= 0:
        return 0.0
    return 1.0 - binomial_upper(n - k, n, delta)


def bernstein_upper(values: np.ndarray, lo: float, hi: float, delta: float) -> float:
    """Upper confidence bound of the mean of i.i.d. values in [lo, hi] (empirical Bernstein, Maurer-Pontil)."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    width = float(hi - lo)
    if n < 2:
        return float(hi)
    if width <= 0:
        return float(x.mean())
    z = (x - lo) / width
    log_term = math.log(2.0 / delta)
    bound = z.mean() + math.sqrt(2.0 * z.var(ddof=1) * log_term / n) + 7.0 * log_term / (3.0 * (n - 1))
    return float(lo + width * min(bound, 1.0))


# --- what is tested -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """The test one candidate point must pass on the calibration images.

    ``kind`` is "drop" (accuracy drop against a reference at most ``limit``, a fraction), "accuracy" (accuracy at
    least ``limit``) or "budget" (mean cost at most ``limit`` in the cost's unit).
    """

    kind: str
    limit: float
    reference_correct: np.ndarray | None = None   # [n] bool, for "drop"
    cost_per_exit: np.ndarray | None = None       # [E], for "budget"

    def bound(self, exit_index: np.ndarray, correct: np.ndarray, delta: float) -> float:
        """The upper confidence bound (at 1 - delta) of the quantity the check limits, for one point."""
        n = int(correct.shape[0])
        if self.kind == "drop":
            ref = self.reference_correct
            b = int(np.count_nonzero(ref & ~correct))        # the reference right, the point wrong
            c = int(np.count_nonzero(~ref & correct))        # the other way round
            return binomial_upper(b, n, delta * DROP_SPLIT) - binomial_lower(c, n, delta * (1 - DROP_SPLIT))
        if self.kind == "accuracy":
            return binomial_upper(n - int(np.count_nonzero(correct)), n, delta)
        cost = np.asarray(self.cost_per_exit, dtype=np.float64)
        return bernstein_upper(cost[exit_index], float(cost.min()), float(cost.max()), delta)

    def passes(self, bound: float) -> bool:
        if self.kind == "accuracy":
            return bound <= 1.0 - self.limit + 1e-12
        return bound <= self.limit + 1e-12


@dataclass(frozen=True)
class Guarantee:
    """What a guaranteed tune promises, as stored with the point and printed by ``tune`` and ``info``.

    Attributes:
        statement: the target in words ("accuracy drop <= 0.5 pp vs the final exit").
        risk: the probability that the statement fails on new data is at most this.
        bound: the chosen point's upper confidence bound (at 1 - risk for this point alone) of the limited quantity:
            drop in pp, error in %, or mean cost in the cost's unit.
        calibration_images, search_images: the sizes of the two parts.
        tested, passed: points tested along the sequence, and how many passed before it stopped.
    """

    statement: str
    risk: float
    bound: float
    bound_unit: str
    calibration_images: int
    search_images: int
    tested: int
    passed: int

    def to_dict(self) -> dict[str, Any]:
        return {"statement": self.statement, "risk": self.risk, "holds_with_probability": round(1 - self.risk, 6),
                "bound": round(self.bound, 6), "bound_unit": self.bound_unit,
                "calibration_images": self.calibration_images, "search_images": self.search_images,
                "tested": self.tested, "passed": self.passed, "method": METHOD, "assumption": ASSUMPTION}

    def describe(self) -> str:
        return (f"{self.statement} on new data with probability >= {100 * (1 - self.risk):.4g} % "
                f"({self.calibration_images} calibration images, {self.search_images} search images; "
                "assumes new inputs come from the tuning distribution)")


def fixed_sequence(path: Sequence[Any], outcome: Callable[[Any], tuple[np.ndarray, np.ndarray]], check: Check,
                   delta: float) -> tuple[list[tuple[Any, float]], int]:
    """Test ``path`` in order; stop at the first point that fails.

    Args:
        path: candidate points, first tested first.
        outcome: ``outcome(point) -> (exit_index [n], correct [n])`` on the calibration images.
        check: the test.
        delta: the level (the tune's risk, divided by the number of rule kinds searched).

    Returns:
        ([(point, bound)] of every point that passed, in path order; how many points were tested).
    """
    passed: list[tuple[Any, float]] = []
    tested = 0
    for point in path:
        exit_index, correct = outcome(point)
        tested += 1
        b = check.bound(exit_index, correct, delta)
        if not check.passes(b):
            break
        passed.append((point, b))
    return passed, tested
