"""Measured energy: phases integrated over a simulated hwmon sensor, a CSV meter trace and the Pi 5 PMIC text."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeexit.energy.measure import IDLE, Phase, integrate, integrate_windows, measure_phases, run_phases
from edgeexit.energy.sources import (HwmonSensor, PmicSensor, PowerTrace, detect_power_source, find_power_sensor,
                                     parse_pmic_adc)
from edgeexit.errors import UsageError

pytestmark = pytest.mark.runtime  # numpy, Pillow, click and a TFLite interpreter only (device/legacy runs)

IDLE_W = 2.0
LEVELS = {"light": 1.5, "heavy": 3.0}  # W drawn on top of idle while a phase's inputs run
RIPPLE_W, RIPPLE_S = 0.2, 0.037        # a load-independent ripple, so the signal is not flat


class SimulatedBoard:
    """Inputs that make the board draw more; a hwmon ``power1_input`` that a thread updates every 2 ms.

    Every written value and its time are logged: the truth the integrated energy is compared with.
    """

    def __init__(self, root: Path, period_s: float = 0.002):
        self.dir = root / "hwmon0"
        self.dir.mkdir(parents=True)
        (self.dir / "name").write_text("ina260\n")
        (self.dir / "update_interval").write_text(f"{int(period_s * 1e3)}\n")
        self.file = self.dir / "power1_input"
        self.period_s = period_s
        self.level, self.busy_until = 0.0, 0.0
        self.log: list[tuple[float, float]] = []
        self.vanish = False
        self._stop = threading.Event()
        self._write(self.power(time.time()))
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def power(self, now: float) -> float:
        busy = time.perf_counter() < self.busy_until
        return IDLE_W + (self.level if busy else 0.0) + RIPPLE_W * math.sin(2 * math.pi * now / RIPPLE_S)

    def _write(self, watts: float) -> None:
        tmp = self.dir / ".power1_input.tmp"
        tmp.write_text(f"{int(round(watts * 1e6))}\n")
        os.replace(tmp, self.file)  # a sysfs read never sees half a value
        self.log.append((time.time(), int(round(watts * 1e6)) * 1e-6))

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            if self.vanish:
                self.file.unlink()
                return
            self._write(self.power(time.time()))

    def __enter__(self) -> "SimulatedBoard":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()

    def phase(self, name: str) -> Phase:
        def run_one(i: int) -> None:  # one "inference": the board draws more for about 1 ms
            self.level = LEVELS[name]
            self.busy_until = time.perf_counter() + 0.003
            time.sleep(0.001)
        return Phase(name, run_one, 7)

    def injected_j(self, start: float, end: float) -> float:
        """Energy the board drew over [start, end]: each written value holds until the next write."""
        t = np.array([x[0] for x in self.log] + [math.inf])
        w = np.array([x[1] for x in self.log])
        lo, hi = np.maximum(t[:-1], start), np.minimum(t[1:], end)
        return float(np.sum(w * np.clip(hi - lo, 0.0, None)))


def _truth_per_input(board, measurement, name):
    """(total, attributable) mJ per input over the repeats, from the injected log."""
    idle = {w.rep: board.injected_j(w.start, w.end) / (w.end - w.start) for w in measurement.windows
            if w.phase == IDLE}
    total, attributable = [], []
    for w in measurement.windows:
        if w.phase == name:
            joules = board.injected_j(w.start, w.end)
            total.append(1e3 * joules / w.inputs)
            attributable.append(1e3 * (joules - idle[w.rep] * (w.end - w.start)) / w.inputs)
    return float(np.mean(total)), float(np.mean(attributable))


def test_hwmon_phases_integrate_to_the_injected_energy(tmp_path):
    with SimulatedBoard(tmp_path) as board:
        sensor = find_power_sensor(str(tmp_path))
        assert sensor is not None and sensor.period_s == pytest.approx(0.002)
        m = measure_phases(sensor, [board.phase("light"), board.phase("heavy")], reps=3, phase_s=0.4, idle_s=0.4)
    assert m.complete and m.error is None
    assert m.idle_w["mean"] == pytest.approx(IDLE_W, rel=0.05)
    for name, level in LEVELS.items():
        block = m.phases[name]
        total, attributable = _truth_per_input(board, m, name)
        assert block["total_mj"]["mean"] == pytest.approx(total, rel=0.05)
        assert block["attributable_mj"]["mean"] == pytest.approx(attributable, rel=0.05)
        assert block["total_mj"]["n"] == 3 and 0 < block["total_mj"]["ci95"] < math.inf
        # the board drew `level` W more while inputs ran: attributable energy per input ~ level x time per input
        assert block["attributable_mj"]["mean"] == pytest.approx(level * block["per_input_ms"], rel=0.15)
    assert m.phases["heavy"]["attributable_mj"]["mean"] > 1.5 * m.phases["light"]["attributable_mj"]["mean"]


def test_sensor_that_vanishes_gives_an_error_and_a_partial_result(tmp_path):
    def progress(phase, done, total):
        if done == 4:  # the first repeat (idle, light, heavy) and the second idle window are done
            board.vanish = True

    with SimulatedBoard(tmp_path) as board:
        sensor = find_power_sensor(str(tmp_path))
        m = measure_phases(sensor, [board.phase("light"), board.phase("heavy")], reps=4, phase_s=0.3, idle_s=0.3,
                           progress=progress)
    assert not m.complete
    assert "stopped answering" in m.error and "ina260" in m.error and "repeat 2" in m.error
    assert 3 <= len(m.windows) <= 4
    total, _ = _truth_per_input(board, m, "light")
    assert m.phases["light"]["total_mj"]["mean"] == pytest.approx(total, rel=0.05)  # what was measured is right
    assert m.to_dict()["complete"] is False


def _analytic_trace(windows, step_s=0.005):
    """A meter's trace of a known signal: idle power, plus the phase's level inside its windows, plus ripple."""
    t = np.arange(windows[0].start - 1.0, windows[-1].end + 1.0, step_s)
    w = np.full(t.shape, IDLE_W) + RIPPLE_W * np.sin(2 * np.pi * t / 0.5)
    for win in windows:
        if win.phase != IDLE:
            w[(t >= win.start) & (t < win.end)] += LEVELS[win.phase]
    return t, w


def _analytic_j(win):
    ripple = RIPPLE_W * 0.5 / (2 * np.pi) * (np.cos(2 * np.pi * win.start / 0.5) - np.cos(2 * np.pi * win.end / 0.5))
    return (IDLE_W + LEVELS.get(win.phase, 0.0)) * (win.end - win.start) + ripple


def _sleepy(name):
    return Phase(name, lambda i: time.sleep(0.001), 5)


@pytest.mark.parametrize("form", ["unix-watts", "iso-volts-amps"])
def test_csv_trace_joined_by_timestamps(tmp_path, form):
    windows, interrupted = run_phases([_sleepy("light"), _sleepy("heavy")], reps=2, phase_s=0.3, idle_s=0.3)
    assert interrupted is None
    t, w = _analytic_trace(windows)
    path = tmp_path / "meter.csv"
    if form == "unix-watts":
        rows = ["timestamp,watts"] + [f"{a:.6f},{b:.6f}" for a, b in zip(t, w)]
    else:  # ISO times (local, as a meter on this machine writes them), 5.1 V and the current
        import datetime as dt
        iso = [dt.datetime.fromtimestamp(a).isoformat(timespec="microseconds") for a in t]
        rows = ["Time,Voltage_V,Current_A"] + [f"{a},5.1,{b / 5.1:.8f}" for a, b in zip(iso, w)]
    path.write_text("\n".join(rows) + "\n")
    trace = PowerTrace.read_csv(path)
    m = integrate_windows(windows, trace.t, trace.w, trace.description)
    for name in LEVELS:
        runs = [x for x in windows if x.phase == name]
        expected = np.mean([1e3 * _analytic_j(x) / x.inputs for x in runs])
        assert m.phases[name]["total_mj"]["mean"] == pytest.approx(expected, rel=0.01)
        idle = {x.rep: _analytic_j(x) / (x.end - x.start) for x in windows if x.phase == IDLE}
        attributable = np.mean([1e3 * (_analytic_j(x) - idle[x.rep] * (x.end - x.start)) / x.inputs for x in runs])
        assert m.phases[name]["attributable_mj"]["mean"] == pytest.approx(attributable, rel=0.05)


def test_csv_trace_errors_are_one_line_and_say_how_to_fix(tmp_path):
    windows, _ = run_phases([_sleepy("light")], reps=1, phase_s=0.1, idle_s=0.1)
    short = tmp_path / "short.csv"
    short.write_text("timestamp,watts\n" + "".join(f"{windows[0].start + 0.01 * i:.6f},2.0\n" for i in range(5)))
    trace = PowerTrace.read_csv(short)
    with pytest.raises(UsageError, match="do not cover the window"):
        integrate_windows(windows, trace.t, trace.w, trace.description, min_samples=1)
    bad = tmp_path / "bad.csv"
    bad.write_text("when,what\n1,2\n3,4\n")
    with pytest.raises(UsageError, match="needs a time column"):
        PowerTrace.read_csv(bad)
    bad.write_text("timestamp,watts\n1,2\n2,oops\n")
    with pytest.raises(UsageError, match="line 3"):
        PowerTrace.read_csv(bad)
    with pytest.raises(UsageError, match="cannot read power trace"):
        PowerTrace.read_csv(tmp_path / "missing.csv")


def test_confidence_interval_is_the_student_t_interval():
    from edgeexit.energy.measure import _mean_ci

    ci = _mean_ci([1.0, 2.0, 3.0])                     # mean 2, sample sd 1, t(0.975, 2 df) = 4.303
    assert ci["mean"] == 2.0 and ci["ci95"] == pytest.approx(4.303 / math.sqrt(3)) and ci["n"] == 3
    assert _mean_ci([5.0]) == {"mean": 5.0, "ci95": None, "n": 1}  # one repeat: no interval
    many = _mean_ci(list(np.arange(100.0)))           # beyond 30 degrees of freedom: the normal quantile
    assert many["ci95"] == pytest.approx(1.96 * np.std(np.arange(100.0), ddof=1) / 10)


def test_integrate_is_exact_for_linear_power():
    t = np.array([0.0, 1.0, 2.0, 3.0])
    w = np.array([1.0, 2.0, 3.0, 4.0])  # w = 1 + t
    assert integrate(t, w, 0.5, 2.5) == pytest.approx((2.5 + 2.5 ** 2 / 2) - (0.5 + 0.5 ** 2 / 2))


# Output of `vcgencmd pmic_read_adc` on a Raspberry Pi 5 (published by a Pi 5 owner; 12 rails with current and
# voltage, EXT5V_V and BATT_V with voltage only).
PMIC_FIXTURE = Path(__file__).parent / "data" / "pmic_read_adc_pi5.txt"


def test_pmic_text_is_parsed_into_rails():
    rails = parse_pmic_adc(PMIC_FIXTURE.read_text())
    assert len(rails) == 12 and "EXT5V" not in rails and "BATT" not in rails
    assert rails["VDD_CORE"] == pytest.approx((0.90659250, 1.42880000))
    assert rails["3V7_WL_SW"] == pytest.approx((3.71091200, 0.10247270))
    total = sum(v * a for v, a in rails.values())
    assert total == pytest.approx(2.9480, abs=5e-4)  # VDD_CORE alone is 1.295 W of it
    assert parse_pmic_adc("error=1 error_msg=\"Command not registered\"\n") == {}


def test_pmic_sensor_runs_the_command_and_sums_the_rails(tmp_path):
    cmd = (sys.executable, "-c", f"print(open({str(PMIC_FIXTURE)!r}).read())")
    sensor = PmicSensor(cmd)
    assert sensor.read_watts() == pytest.approx(2.9480, abs=5e-4)
    assert "12 rails" in sensor.description
    assert PmicSensor((str(tmp_path / "no-vcgencmd"), "pmic_read_adc")).read_watts() is None
    # hwmon first; the PMIC when no hwmon sensor answers; nothing when neither exists
    assert isinstance(detect_power_source(str(tmp_path / "empty"), cmd), PmicSensor)
    assert detect_power_source(str(tmp_path / "empty"), (str(tmp_path / "none"),)) is None
    (tmp_path / "hw" / "hwmon0").mkdir(parents=True)
    (tmp_path / "hw" / "hwmon0" / "power1_input").write_text("3000000\n")
    assert isinstance(detect_power_source(str(tmp_path / "hw"), cmd), HwmonSensor)


def test_run_phases_refuses_bad_settings():
    with pytest.raises(UsageError, match="reps >= 1"):
        run_phases([_sleepy("light")], reps=0)
    with pytest.raises(UsageError, match="phases with inputs"):
        run_phases([Phase("x", lambda i: None, 0)], reps=1)
