"""Run-time budget control: hold an average latency (or energy) per input by moving along the trade-off front.

The controller is told the measured cost of every input (and, when known, the exit it took). From the ratio
of measured to estimated cost it learns how much slower or faster the device runs than when it was tuned
(thermal throttling, other load, a lower clock), predicts what every front point would cost now, and moves
to the most accurate point that fits the target. Hysteresis keeps it from oscillating:

* it moves down only when the current point is predicted (or, with a full window, measured) above
  ``target * (1 + tolerance)``;
* it moves up only to a point predicted at or below ``target * (1 - margin)``;
* after a move it holds for ``hold`` inputs before judging again.

Costs come from the caller, so any clock or power source can drive it (and tests can use a simulated one)::

    ctl = BudgetController.for_runner(runner, target=2.0)          # 2 ms per input on average
    for image in stream:
        result = runner.classify(image)
        ctl.observe(result.latency_ms, result.exit_index)          # switches the runner's thresholds

Energy is held in the kind the front was tuned with (``energy_kind``: measured, board_estimate or proxy, see
:mod:`edgeexit.energy.model`); observe ``result.energy.of(ctl.energy_kind)``. Only the board estimate follows
the latency of each input; measured and proxy figures are per exit, so with them the controller follows the
exit shares alone.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import TuningError, UsageError
from ..runtime.points import OperatingPoint
from .switch import use_operating_point

log = logging.getLogger(__name__)

CONTROL_COSTS = ("latency", "energy")


class BudgetController:
    """Keeps the sliding-window average cost per input near ``target`` by choosing among front points.

    Args:
        points: operating points with estimated costs (a tuned front); sorted and reduced to the Pareto set
            (cost up -> accuracy up) here.
        target: the average cost per input to hold (ms for "latency", mJ for "energy").
        cost: "latency" (``OperatingPoint.est_latency_ms``) or "energy" (``OperatingPoint.energy_mj``).
        exit_costs: [E] estimated cost of an input that leaves at exit i, in the same unit. When given and
            :meth:`observe` gets the exit index, the speed ratio is measured per input (low noise);
            otherwise it is measured against the points' average costs.
        energy_kind: the kind of the points' energy ("measured", "board_estimate", "proxy"); observed costs
            must be of the same kind.
        window: inputs in the sliding window whose average is held.
        hold: inputs to wait after a move before judging again (default: window // 8, at least 4; at least
            window // 2 when inputs come without exit indices, whose speed estimate is noisier).
        tolerance: move down when the cost exceeds ``target * (1 + tolerance)``.
        margin: move up only to points predicted at or below ``target * (1 - margin)``.
        apply: called with the new point on every move (e.g. to switch a Runner's thresholds).
        start: index of the starting point in the sorted front (default: the most accurate one).

    Raises:
        UsageError: bad parameters; TuningError: no point has an estimate of ``cost``.
    """

    def __init__(self, points: Sequence[OperatingPoint], target: float, *, cost: str = "latency",
                 exit_costs: Sequence[float] | None = None, energy_kind: str = "proxy", window: int = 128,
                 hold: int | None = None,
                 tolerance: float = 0.05, margin: float = 0.01,
                 apply: Callable[[OperatingPoint], Any] | None = None, start: int | None = None):
        if cost not in CONTROL_COSTS:
            raise UsageError(f"cost {cost!r} cannot be controlled at run time; expected one of "
                             f"{', '.join(CONTROL_COSTS)}")
        if not (isinstance(target, (int, float)) and np.isfinite(target) and target > 0):
            raise UsageError(f"target must be a positive finite cost per input, got {target!r}")
        if not isinstance(window, int) or window < 2:
            raise UsageError(f"window must be an integer >= 2, got {window!r}")
        if not (0 <= margin < 1 and tolerance >= 0):
            raise UsageError(f"need 0 <= margin < 1 and tolerance >= 0, got margin={margin} tolerance={tolerance}")
        self.cost_kind = cost
        self.energy_kind = energy_kind
        self.points = _pareto([p for p in points if _has_cost(p, cost)], cost)
        if not self.points:
            raise TuningError(f"no operating point has a {cost} estimate; tune the bundle first "
                              "(`edgeexit tune`) so that its front carries estimated costs")
        self.est = np.array([p.cost(cost) for p in self.points], dtype=np.float64)   # [P] ascending
        self.exit_costs = None if exit_costs is None else np.asarray(exit_costs, dtype=np.float64)
        self.target = float(target)
        self.window = window
        self.hold = max(4, window // 8) if hold is None else int(hold)
        self.tolerance, self.margin = float(tolerance), float(margin)
        self.apply = apply
        self.index = len(self.points) - 1 if start is None else int(np.clip(start, 0, len(self.points) - 1))
        self._measured: deque[float] = deque(maxlen=window)   # measured cost per input
        self._expected: deque[float] = deque(maxlen=window)   # what the tuning data predicts for that input
        self._since_move = 0
        self.moves = 0
        if self.apply is not None:
            self.apply(self.point)

    # ---- state ---------------------------------------------------------------------------------------
    @property
    def point(self) -> OperatingPoint:
        """The operating point in use."""
        return self.points[self.index]

    @property
    def window_average(self) -> float | None:
        """Average measured cost over the sliding window (None before the first input)."""
        return float(np.mean(self._measured)) if self._measured else None

    def speed_ratio(self) -> float:
        """Measured / estimated cost over the inputs since the last move (1.0 before any input)."""
        n = min(self._since_move, len(self._measured))
        if n == 0:
            return 1.0
        if self.exit_costs is not None:
            n = min(n, max(self.hold, 1))     # per-input expectations: recent inputs suffice
        measured = sum(list(self._measured)[-n:])
        expected = sum(list(self._expected)[-n:])
        return measured / expected if expected > 0 else 1.0

    def predicted(self, index: int | None = None) -> float:
        """Predicted average cost of a point (default: the current one) at the measured speed ratio."""
        return float(self.est[self.index if index is None else index] * self.speed_ratio())

    # ---- control -------------------------------------------------------------------------------------
    def observe(self, cost: float, exit_index: int | None = None) -> OperatingPoint | None:
        """Record one input's measured cost; move along the front if needed.

        Args:
            cost: the measured cost of the input just classified (ms or mJ).
            exit_index: the exit it left at (improves the speed estimate when ``exit_costs`` is known).

        Returns:
            The new point when the controller moved, else None.

        Raises:
            UsageError: a negative or non-finite cost, or an exit index outside ``exit_costs``.
        """
        if not (isinstance(cost, (int, float, np.floating)) and np.isfinite(cost) and cost >= 0):
            raise UsageError(f"measured cost must be a finite number >= 0, got {cost!r}")
        if self.exit_costs is not None and exit_index is not None:
            if not 0 <= exit_index < self.exit_costs.size:
                raise UsageError(f"exit index {exit_index} is outside 0..{self.exit_costs.size - 1}")
            expected = float(self.exit_costs[exit_index])
        else:
            expected = float(self.est[self.index])
        self._measured.append(float(cost))
        self._expected.append(expected)
        self._since_move += 1
        per_input = self.exit_costs is not None and exit_index is not None
        if self._since_move < (self.hold if per_input else max(self.hold, self.window // 2)):
            return None                                    # without per-input expectations: judge on more inputs
        ratio = self.speed_ratio()
        fits = np.nonzero(self.est * ratio <= self.target * (1.0 - self.margin))[0]
        best = int(fits[-1]) if fits.size else 0
        over = self.target * (1.0 + self.tolerance)
        if self.est[self.index] * ratio > over and best < self.index:
            return self._move(best, ratio)                 # slower than budgeted: down to the best fitting point
        if (self._since_move >= self.window and self.index > 0 and (self.window_average or 0.0) > over
                and self.est[self.index - 1] * ratio < (self.window_average or 0.0)):
            return self._move(self.index - 1, ratio)       # measured over budget for a whole window: one step down
        if best > self.index:
            return self._move(best, ratio)                 # headroom: up to the most accurate fitting point
        return None

    def _move(self, index: int, ratio: float) -> OperatingPoint:
        log.info("budget control: %s %.4g -> point %d/%d (predicted %.4g, target %.4g, speed ratio %.3f)",
                 self.cost_kind, self.window_average or 0.0, index, len(self.points) - 1, self.est[index] * ratio,
                 self.target, ratio)
        self.index = index
        self._since_move = 0
        self.moves += 1
        if self.apply is not None:
            self.apply(self.point)
        return self.point

    @classmethod
    def for_runner(cls, runner: Any, target: float, *, cost: str = "latency", **kwargs: Any) -> "BudgetController":
        """A controller over the front stored in the runner's bundle, switching the runner's thresholds.

        Raises:
            TuningError: the bundle has no tuned front.
        """
        points = runner.manifest.operating_points
        if not points.front:
            raise TuningError("the bundle has no trade-off front; run `edgeexit tune` on it first")
        stored = points.exit_costs
        key = "latency_ms" if cost == "latency" else "energy_mj"
        exit_costs = stored.get(key) if stored is not None else None
        if isinstance(exit_costs, dict):  # measured whole-call costs per rule kind: the front's kind
            exit_costs = exit_costs.get(points.front[0].rule)
        kwargs.setdefault("exit_costs", exit_costs)
        if cost == "energy" and isinstance(stored, dict):
            kwargs.setdefault("energy_kind", stored.get("energy_kind", "proxy"))
        return cls(points.front, target, cost=cost, apply=lambda p: use_operating_point(runner, p), **kwargs)


def _has_cost(point: OperatingPoint, kind: str) -> bool:
    return point.energy_mj is not None if kind == "energy" else point.est_latency_ms > 0


def _pareto(points: Sequence[OperatingPoint], kind: str) -> list[OperatingPoint]:
    """Points sorted by cost, keeping only those more accurate than every cheaper one."""
    out: list[OperatingPoint] = []
    for p in sorted(points, key=lambda q: (q.cost(kind), -q.accuracy)):
        if not out or p.accuracy > out[-1].accuracy:
            out.append(p)
    return out
