"""Progress reporting: library code calls ``progress(phase, done, total)``; only the CLI draws it, on stderr.

The one mechanism for training epochs, the benchmark's passes and the tuner's trace. Library functions take
``progress: Progress | None`` and never print; the CLI passes a :class:`StderrProgress`.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, Iterator, TypeVar

#: progress(phase, done, total): ``done`` of ``total`` units of ``phase`` are finished.
Progress = Callable[[str, int, int], None]

T = TypeVar("T")


def reporting(items: Iterable[T], total: int, phase: str, progress: Progress | None, every: int = 0) -> Iterator[T]:
    """Yield ``items`` and report every ``every`` items (default: about 100 reports) and at the end."""
    step = every or max(1, total // 100)
    done = 0
    for item in items:
        yield item
        done += 1
        if progress is not None and (done % step == 0 or done == total):
            progress(phase, done, total)


class StderrProgress:
    """Draws progress on stderr: one updating line per phase on a terminal, one line per phase otherwise."""

    def __init__(self, enabled: bool = True, labels: dict[str, str] | None = None, unit: str = "inputs"):
        self.enabled = enabled
        self.labels = labels or {}
        self.unit = unit
        self.tty = sys.stderr.isatty()
        self.phase: str | None = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        label = self.labels.get(phase, phase)
        if self.tty:
            sys.stderr.write(f"\r{label}: {done}/{total}" + ("\n" if done >= total else ""))
            sys.stderr.flush()
        elif phase != self.phase:
            sys.stderr.write(f"{label}: {total} {self.unit} ...\n")
            sys.stderr.flush()
        self.phase = phase
