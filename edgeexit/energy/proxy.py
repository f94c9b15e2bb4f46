"""Energy per inference, three ways.

1. **Operation proxy** (``ops_mj``): counted operations and memory traffic times per-operation energies
   from Horowitz, "Computing's energy problem", ISSCC 2014 (45 nm, 0.9 V):

   * one int8 multiply-accumulate = int8 multiply 0.2 pJ + int8 add 0.03 pJ  -> 0.23 pJ per MAC;
   * one int32 add 0.1 pJ per output element (bias add / requantization accumulator);
   * SRAM: 64-bit read 10 pJ (8 KB) to 100 pJ (1 MB); edgeexit uses the 1 MB figure, 12.5 pJ per byte,
     for activations (a stage's input read once, its outputs written once);
   * DRAM: 64-bit read 1.3-2.6 nJ; edgeexit uses 1.3 nJ, 162.5 pJ per byte, for weights (every parameter
     byte of the stage's segment and head read once per inference; no cache reuse across inferences).

   It compares exits and networks; it is not what a board draws (45 nm, no static power, no OS).
2. **Board profile** (``board_mj``): measured latency x the board's active power (:mod:`edgeexit.energy.boards`).
3. **Measured** (``measured_mj``): latency x the mean of a Linux hwmon power sensor read before and after
   the inference (``power*_input`` in microwatts, or ``curr*_input`` mA x ``in*_input`` mV pairs, e.g. an
   INA219/INA260 with its kernel driver). None when no sensor exists, and the source says so.
"""

from __future__ import annotations

import glob
import logging
import math
import os
from dataclasses import dataclass
from typing import Sequence

from ..runtime.manifest import Manifest, StageSpec

log = logging.getLogger(__name__)

INT8_MULT_PJ = 0.2
INT8_ADD_PJ = 0.03
INT8_MAC_PJ = INT8_MULT_PJ + INT8_ADD_PJ
INT32_ADD_PJ = 0.1
SRAM_PJ_PER_BYTE = 100.0 / 8   # 64-bit read from a 1 MB SRAM
DRAM_PJ_PER_BYTE = 1300.0 / 8  # 64-bit DRAM read, low end
HWMON_ROOT = "/sys/class/hwmon"
OPS_SOURCE = ("op proxy: 0.23 pJ/int8 MAC, 0.1 pJ/int32 add per output, 12.5 pJ/B SRAM activations, "
              "162.5 pJ/B DRAM weights (Horowitz ISSCC 2014, 45 nm)")


@dataclass(frozen=True)
class Energy:
    """Energy of one inference in millijoules, with where each figure comes from."""

    ops_mj: float
    board_mj: float
    measured_mj: float | None
    ops_source: str
    board_source: str
    measured_source: str

    @property
    def best_mj(self) -> float:
        """The measured value when there is one, else the board estimate."""
        return self.measured_mj if self.measured_mj is not None else self.board_mj


def _elements(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def stage_ops_mj(stage: StageSpec) -> float:
    """Operation-proxy energy of one stage (mJ): MACs, per-output int32 adds, activation and weight traffic."""
    c = stage.costs
    act_in = _elements(stage.input.shape)                                      # int8 bytes read
    act_out = sum(_elements(t.shape) for t in stage.outputs.values())          # int8 bytes written
    pj = ((c.segment_macs + c.head_macs) * INT8_MAC_PJ + act_out * INT32_ADD_PJ
          + (act_in + act_out) * SRAM_PJ_PER_BYTE
          + (c.segment_param_bytes + c.head_param_bytes) * DRAM_PJ_PER_BYTE)
    return pj * 1e-9


def stages_ops_mj(manifest: Manifest) -> tuple[float, ...]:
    """Operation-proxy energy of every stage (mJ)."""
    return tuple(stage_ops_mj(s) for s in manifest.stages)


class HwmonSensor:
    """A Linux hwmon power reading: ``power<n>_input`` (uW) or ``curr<n>_input`` (mA) x ``in<n>_input`` (mV)."""

    def __init__(self, directory: str, power_file: str | None = None,
                 current_file: str | None = None, voltage_file: str | None = None):
        self.directory = directory
        self.power_file, self.current_file, self.voltage_file = power_file, current_file, voltage_file
        name_file = os.path.join(directory, "name")
        try:
            with open(name_file, encoding="utf-8") as f:
                self.name = f.read().strip()
        except OSError:
            self.name = os.path.basename(directory)

    @property
    def description(self) -> str:
        what = os.path.basename(self.power_file) if self.power_file else (
            f"{os.path.basename(self.current_file or '')} x {os.path.basename(self.voltage_file or '')}")
        return f"hwmon {self.name} ({self.directory}, {what})"

    def read_watts(self) -> float | None:
        """The current power in W, or None if the sensor cannot be read now."""
        try:
            if self.power_file:
                return _read_int(self.power_file) * 1e-6
            return _read_int(self.current_file or "") * _read_int(self.voltage_file or "") * 1e-6
        except (OSError, ValueError):
            return None


def _read_int(path: str) -> int:
    with open(path, encoding="ascii") as f:
        return int(f.read().strip())


def find_power_sensor(root: str = HWMON_ROOT) -> HwmonSensor | None:
    """The first readable hwmon power sensor under ``root`` (injectable for tests), or None."""
    for directory in sorted(glob.glob(os.path.join(root, "hwmon*"))):
        for power in sorted(glob.glob(os.path.join(directory, "power*_input"))):
            sensor = HwmonSensor(directory, power_file=power)
            if sensor.read_watts() is not None:
                return sensor
        for current in sorted(glob.glob(os.path.join(directory, "curr*_input"))):
            n = os.path.basename(current)[len("curr"):-len("_input")]
            voltage = os.path.join(directory, f"in{n}_input")
            if os.path.exists(voltage):
                sensor = HwmonSensor(directory, current_file=current, voltage_file=voltage)
                if sensor.read_watts() is not None:
                    return sensor
    return None
