"""Energy per inference: board profiles, the operation proxy, power sources and measurement, one vocabulary.

Every figure says its kind (:data:`KINDS`): ``measured`` (integrated over phases of many inputs,
:mod:`.measure`), ``board_estimate`` (latency x a board profile's power, :mod:`.boards`) or ``proxy`` (45 nm
per-operation energies with a cache rule, :mod:`.proxy`); measured and board figures are *total* or
*attributable* (idle power subtracted). :class:`EnergyModel` gives an input's :class:`Energy` per exit.
"""

from .boards import BOARDS, Board, PowerFigure, detect_board, get_board
from .model import KIND_LABELS, KINDS, Energy, EnergyModel

__all__ = ["BOARDS", "Board", "PowerFigure", "detect_board", "get_board", "KINDS", "KIND_LABELS", "Energy",
           "EnergyModel"]
