"""Board profiles (one idle and one active power figure, the cache the operation proxy uses) and detection.

Each profile states, for every figure, where it comes from and, for the active figure, the load it was
measured under. The power figures are other people's measurements at the board's supply input: use them
as +-30 % at best, and measure your own board (``edgeexit bench`` with a power sensor or ``--power-trace``).

``cache_bytes`` is the last-level cache one inference core can use; the operation proxy
(:mod:`edgeexit.energy.proxy`) charges memory traffic to SRAM or DRAM by comparing the bundle's working set
with it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..errors import UsageError

log = logging.getLogger(__name__)

DEVICE_TREE_MODEL = "/proc/device-tree/model"
KIB, MIB = 1024, 1024 * 1024

_CHIPWIRED = ("chipwired.com/raspberry-pi-power-use: USB-C tester at the supply input, Raspberry Pi 4, "
              "Raspberry Pi OS Bullseye")


@dataclass(frozen=True)
class PowerFigure:
    """One power draw at the board's supply input (W), the load it was measured under, and its source."""

    watts: float
    load: str
    source: str

    def describe(self) -> str:
        return f"{self.watts:g} W ({self.load}; {self.source})"


@dataclass(frozen=True)
class Board:
    """A board's power and cache profile."""

    name: str                 # key in BOARDS, e.g. "rpi4"
    title: str                # human-readable
    idle: PowerFigure         # nothing but the OS running
    active: PowerFigure       # under the stated load
    cache_bytes: int | None   # last-level cache one core can use; None: unknown (the proxy assumes none)
    cache_source: str

    @property
    def idle_w(self) -> float:
        return self.idle.watts

    @property
    def active_w(self) -> float:
        return self.active.watts

    @property
    def source(self) -> str:
        """Where every figure of the profile comes from, in one line."""
        return (f"idle {self.idle.describe()}; active {self.active.describe()}; cache "
                f"{'unknown' if self.cache_bytes is None else f'{self.cache_bytes // KIB} KiB'} ({self.cache_source})")

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "title": self.title,
                "idle_w": self.idle.watts, "idle_load": self.idle.load, "idle_source": self.idle.source,
                "active_w": self.active.watts, "active_load": self.active.load, "active_source": self.active.source,
                "cache_bytes": self.cache_bytes, "cache_source": self.cache_source}


_PI4_IDLE = PowerFigure(2.2, "idle desktop, WiFi and Bluetooth on ('idle load')", _CHIPWIRED)
_PI4_CACHE = (MIB, "BCM2711: 4x Cortex-A72, 32 KiB L1 data cache per core, 1 MiB shared L2 (Raspberry Pi "
                   "documentation, 'Processors')")

BOARDS: dict[str, Board] = {b.name: b for b in (
    Board("rpi4", "Raspberry Pi 4 Model B", _PI4_IDLE,
          PowerFigure(5.4, "intense CPU work on all cores plus WiFi traffic ('high load'); a one-thread inference "
                      "draws less, so the estimate is an upper bound", _CHIPWIRED),
          *_PI4_CACHE),
    Board("rpi5", "Raspberry Pi 5",
          PowerFigure(3.0, "idle, Raspberry Pi OS 12", "u-labs.de, USB-C meter at the supply input"),
          PowerFigure(7.0, "all cores busy", "approximate community figure, not verified by edgeexit"),
          2 * MIB, "BCM2712: 4x Cortex-A76, 64 KiB L1 data and 512 KiB L2 per core, 2 MiB shared L3 (Raspberry "
                   "Pi documentation, 'Processors'); the 2 MiB L3 is the last level"),
    Board("coral-dev", "Coral Dev Board",
          PowerFigure(2.0, "i.MX 8M SoC idle", "assumed baseline, NOT a published measurement"),
          PowerFigure(4.0, "Edge TPU at its rated 4 TOPS on top of the idle SoC",
                      "Coral datasheet: 0.5 W per TOPS, 2 W at 4 TOPS, plus the assumed 2 W idle"),
          MIB, "NXP i.MX 8M Quad: 4x Cortex-A53, 1 MiB shared L2 (NXP i.MX 8M datasheet); the Edge TPU's own "
               "parameter SRAM (about 8 MiB, Coral documentation) is not modelled"),
    Board("coral-usb-rpi4", "Coral USB Accelerator on a Raspberry Pi 4", _PI4_IDLE,
          PowerFigure(4.2, "Edge TPU at its rated 4 TOPS while the Pi's CPU mostly waits on USB",
                      f"Pi 4 idle 2.2 W ({_CHIPWIRED}) + Edge TPU 2 W at 4 TOPS (Coral datasheet)"),
          *_PI4_CACHE),
    Board("generic", "unknown board",
          PowerFigure(1.0, "unknown", "nominal, NOT a measurement"),
          PowerFigure(5.0, "unknown", "nominal 5 V x 1 A budget, NOT a measurement; pass --board or a Board(...) "
                      "with your board's figures"),
          None, "unknown: the proxy charges every weight byte to DRAM on every inference (an upper bound)"),
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
