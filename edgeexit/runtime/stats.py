"""Per-exit statistics collected by a Runner: how many inputs left at each exit, and how long they took.

Recording costs two list updates per call; MACs and energy per exit are the same for every input leaving
there, so the summary derives them from the counts.

**Drift.** Without labels, the exit shares are what tells that the data no longer look like the data the
rule was tuned on (harder inputs leave later, other inputs elsewhere). When the rule in use is a stored
operating point, its tuned exit shares (``exit_fractions``, measured on ``n`` tuning images) are the
reference, and :meth:`RunnerStats.drift` tests the exit counts seen since the rule was set against them: a
chi-square test of homogeneity of the two samples of exits (observed vs tuned counts; both are samples, the
tuned shares are estimates too), or a goodness-of-fit test against the tuned shares when their ``n`` is not
stored. The chi-square approximation wants a handful of inputs per exit; the result says how many were seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from .points import OperatingPoints

#: A p-value below this flags drift. Small, because the test is meant to be read again and again on a
#: running device (at 0.001, a check every hour on unchanged data raises a false alarm about once in 40 days).
DRIFT_ALPHA = 1e-3
#: Stored shares are rounded to 6 decimals: thresholds are matched within this.
_MATCH_TOL = 1e-6


@dataclass(frozen=True)
class ExitShareReference:
    """The exit shares a rule was tuned to: where they come from, the shares, and the images they were measured
    on (None when not stored)."""

    source: str
    shares: tuple[float, ...]
    n: int | None


def reference_shares(points: OperatingPoints, kind: str, thresholds: Sequence[float]) -> ExitShareReference | None:
    """The tuned exit shares of the stored operating point whose rule is ``kind`` with ``thresholds`` (a named
    point first, then a front point), or None when no stored point is that rule or it has no shares."""
    def same(p: Any) -> bool:
        return (p is not None and p.rule == kind and len(p.thresholds) == len(thresholds) and p.exit_fractions
                and all(abs(a - b) <= _MATCH_TOL * max(1.0, abs(b)) for a, b in zip(p.thresholds, thresholds)))

    for name, entry in points.named.items():
        if same(entry.metrics):
            n = entry.n if isinstance(entry.n, int) and entry.n > 0 else None
            return ExitShareReference(f"operating point {name!r}", tuple(entry.metrics.exit_fractions), n)
    for i, p in enumerate(points.front):
        if same(p):  # the front came from the last tune: the images of the named points it chose
            ns = [e.n for e in points.named.values() if e.metrics is not None and e.metrics in points.front
                  and isinstance(e.n, int) and e.n > 0]
            return ExitShareReference(f"front point {i}", tuple(p.exit_fractions), ns[-1] if ns else None)
    return None


def exit_share_test(counts: Sequence[int], shares: Sequence[float], n_reference: int | None) -> dict[str, Any]:
    """Chi-square test: are ``counts`` (exits seen) drawn from the distribution the reference ``shares`` were?

    Args:
        counts: [E] inputs seen leaving at each exit.
        shares: [E] the reference exit shares.
        n_reference: images the shares were measured on: a two-sample test of homogeneity (2 x E table); None:
            a goodness-of-fit test that takes the shares as exact.

    Returns:
        {"test", "chi2", "dof", "p_value", "n"} (p_value 1.0 with no inputs or a single exit in use).
    """
    n = int(sum(counts))
    if n_reference is not None:
        ref = [round(f * n_reference) for f in shares]
        total = n + sum(ref)
        chi2, used = 0.0, 0
        for o, r in zip(counts, ref):
            col = o + r
            if col == 0:
                continue
            used += 1
            for x, row in ((o, n), (r, sum(ref))):
                e = row * col / total
                chi2 += (x - e) ** 2 / e if e > 0 else 0.0
        test = "chi-square homogeneity, observed vs tuned exit counts"
    else:
        chi2, used = 0.0, 0
        for o, f in zip(counts, shares):
            if f > 0:
                used += 1
                chi2 += (o - n * f) ** 2 / (n * f) if n else 0.0
            elif o > 0:
                chi2 = math.inf
        test = "chi-square goodness of fit to the tuned exit shares"
    dof = max(used - 1, 0)
    p = 1.0 if n == 0 or dof == 0 else chi2_sf(chi2, dof)
    return {"test": test, "chi2": chi2, "dof": dof, "p_value": p, "n": n}


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square variable with ``dof`` degrees of freedom: the regularized upper incomplete
    gamma function Q(dof / 2, x / 2), by its series below a + 1 and its continued fraction above (Numerical
    Recipes, 6.2), to about 1e-12."""
    if x <= 0:
        return 1.0
    if math.isinf(x):
        return 0.0
    a, z = dof / 2.0, x / 2.0
    log_front = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1:                                   # series for P(a, z)
        term = total = 1.0 / a
        k = a
        for _ in range(1000):
            k += 1
            term *= z / k
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300                                   # modified Lentz continued fraction for Q(a, z)
    b = z + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return min(1.0, math.exp(log_front) * h)


class RunnerStats:
    """Counts and total call time (ns) per exit since the last :meth:`reset`; the tuned exit shares of the rule
    in use (``reference``), if it is a stored operating point, and the counts since it was set."""

    __slots__ = ("num_exits", "cumulative_macs", "counts", "latency_ns", "reference", "_base")

    def __init__(self, num_exits: int, cumulative_macs: Sequence[int] | None = None):
        self.num_exits = num_exits
        self.cumulative_macs = tuple(cumulative_macs) if cumulative_macs is not None else None
        self.counts = [0] * num_exits
        self.latency_ns = [0] * num_exits
        self.reference: ExitShareReference | None = None
        self._base = [0] * num_exits          # counts when the reference was set

    def set_reference(self, reference: ExitShareReference | None) -> None:
        """The rule changed: compare the counts from now on with ``reference`` (None: no tuned shares)."""
        self.reference = reference if reference is not None and len(reference.shares) == self.num_exits else None
        self._base = list(self.counts)

    def drift(self, alpha: float = DRIFT_ALPHA) -> dict[str, Any] | None:
        """Do the exits seen since the rule was set differ from its tuned shares beyond chance?

        Returns:
            None when the rule has no tuned shares; else {"reference", "tuned_shares", "n_tuned", "observed",
            "observed_shares", "test", "chi2", "dof", "p_value", "alpha", "drift"} (``drift``: p_value < alpha).
        """
        ref = self.reference
        if ref is None:
            return None
        seen = [c - b for c, b in zip(self.counts, self._base)]
        out = exit_share_test(seen, ref.shares, ref.n)
        total = out.pop("n")
        return {"reference": ref.source, "tuned_shares": list(ref.shares), "n_tuned": ref.n, "observed": seen,
                "observed_shares": [c / total if total else 0.0 for c in seen], **out, "alpha": alpha,
                "drift": out["p_value"] < alpha}

    def record(self, exit_index: int, latency_ns: int) -> None:
        self.counts[exit_index] += 1
        self.latency_ns[exit_index] += latency_ns

    def record_many(self, exit_index: int, count: int, latency_ns: int) -> None:
        self.counts[exit_index] += count
        self.latency_ns[exit_index] += latency_ns

    @property
    def total(self) -> int:
        return sum(self.counts)

    def reset(self) -> None:
        """Zero every total (in place: the Runner's hot path holds these lists)."""
        self.counts[:] = [0] * self.num_exits
        self.latency_ns[:] = [0] * self.num_exits
        self._base = [0] * self.num_exits

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: per exit count, share, mean latency (ms) and, when the bundle's cumulative MACs
        are known, MACs."""
        total, cumulative_macs = self.total, self.cumulative_macs
        rows = []
        for i, (count, ns) in enumerate(zip(self.counts, self.latency_ns)):
            row: dict[str, Any] = {"exit": i, "count": count, "share": count / total if total else 0.0,
                                   "mean_latency_ms": ns * 1e-6 / count if count else 0.0}
            if cumulative_macs is not None:
                row["macs"] = int(cumulative_macs[i])
            rows.append(row)
        out: dict[str, Any] = {"total": total,
                               "mean_latency_ms": sum(self.latency_ns) * 1e-6 / total if total else 0.0,
                               "exits": rows}
        if cumulative_macs is not None:
            out["mean_macs"] = (sum(c * m for c, m in zip(self.counts, cumulative_macs)) / total) if total else 0.0
        out["drift"] = self.drift()
        return out
