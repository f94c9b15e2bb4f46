"""Energy per inference, every figure of one stated kind.

Kinds (the words used in tables, JSON, the CLI, tune budgets and the controller):

* ``measured`` -- integrated from a power sensor or meter trace over phases of many inputs
  (:mod:`edgeexit.energy.measure`); per exit from phases forced to that exit, stored in the bundle by
  ``edgeexit bench --store-energy``. *total*: everything the board drew per input; *attributable*: minus
  the idle power over the same time.
* ``board_estimate`` -- latency x the board profile's active power (*total*), or x (active - idle)
  (*attributable*); the profile states the load its active figure was measured under.
* ``proxy`` -- the operation proxy (:mod:`edgeexit.energy.proxy`): 45 nm per-operation energies, memory
  traffic charged by the cache rule. Operations only: neither total nor attributable board energy.

:class:`EnergyModel` is built once per Runner; :meth:`EnergyModel.for_exit` makes an input's
:class:`Energy` when it is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..errors import UsageError
from .boards import Board
from .proxy import monolithic_proxy_mj, proxy_source, stages_proxy_mj

if TYPE_CHECKING:  # the bundle format's types, for annotations only: energy imports no runtime module
    from ..runtime.manifest import Manifest

#: Energy kinds, in the order tables show them.
KINDS = ("measured", "board_estimate", "proxy")
KIND_LABELS = {"measured": "measured", "board_estimate": "board estimate", "proxy": "operation proxy"}


@dataclass(frozen=True)
class Energy:
    """One inference's energy in millijoules, by kind (see the module docstring), with sources."""

    proxy_mj: float
    board_estimate_mj: float
    board_estimate_attributable_mj: float
    measured_mj: float | None                   # None unless the bundle holds measured figures for this board
    measured_attributable_mj: float | None
    proxy_source: str
    board_source: str
    measured_source: str

    def of(self, kind: str, attributable: bool = False) -> float | None:
        """The figure of ``kind`` ("measured", "board_estimate", "proxy"); ``attributable`` for the first two."""
        if kind == "proxy":
            return self.proxy_mj
        if kind == "board_estimate":
            return self.board_estimate_attributable_mj if attributable else self.board_estimate_mj
        if kind == "measured":
            return self.measured_attributable_mj if attributable else self.measured_mj
        raise UsageError(f"unknown energy kind {kind!r}; expected one of {', '.join(KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; every key names its kind."""
        return {"measured_mj": self.measured_mj, "measured_attributable_mj": self.measured_attributable_mj,
                "board_estimate_mj": self.board_estimate_mj,
                "board_estimate_attributable_mj": self.board_estimate_attributable_mj,
                "proxy_mj": self.proxy_mj,
                "sources": {"measured": self.measured_source, "board_estimate": self.board_source,
                            "proxy": self.proxy_source}}


def stored_measurement(manifest: Manifest, board: Board) -> Mapping[str, Any] | None:
    """The bench-measured per-exit figures the bundle holds for ``board`` (see :func:`measured_entry`), or None."""
    entry = (getattr(manifest, "energy", None) or {}).get("measured", {}).get(board.name)
    if not isinstance(entry, Mapping) or len(entry.get("exit_total_mj") or ()) != manifest.num_exits:
        return None
    return entry


class EnergyModel:
    """Per-exit energy of a bundle on a board: built once, asked per input.

    Args:
        manifest: the bundle's manifest (costs, stage shapes, stored measurements).
        board: the board profile (power figures, cache size).
    """

    def __init__(self, manifest: Manifest, board: Board):
        self.manifest, self.board = manifest, board
        self.proxy_mj = tuple(float(v) for v in np.cumsum(stages_proxy_mj(manifest, board)))  # [E] up to exit i
        self.monolithic_proxy_mj = monolithic_proxy_mj(manifest, board)
        self.proxy_source = proxy_source(manifest, board)
        self.board_source = (f"latency x {board.title} active {board.active.describe()}; attributable: x (active - "
                             f"idle {board.idle.describe()})")
        stored = stored_measurement(manifest, board)
        self.measured_mj: tuple[float, ...] | None = None
        self.measured_attributable_mj: tuple[float, ...] | None = None
        if stored is not None:
            self.measured_mj = tuple(float(v) for v in stored["exit_total_mj"])
            att = stored.get("exit_attributable_mj")
            self.measured_attributable_mj = (tuple(float(v) for v in att) if att and None not in att else None)
            self.measured_source = (f"measured by edgeexit bench on {board.name} ({stored.get('source', '?')}, "
                                    f"{stored.get('created', '?')}): mean over phases forced to each exit")
        else:
            self.measured_source = (f"no measured figures for {board.name} in the bundle (measure them with "
                                    "`edgeexit bench --store-energy` on the board with a power sensor)")

    def for_exit(self, exit_index: int, latency_ms: float) -> Energy:
        """The energy of an input that left at ``exit_index`` after ``latency_ms``."""
        b = self.board
        return Energy(proxy_mj=self.proxy_mj[exit_index], board_estimate_mj=latency_ms * b.active_w,
                      board_estimate_attributable_mj=latency_ms * (b.active_w - b.idle_w),
                      measured_mj=None if self.measured_mj is None else self.measured_mj[exit_index],
                      measured_attributable_mj=None if self.measured_attributable_mj is None
                      else self.measured_attributable_mj[exit_index],
                      proxy_source=self.proxy_source, board_source=self.board_source,
                      measured_source=self.measured_source)

    def exit_vector(self, kind: str, exit_latency_ms: np.ndarray | None = None,
                    attributable: bool = False) -> np.ndarray | None:
        """[E] energy (mJ) of leaving at each exit, of ``kind``; None when the bundle has no such figures.

        ``board_estimate`` needs ``exit_latency_ms`` (the latency of leaving at each exit).
        """
        if kind == "proxy":
            return np.asarray(self.proxy_mj, dtype=np.float64)
        if kind == "measured":
            v = self.measured_attributable_mj if attributable else self.measured_mj
            return None if v is None else np.asarray(v, dtype=np.float64)
        if kind == "board_estimate":
            if exit_latency_ms is None:
                return None
            watts = self.board.active_w - (self.board.idle_w if attributable else 0.0)
            return np.asarray(exit_latency_ms, dtype=np.float64) * watts
        raise UsageError(f"unknown energy kind {kind!r}; expected one of {', '.join(KINDS)}")

    def default_kind(self) -> str:
        """"measured" when the bundle holds measured figures for this board, else "proxy"."""
        return "measured" if self.measured_mj is not None else "proxy"
