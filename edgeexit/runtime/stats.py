"""Per-exit statistics collected by a Runner: how many inputs left at each exit, and how long they took.

Recording costs two list updates per call; MACs and energy per exit are the same for every input leaving
there, so the summary derives them from the counts.
"""

from __future__ import annotations

from typing import Any, Sequence


class RunnerStats:
    """Counts and total call time (ns) per exit since the last :meth:`reset`."""

    __slots__ = ("num_exits", "cumulative_macs", "counts", "latency_ns")

    def __init__(self, num_exits: int, cumulative_macs: Sequence[int] | None = None):
        self.num_exits = num_exits
        self.cumulative_macs = tuple(cumulative_macs) if cumulative_macs is not None else None
        self.counts = [0] * num_exits
        self.latency_ns = [0] * num_exits

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
        return out
