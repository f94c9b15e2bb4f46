"""Progress reporting: library code calls ``progress(phase, done, total)``; only the CLI draws it, on stderr.

The one mechanism for training epochs, the benchmark's passes and the tuner's trace. Library functions take
``progress: Progress | None`` and never print; the CLI passes a :class:`StderrProgress`.

On a terminal a phase is one updating line with a count, a percentage, the time so far and an ETA (estimated
from the rate so far); written to a file or a pipe, a phase gets a line when it starts, a line with the count and
ETA every :data:`LOG_EVERY_S` seconds while it runs, and a closing line with its duration when it took longer
than :data:`SHORT_S` seconds.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

#: progress(phase, done, total): ``done`` of ``total`` units of ``phase`` are finished.
Progress = Callable[[str, int, int], None]

T = TypeVar("T")

#: Seconds between progress lines when stderr is not a terminal.
LOG_EVERY_S = 10.0
#: Phases shorter than this get no closing line and no ETA (it would flicker).
SHORT_S = 2.0
#: Seconds between redraws of a terminal line.
REDRAW_S = 0.1


def reporting(items: Iterable[T], total: int, phase: str, progress: Progress | None, every: int = 0) -> Iterator[T]:
    """Yield ``items`` and report every ``every`` items (default: about 100 reports) and at the end."""
    step = every or max(1, total // 100)
    done = 0
    for item in items:
        yield item
        done += 1
        if progress is not None and (done % step == 0 or done == total):
            progress(phase, done, total)


def duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class StderrProgress:
    """Draws progress on stderr: one updating line per phase on a terminal (count, %, elapsed, ETA), periodic
    lines otherwise."""

    def __init__(self, enabled: bool = True, labels: dict[str, str] | None = None, unit: str = "inputs",
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 units: dict[str, str] | None = None):
        self.enabled = enabled
        self.labels = labels or {}
        self.unit = unit
        self.units = units or {}  # per phase, where it counts something else than ``unit``
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.clock = clock
        self.phase: str | None = None
        self.started = 0.0
        self.last_draw = -1e9
        self.open_line = False

    def status(self, done: int, total: int) -> str:
        """``"120/5000 (2%), 4 s, ETA 2 min 41 s"`` (no ETA before a phase has run :data:`SHORT_S` / 4 s)."""
        elapsed = self.clock() - self.started
        text = f"{done}/{total}" + (f" ({100 * done // total}%)" if total > 0 else "")
        if elapsed >= SHORT_S / 4 and 0 < done < total:
            text += f", {duration(elapsed)}, ETA {duration(elapsed * (total - done) / done)}"
        elif done >= total and elapsed >= SHORT_S:
            text += f", done in {duration(elapsed)}"
        return text

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        label = self.labels.get(phase, phase)
        if phase != self.phase:
            self._close()
            self.phase, self.started, self.last_draw = phase, now, -1e9
            if not self.tty:
                self._write(f"{label}: {total} {self.units.get(phase, self.unit)} ...\n")
                self.last_draw = now
        finished = done >= total
        if self.tty:
            if finished or now - self.last_draw >= REDRAW_S:
                self._write(f"\r\x1b[K{label}: {self.status(done, total)}" + ("\n" if finished else ""))
                self.open_line = not finished
                self.last_draw = now
        elif finished:
            if now - self.started >= SHORT_S:
                self._write(f"{label}: {self.status(done, total)}\n")
        elif now - self.last_draw >= LOG_EVERY_S:
            self._write(f"{label}: {self.status(done, total)}\n")
            self.last_draw = now
        if finished:
            self.phase = None

    def _close(self) -> None:
        if self.open_line:  # a phase that ended without its final report: keep its last line
            self._write("\n")
            self.open_line = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
