"""Power sources: a Linux hwmon sensor, the Raspberry Pi 5 PMIC, and a CSV power trace from a USB meter.

A *live* source (:class:`HwmonSensor`, :class:`PmicSensor`) answers ``read_watts()`` now and says how often
it updates (``period_s``); :class:`~edgeexit.energy.measure.Sampler` reads it in a background thread. A
:class:`PowerTrace` is a recorded series of (time, watts) joined with the benchmark's phases afterwards by
timestamps.
"""

from __future__ import annotations

import csv
import datetime as _dt
import glob
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from ..errors import UsageError

log = logging.getLogger(__name__)

HWMON_ROOT = "/sys/class/hwmon"
#: Poll period when a hwmon sensor does not publish ``update_interval``.
DEFAULT_PERIOD_S = 0.01


class PowerSource(Protocol):
    """Anything the sampler can read: watts now (None when it cannot be read), its update period, a name."""

    description: str
    period_s: float

    def read_watts(self) -> float | None: ...


def _read_int(path: str) -> int:
    with open(path, encoding="ascii") as f:
        return int(f.read().strip())


class HwmonSensor:
    """A Linux hwmon power reading: ``power<n>_input`` (uW) or ``curr<n>_input`` (mA) x ``in<n>_input`` (mV).

    The INA219/226/230/260 (``ina2xx`` driver) publish ``update_interval`` (ms); each reading is the sensor's
    average over that interval, so reading once per interval covers the whole time.
    """

    def __init__(self, directory: str, power_file: str | None = None,
                 current_file: str | None = None, voltage_file: str | None = None):
        self.directory = directory
        self.power_file, self.current_file, self.voltage_file = power_file, current_file, voltage_file
        try:
            with open(os.path.join(directory, "name"), encoding="utf-8") as f:
                self.name = f.read().strip()
        except OSError:
            self.name = os.path.basename(directory)
        try:
            self.period_s = min(1.0, max(0.001, _read_int(os.path.join(directory, "update_interval")) * 1e-3))
            self._period_known = True
        except (OSError, ValueError):
            self.period_s, self._period_known = DEFAULT_PERIOD_S, False

    @property
    def description(self) -> str:
        what = os.path.basename(self.power_file) if self.power_file else (
            f"{os.path.basename(self.current_file or '')} x {os.path.basename(self.voltage_file or '')}")
        every = f"update_interval {self.period_s * 1e3:g} ms" if self._period_known else \
            f"no update_interval, polled every {self.period_s * 1e3:g} ms"
        return f"hwmon {self.name} ({self.directory}, {what}, {every})"

    def read_watts(self) -> float | None:
        """The current power in W, or None if the sensor cannot be read now."""
        try:
            if self.power_file:
                return _read_int(self.power_file) * 1e-6
            return _read_int(self.current_file or "") * _read_int(self.voltage_file or "") * 1e-6
        except (OSError, ValueError):
            return None


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


# ------------------------------------------------------------------------------------ Raspberry Pi 5 PMIC

_PMIC_LINE = re.compile(r"^\s*(\S+)_([AV])\s+(?:current|volt)\(\d+\)=([-+0-9.eE]+)[AV]\s*$")


def parse_pmic_adc(text: str) -> dict[str, tuple[float, float]]:
    """Rails of ``vcgencmd pmic_read_adc`` output that have both a voltage and a current: {rail: (V, A)}.

    Lines look like ``  VDD_CORE_A current(7)=1.42880000A`` and ``  VDD_CORE_V volt(15)=0.90659250V``; rails
    with a voltage only (``EXT5V_V``, ``BATT_V``) are left out.
    """
    volts: dict[str, float] = {}
    amps: dict[str, float] = {}
    for line in text.splitlines():
        m = _PMIC_LINE.match(line)
        if m:
            (amps if m.group(2) == "A" else volts)[m.group(1)] = float(m.group(3))
    return {rail: (volts[rail], amps[rail]) for rail in sorted(amps) if rail in volts}


class PmicSensor:
    """The Raspberry Pi 5's PMIC through ``vcgencmd pmic_read_adc``: the sum of V x A over its rails.

    The rails feed the SoC, DRAM and I/O; their sum leaves out the PMIC's conversion losses and what the 5 V
    input feeds directly (USB ports, fan), so it is below the power at the USB-C input. Each read runs
    ``vcgencmd`` (a few ms of CPU), so it is polled at most every ``period_s``.
    """

    def __init__(self, command: Sequence[str] = ("vcgencmd", "pmic_read_adc"), period_s: float = 0.05):
        self.command = tuple(command)
        self.period_s = period_s
        self.rails: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        rails = f"{len(self.rails)} rails" if self.rails else "its rails"
        return (f"Raspberry Pi 5 PMIC ({' '.join(self.command)}, sum of V x A over {rails}; excludes conversion "
                "losses and 5 V USB loads)")

    def read_watts(self) -> float | None:
        try:
            out = subprocess.run(self.command, capture_output=True, text=True, timeout=2.0, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        rails = parse_pmic_adc(out.stdout) if out.returncode == 0 else {}
        if not rails:
            return None
        self.rails = tuple(rails)
        return float(sum(v * a for v, a in rails.values()))


def detect_power_source(hwmon_root: str = HWMON_ROOT,
                        pmic_command: Sequence[str] = ("vcgencmd", "pmic_read_adc")) -> PowerSource | None:
    """The first hwmon power sensor, else the Pi 5 PMIC when ``vcgencmd pmic_read_adc`` answers, else None."""
    sensor = find_power_sensor(hwmon_root)
    if sensor is not None:
        return sensor
    pmic = PmicSensor(pmic_command)
    return pmic if pmic.read_watts() is not None else None


# --------------------------------------------------------------------------------------------- CSV trace

_TIME_COLUMNS = ("timestamp", "time", "unix_time", "t")
_WATT_COLUMNS = ("watts", "power_w", "power", "w")
_VOLT_COLUMNS = ("volts", "voltage_v", "voltage", "v")
_AMP_COLUMNS = ("amps", "current_a", "current", "a")


def _column(header: list[str], names: Sequence[str]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def _timestamp(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    when = _dt.datetime.fromisoformat(text.strip())
    if when.tzinfo is None:
        when = when.astimezone()  # a meter logging local time on this machine
    return when.timestamp()


@dataclass(frozen=True)
class PowerTrace:
    """A recorded power trace: ``t`` [N] seconds since the Unix epoch (ascending), ``w`` [N] watts."""

    t: np.ndarray
    w: np.ndarray
    description: str

    @classmethod
    def read_csv(cls, path: str | os.PathLike[str]) -> "PowerTrace":
        """Read a CSV with a header: a time column (``timestamp``/``time``/``unix_time``/``t``: Unix seconds or
        ISO 8601) and either a power column (``watts``/``power_w``/``power``/``w``) or voltage and current
        columns (``volts``/``voltage_v``/``v`` and ``amps``/``current_a``/``a``).

        Raises:
            UsageError: the file cannot be read, lacks the columns, or has rows that are not numbers.
        """
        name = os.fspath(path)
        try:
            with open(name, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.reader(f))
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read power trace {name} ({exc}); pass a CSV file written by your meter") from None
        rows = [r for r in rows if r and any(c.strip() for c in r)]
        if len(rows) < 3:
            raise UsageError(f"power trace {name} has {max(len(rows) - 1, 0)} data rows; it needs a header and at "
                             "least two samples")
        header = rows[0]
        ti, wi = _column(header, _TIME_COLUMNS), _column(header, _WATT_COLUMNS)
        vi, ai = _column(header, _VOLT_COLUMNS), _column(header, _AMP_COLUMNS)
        if ti is None or (wi is None and (vi is None or ai is None)):
            raise UsageError(f"power trace {name} has columns {header}; it needs a time column "
                             f"({'/'.join(_TIME_COLUMNS)}"
                             f") and a power column ({'/'.join(_WATT_COLUMNS)}) or voltage and current columns")
        t, w = [], []
        for line, row in enumerate(rows[1:], start=2):
            try:
                t.append(_timestamp(row[ti]))
                w.append(float(row[wi]) if wi is not None else float(row[vi]) * float(row[ai]))
            except (ValueError, IndexError):
                raise UsageError(f"power trace {name} line {line} is not a time and a number: {row!r:.80}") from None
        ta, wa = np.asarray(t, dtype=np.float64), np.asarray(w, dtype=np.float64)
        if not np.all(np.isfinite(wa)) or np.any(np.diff(ta) <= 0):
            raise UsageError(f"power trace {name} needs finite values and strictly increasing times")
        return cls(ta, wa, f"CSV power trace {os.path.basename(name)} ({len(ta)} samples, median interval "
                           f"{float(np.median(np.diff(ta))) * 1e3:.3g} ms)")
