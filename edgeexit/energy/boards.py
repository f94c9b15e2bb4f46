"""Board power profiles and board detection.

A profile gives a board's power draw at its supply input while idle and while running inference
(one CPU core busy, or the Edge TPU busy). ``latency x active_w`` is the board-level energy estimate used
when no power sensor is available. Every figure names its source; the figures are published measurements
of other people's boards, so treat them as +-30 % and prefer a power sensor (:mod:`edgeexit.energy.proxy`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..errors import UsageError

log = logging.getLogger(__name__)

DEVICE_TREE_MODEL = "/proc/device-tree/model"


@dataclass(frozen=True)
class Board:
    """A board's power profile."""

    name: str          # key in BOARDS, e.g. "rpi4"
    title: str         # human-readable
    idle_w: float      # W at the supply input, idle
    active_w: float    # W at the supply input while inferring
    source: str        # where the figures come from


BOARDS: dict[str, Board] = {b.name: b for b in (
    Board("rpi4", "Raspberry Pi 4 Model B", 1.8, 5.4,
          "USB-meter measurements at the USB-C input, minimal load 1.8 W to high CPU load 5.4 W "
          "(chipwired.com/raspberry-pi-power-use, Raspberry Pi 4, Raspberry Pi OS)"),
    Board("rpi5", "Raspberry Pi 5", 3.0, 7.0,
          "idle about 3 W measured at the USB-C input (u-labs.de, Raspberry Pi 5, Raspberry Pi OS 12); "
          "7 W all-core load is an approximate community figure, not verified by edgeexit"),
    Board("coral-dev", "Coral Dev Board", 2.0, 4.0,
          "Edge TPU 2 W at 4 TOPS (Coral datasheet: 0.5 W per TOPS) on top of an assumed 2 W i.MX 8M SoC "
          "baseline; approximate, the SoC figure is not a published measurement"),
    Board("coral-usb-rpi4", "Coral USB Accelerator on a Raspberry Pi 4", 2.2, 4.2,
          "Raspberry Pi 4 idle 2.2 W (chipwired.com) + Edge TPU 2 W at 4 TOPS (Coral datasheet); the Pi's "
          "CPU is mostly waiting on USB while the Edge TPU runs"),
    Board("generic", "unknown board", 1.0, 5.0,
          "nominal 5 V x 1 A budget, NOT a measurement; pass --board or a Board(...) with your board's figures"),
)}


def read_device_tree_model(path: str = DEVICE_TREE_MODEL) -> str | None:
    """The board's model string from the device tree (NUL-terminated), or None if there is none."""
    try:
        with open(path, "rb") as f:
            return f.read().split(b"\0", 1)[0].decode("utf-8", "replace").strip() or None
    except OSError:
        return None


def detect_board(model_path: str = DEVICE_TREE_MODEL, *, edgetpu: bool = False) -> Board:
    """Detect the board from the device-tree model string; "generic" when unknown.

    Args:
        model_path: device-tree model file (injectable for tests).
        edgetpu: an Edge TPU is used (a Raspberry Pi 4 becomes "coral-usb-rpi4").
    """
    model = read_device_tree_model(model_path) or ""
    if "Raspberry Pi 5" in model:
        board = BOARDS["rpi5"]
    elif "Raspberry Pi 4" in model:
        board = BOARDS["coral-usb-rpi4"] if edgetpu else BOARDS["rpi4"]
    elif "Phanbell" in model or "Coral" in model:  # Coral Dev Board: "Freescale i.MX8MQ Phanbell"
        board = BOARDS["coral-dev"]
    else:
        board = BOARDS["generic"]
    log.debug("device-tree model %r -> board %s", model, board.name)
    return board


def get_board(board: str | Board | None = None, *, edgetpu: bool = False,
              model_path: str = DEVICE_TREE_MODEL) -> Board:
    """A named profile, a Board passed through, or the detected board for None / "auto".

    Raises:
        UsageError: an unknown board name.
    """
    if isinstance(board, Board):
        return board
    if board is None or board == "auto":
        return detect_board(model_path, edgetpu=edgetpu)
    if board not in BOARDS:
        raise UsageError(f"unknown board {board!r}; expected auto or one of {', '.join(BOARDS)}")
    return BOARDS[board]


def cpu_model() -> str:
    """A short description of this machine's CPU (for benchmark records)."""
    model = read_device_tree_model()
    if model:
        return model
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine
