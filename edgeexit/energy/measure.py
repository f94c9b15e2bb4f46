"""Measured energy per input: integrate power over phases of many inputs, never over one inference.

A sensor updates every 1-10 ms (INA2xx) and a read costs tens of microseconds, while an inference takes
0.02-2 ms: per-inference reads cannot measure per-inference energy. Instead a :class:`Sampler` reads the
sensor in a background thread at its update rate while :func:`run_phases` runs *phases*: an idle window,
then each caller-given phase ``(name, run_one, n_inputs)`` over its inputs (cycled until the window lasts at
least ``phase_s``), the whole sequence repeated ``reps`` times with the phase order rotated per repeat.
:func:`integrate_windows` then integrates power over each window (trapezoids, interpolated at the window's
edges):

* **total** energy per input = integral over the window / inputs run;
* **attributable** energy per input = (integral - idle power of that repeat x window length) / inputs;
* each figure is the mean over repeats with a 95 % confidence interval (Student t, reps - 1 degrees of
  freedom; none with one repeat).

A CSV trace recorded by an external meter takes the place of the sampler (:func:`measure_with_trace`): the
windows carry Unix timestamps and are joined with the trace's. If a live sensor stops answering, the run stops
at once and the result keeps every window completed before, marked incomplete, with the reason.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import UsageError
from .sources import PowerSource, PowerTrace

log = logging.getLogger(__name__)

#: Consecutive failed reads after which a live sensor counts as gone.
MAX_FAILED_READS = 3
#: Two-sided 95 % Student t quantiles by degrees of freedom (1..30); 1.96 beyond.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
IDLE = "idle"


@dataclass(frozen=True)
class Phase:
    """A workload to measure: ``run_one(i)`` runs input ``i`` of ``n_inputs``; ``setup()`` (optional) runs
    before each of its windows, outside the window."""

    name: str
    run_one: Callable[[int], None]
    n_inputs: int
    setup: Callable[[], None] | None = None


@dataclass(frozen=True)
class Window:
    """One run of one phase: its time span (Unix seconds) and how many inputs ran in it (0 for idle)."""

    phase: str
    rep: int
    start: float
    end: float
    inputs: int


class Sampler:
    """Reads a live power source in a background thread every ``period_s`` (default: the source's own).

    Samples carry Unix timestamps (``time.time()`` at the read). The thread is a daemon and holds the GIL only
    for the read itself; what it costs is in the idle window too, so the attributable figures exclude it.
    """

    def __init__(self, source: PowerSource, period_s: float | None = None):
        self.source = source
        self.period_s = float(period_s if period_s is not None else source.period_s)
        self._t: list[float] = []
        self._w: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failed_at: float | None = None  # Unix time of the first read of the failing streak

    def __enter__(self) -> "Sampler":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edgeexit-power-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def gone(self) -> bool:
        """True once the source failed ``MAX_FAILED_READS`` reads in a row (the sampler has stopped)."""
        return self.failed_at is not None

    def _loop(self) -> None:
        period, failures, first_failure = self.period_s, 0, 0.0
        next_at = time.perf_counter()
        while not self._stop.is_set():
            now = time.time()
            watts = self.source.read_watts()
            if watts is None:
                failures += 1
                first_failure = first_failure if failures > 1 else now
                if failures >= MAX_FAILED_READS:
                    self.failed_at = first_failure
                    log.warning("power source stopped answering: %s", self.source.description)
                    return
            else:
                failures = 0
                self._t.append(now)
                self._w.append(watts)
            next_at += period
            delay = next_at - time.perf_counter()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.perf_counter()  # fell behind (slow read): do not burst

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        """(t [N] Unix seconds, w [N] watts) read so far."""
        n = min(len(self._t), len(self._w))
        return np.asarray(self._t[:n], dtype=np.float64), np.asarray(self._w[:n], dtype=np.float64)


def integrate(t: np.ndarray, w: np.ndarray, start: float, end: float) -> float:
    """Energy (J) of the piecewise-linear power ``w(t)`` over ``[start, end]``.

    Raises:
        UsageError: the samples do not reach both edges of the window.
    """
    if t.size < 2 or t[0] > start or t[-1] < end:
        have = "no samples" if t.size == 0 else f"samples from {t[0]:.3f} to {t[-1]:.3f}"
        raise UsageError(f"the power samples do not cover the window {start:.3f}-{end:.3f} s ({have}); record the "
                         "trace from before the benchmark starts until after it ends")
    inside = (t > start) & (t < end)
    ts = np.concatenate(([start], t[inside], [end]))
    ws = np.concatenate(([np.interp(start, t, w)], w[inside], [np.interp(end, t, w)]))
    return float(np.sum(0.5 * (ws[1:] + ws[:-1]) * np.diff(ts)))


def run_phases(phases: Sequence[Phase], reps: int, *, phase_s: float = 2.0, idle_s: float = 2.0,
               stop: Callable[[], bool] = lambda: False,
               progress: Callable[[str, int, int], None] | None = None) -> tuple[list[Window], str | None]:
    """Run ``reps`` repeats of: an idle window of ``idle_s``, then every phase (order rotated per repeat).

    Each phase runs its inputs in order, cycling, until at least ``phase_s`` have passed and every input ran
    once. ``stop()`` is asked between inputs; when it answers True the run ends and the window in progress
    is dropped.

    Returns:
        (completed windows, the phase and repeat that was interrupted or None).

    Raises:
        UsageError: bad counts or durations.
    """
    if reps < 1 or phase_s <= 0 or idle_s <= 0 or not phases or any(p.n_inputs < 1 for p in phases):
        raise UsageError(f"need reps >= 1, positive durations and phases with inputs; got reps={reps}, "
                         f"phase_s={phase_s}, idle_s={idle_s}, {len(phases)} phase(s)")
    windows: list[Window] = []
    total = reps * (len(phases) + 1)
    for r in range(reps):
        start = time.time()
        while time.time() - start < idle_s:
            if stop():
                return windows, f"idle, repeat {r + 1}"
            time.sleep(min(0.01, idle_s))
        windows.append(Window(IDLE, r, start, time.time(), 0))
        if progress is not None:
            progress("energy", len(windows), total)
        order = list(phases[r % len(phases):]) + list(phases[:r % len(phases)])
        for phase in order:
            if phase.setup is not None:
                phase.setup()
            count, begin = 0, time.time()
            while count < phase.n_inputs or time.time() - begin < phase_s:
                if stop():
                    return windows, f"{phase.name}, repeat {r + 1}"
                phase.run_one(count % phase.n_inputs)
                count += 1
            windows.append(Window(phase.name, r, begin, time.time(), count))
            if progress is not None:
                progress("energy", len(windows), total)
    return windows, None


def _mean_ci(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    half = None
    if v.size > 1:
        t = _T95[v.size - 2] if v.size - 1 <= len(_T95) else 1.96
        half = float(t * v.std(ddof=1) / math.sqrt(v.size))
    return {"mean": float(v.mean()), "ci95": half, "n": int(v.size)}


@dataclass
class EnergyMeasurement:
    """Measured energy per input of every phase, total and attributable, with 95 % confidence intervals."""

    source: str
    windows: list[Window]
    idle_w: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    complete: bool = True
    error: str | None = None

    def per_input_mj(self, phase: str, attributable: bool = False) -> float | None:
        block = self.phases.get(phase)
        return None if block is None else block["attributable_mj" if attributable else "total_mj"]["mean"]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "measured", "source": self.source, "complete": self.complete, "error": self.error,
                "idle_w": self.idle_w, "phases": self.phases,
                "windows": [{"phase": w.phase, "rep": w.rep, "start": round(w.start, 6), "end": round(w.end, 6),
                             "inputs": w.inputs} for w in self.windows]}


def integrate_windows(windows: Sequence[Window], t: np.ndarray, w: np.ndarray, source: str,
                      min_samples: int = 5) -> EnergyMeasurement:
    """Per-phase energy per input from power samples ``(t, w)`` over ``windows`` (see the module docstring).

    Raises:
        UsageError: a window the samples do not cover, or one with fewer than ``min_samples`` samples in it.
    """
    idle_by_rep: dict[int, float] = {}
    rows: dict[str, list[tuple[float, float, float, int]]] = {}
    for win in windows:
        seconds = win.end - win.start
        inside = int(np.count_nonzero((t >= win.start) & (t <= win.end)))
        if inside < min_samples:
            raise UsageError(f"only {inside} power samples fall in the {seconds:.2f} s window of phase "
                             f"'{win.phase}'; lengthen the phases (--energy-phase-s) or sample faster")
        joules = integrate(t, w, win.start, win.end)
        if win.phase == IDLE:
            idle_by_rep[win.rep] = joules / seconds
        else:
            rows.setdefault(win.phase, []).append((joules, seconds, idle_by_rep.get(win.rep, math.nan), win.inputs))
    phases: dict[str, dict[str, Any]] = {}
    for name, runs in rows.items():
        total = [1e3 * j / n for j, _, _, n in runs]
        attributable = [1e3 * (j - p * s) / n for j, s, p, n in runs if math.isfinite(p)]
        phases[name] = {"total_mj": _mean_ci(total), "attributable_mj": _mean_ci(attributable),
                        "mean_w": float(sum(j for j, *_ in runs) / sum(s for _, s, *_ in runs)),
                        "inputs": int(sum(n for *_, n in runs)), "seconds": float(sum(s for _, s, *_ in runs)),
                        "per_input_ms": float(np.mean([1e3 * s / n for _, s, _, n in runs]))}
    return EnergyMeasurement(source=source, windows=list(windows), idle_w=_mean_ci(list(idle_by_rep.values())),
                             phases=phases)


def measure_phases(source: PowerSource, phases: Sequence[Phase], reps: int = 5, *, phase_s: float = 2.0,
                   idle_s: float = 2.0, period_s: float | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> EnergyMeasurement:
    """Run the phases while a :class:`Sampler` reads ``source``; integrate each window.

    A source that stops answering ends the run: the result holds the windows completed before it went away,
    ``complete`` is False and ``error`` says what happened and where.
    """
    sampler = Sampler(source, period_s)
    with sampler:
        time.sleep(2 * sampler.period_s)  # a sample before the first window starts
        windows, interrupted = run_phases(phases, reps, phase_s=phase_s, idle_s=idle_s,
                                          stop=lambda: sampler.gone, progress=progress)
        time.sleep(2 * sampler.period_s)  # and one after the last ends
    t, w = sampler.samples()
    error = None
    if sampler.gone:
        last = t[-1] if t.size else -math.inf   # windows the samples still cover completely
        windows = [x for x in windows if x.end <= last]
        where = interrupted or "after the last phase"
        error = (f"the power source stopped answering during {where} ({source.description}); measured figures "
                 f"cover the {len(windows)} window(s) completed before")
    result = integrate_windows(windows, t, w, source.description) if windows else \
        EnergyMeasurement(source=source.description, windows=[])
    result.complete, result.error = error is None, error
    return result


def measure_with_trace(trace_path: str, phases: Sequence[Phase], reps: int = 5, *, phase_s: float = 2.0,
                       idle_s: float = 2.0, settle_s: float = 1.0,
                       progress: Callable[[str, int, int], None] | None = None) -> EnergyMeasurement:
    """Run the phases, then read the CSV power trace a meter logged meanwhile and join it by timestamps.

    ``settle_s`` is waited after the last phase so that the meter's software can write its last rows.

    Raises:
        UsageError: an unreadable trace, or one that does not cover the run.
    """
    windows, _ = run_phases(phases, reps, phase_s=phase_s, idle_s=idle_s, progress=progress)
    time.sleep(settle_s)
    trace = PowerTrace.read_csv(trace_path)
    return integrate_windows(windows, trace.t, trace.w, trace.description)
