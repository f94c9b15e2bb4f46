"""Per-exit statistics collected by a Runner: how many inputs left at each exit, and what they cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ExitStats:
    """Running totals for one exit."""

    count: int = 0
    macs: int = 0
    latency_ms: float = 0.0
    ops_mj: float = 0.0
    board_mj: float = 0.0
    measured_mj: float = 0.0
    measured_count: int = 0

    def mean(self, total: float) -> float:
        return total / self.count if self.count else 0.0


@dataclass
class RunnerStats:
    """Totals per exit since the last reset."""

    num_exits: int
    exits: list[ExitStats] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.exits:
            self.exits = [ExitStats() for _ in range(self.num_exits)]

    def record(self, exit_index: int, macs: int, latency_ms: float, ops_mj: float, board_mj: float,
               measured_mj: float | None) -> None:
        e = self.exits[exit_index]
        e.count += 1
        e.macs += macs
        e.latency_ms += latency_ms
        e.ops_mj += ops_mj
        e.board_mj += board_mj
        if measured_mj is not None:
            e.measured_mj += measured_mj
            e.measured_count += 1

    @property
    def total(self) -> int:
        return sum(e.count for e in self.exits)

    def reset(self) -> None:
        self.exits = [ExitStats() for _ in range(self.num_exits)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: per exit count, share, mean MACs, latency (ms) and energy (mJ)."""
        total = self.total
        rows = []
        for i, e in enumerate(self.exits):
            rows.append({"exit": i, "count": e.count, "share": e.count / total if total else 0.0,
                         "mean_macs": e.mean(e.macs), "mean_latency_ms": e.mean(e.latency_ms),
                         "mean_ops_mj": e.mean(e.ops_mj), "mean_board_mj": e.mean(e.board_mj),
                         "mean_measured_mj": e.measured_mj / e.measured_count if e.measured_count else None})
        all_macs = sum(e.macs for e in self.exits)
        return {"total": total, "mean_macs": all_macs / total if total else 0.0,
                "mean_latency_ms": sum(e.latency_ms for e in self.exits) / total if total else 0.0,
                "exits": rows}
