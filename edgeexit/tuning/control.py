"""Run-time budget control: hold an average latency (or energy) per input by moving along the trade-off front.

The controller is told the measured cost of every input (and, when known, the exit it took). It models an
input's cost as ``speed x bias[exit] x cost[exit]``: ``cost`` is the stored per-exit estimate, ``bias`` a
per-exit correction learned over the last few windows of inputs at each exit (the board's exits need not
scale alike), ``speed`` the factor
by which the board runs slower or faster now (thermal throttling, other load, a lower clock), estimated on
the recent inputs. A front point's cost is then predicted from its tuned exit shares, times the ratio of the
exit mix seen at the current point to its tuned mix when the two differ by more than ``2 z`` standard errors
(harder or easier data than the tuning set; tested at every input, hence the wider bound).

Every prediction carries a relative standard error (of the speed, of the exits' learned biases and, when
used, of the exit mix, from the inputs they were estimated on), and the controller moves only on evidence. With ``se`` the larger of that
error and the relative standard error of the window's mean cost (noise a user sees in the average anyway):

* down when the current point's predicted cost is above ``target * (1 + tolerance)`` by more than ``z se``,
  to the most accurate point predicted below ``target * (1 - margin)`` by ``z`` prediction errors (the
  cheapest if none);
* up to that point when the current point's predicted cost is below ``target * (1 - margin)`` by more than
  ``z se`` (a dead band around the target as wide as the noise of the window's average) and the new point
  is predicted to cost more than the current one by more than ``z`` of its prediction errors (a move the
  predictions cannot tell from staying is not worth making);
* never sooner than ``hold`` inputs after the previous move.

A speed change larger than ``2 z`` standard errors of the mean of the last ``hold`` inputs (a throttling step)
restarts the speed estimate from the inputs after its most likely place in that block, so a step is followed
within a few dozen inputs; smaller changes are followed by the sliding ``window``. Noise of the size the
standard errors predict moves nothing, and a point measured over budget is not chosen again at the same speed
(the biases of its exits have been learned).

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
            :meth:`observe` gets the exit index, the speed is measured per input against its exit's cost (low
            noise) and each exit's bias is learned; otherwise the speed is measured against the current
            point's average cost.
        energy_kind: the kind of the points' energy ("measured", "board_estimate", "proxy"); observed costs
            must be of the same kind.
        window: inputs over which the speed and the exit mix are estimated (and ``window_average`` taken).
        hold: inputs to wait after a move before judging again, and the block a speed step is detected on
            (default: window // 8, at least 4; at least window // 2 when inputs come without exit indices,
            whose speed estimate is noisier).
        tolerance: move down only when the current point's cost is above ``target * (1 + tolerance)`` (by
            ``z`` standard errors).
        margin: move up only to points whose cost is below ``target * (1 - margin)`` (by ``z`` standard errors).
        z: standard errors a cost must lie beyond a limit before the controller acts on it.
        apply: called with the new point on every move (e.g. to switch a Runner's thresholds).
        start: index of the starting point in the sorted front (default: the most accurate one).

    Raises:
        UsageError: bad parameters; TuningError: no point has an estimate of ``cost``.
    """

    def __init__(self, points: Sequence[OperatingPoint], target: float, *, cost: str = "latency",
                 exit_costs: Sequence[float] | None = None, energy_kind: str = "proxy", window: int = 1024,
                 hold: int | None = None, tolerance: float = 0.0, margin: float = 0.0, z: float = 2.0,
                 apply: Callable[[OperatingPoint], Any] | None = None, start: int | None = None):
        if cost not in CONTROL_COSTS:
            raise UsageError(f"cost {cost!r} cannot be controlled at run time; expected one of "
                             f"{', '.join(CONTROL_COSTS)}")
        if not (isinstance(target, (int, float)) and np.isfinite(target) and target > 0):
            raise UsageError(f"target must be a positive finite cost per input, got {target!r}")
        if not isinstance(window, int) or window < 2:
            raise UsageError(f"window must be an integer >= 2, got {window!r}")
        if not (0 <= margin < 1 and tolerance >= 0 and z >= 0):
            raise UsageError(f"need 0 <= margin < 1, tolerance >= 0 and z >= 0, got margin={margin} "
                             f"tolerance={tolerance} z={z}")
        self.cost_kind = cost
        self.energy_kind = energy_kind
        self.points = _pareto([p for p in points if _has_cost(p, cost)], cost)
        if not self.points:
            raise TuningError(f"no operating point has a {cost} estimate; tune the bundle first "
                              "(`edgeexit tune`) so that its front carries estimated costs")
        self.est = np.array([p.cost(cost) for p in self.points], dtype=np.float64)   # [P] ascending
        self.exit_costs = None if exit_costs is None else np.asarray(exit_costs, dtype=np.float64)
        if self.exit_costs is not None and not (self.exit_costs.ndim == 1 and np.all(self.exit_costs > 0)
                                                and np.all(np.isfinite(self.exit_costs))):
            raise UsageError(f"exit_costs must be positive finite costs, one per exit, got {list(self.exit_costs)}")
        self.target = float(target)
        self.window = window
        self.hold = max(4, window // 8) if hold is None else max(1, int(hold))
        self.tolerance, self.margin, self.z = float(tolerance), float(margin), float(z)
        self.apply = apply
        self.index = len(self.points) - 1 if start is None else int(np.clip(start, 0, len(self.points) - 1))
        self._fractions = self._exit_fractions()                  # [P, E] tuned exit shares (NaN rows: unknown)
        e = 0 if self.exit_costs is None else self.exit_costs.size
        self._bias_sum, self._bias_sq, self._bias_n = np.zeros(e), np.zeros(e), np.zeros(e)  # of cost / speed
        self._bias = np.ones(e)                                  # [E] learned cost / estimated cost, at speed 1
        self._speed = _Window(window)                            # cost / expected cost per input
        self._recent = _Window(self.hold)                        # the same over the last `hold` inputs
        self._mix = _Window(window)                              # expected cost (speed 1) of inputs since the move
        self._costs = _Window(window)                            # measured cost per input
        self._since_move = 0
        self._per_input = False                                  # the last input came with its exit index
        self.moves = 0
        if self.apply is not None:
            self.apply(self.point)

    def _exit_fractions(self) -> np.ndarray:
        e = 0 if self.exit_costs is None else self.exit_costs.size
        out = np.full((len(self.points), e), np.nan)
        for j, p in enumerate(self.points):
            if e and len(p.exit_fractions) == e:
                out[j] = p.exit_fractions
        return out

    # ---- state ---------------------------------------------------------------------------------------
    @property
    def point(self) -> OperatingPoint:
        """The operating point in use."""
        return self.points[self.index]

    @property
    def window_average(self) -> float | None:
        """Average measured cost over the last ``window`` inputs (None before the first input)."""
        return self._costs.mean() if len(self._costs) else None

    def speed_ratio(self) -> float:
        """How much slower (> 1) or faster the board runs than its learned per-exit costs (1.0 before any input)."""
        return self._speed.mean() if len(self._speed) else 1.0

    def predicted(self, index: int | None = None) -> float:
        """Predicted average cost of a point (default: the current one) at the measured speed and exit mix."""
        return float(self._predict()[0][self.index if index is None else index])

    def _predict(self) -> tuple[np.ndarray, float, np.ndarray]:
        """[P] predicted cost of every point; the relative standard error of the current point's prediction
        (speed, exit mix) and [P] those of every point's (plus the error of its exits' learned biases)."""
        s = self.speed_ratio()
        rel = self._speed.sem() / s if len(self._speed) >= 2 and s > 0 else np.inf
        if self.exit_costs is None or not self._per_input:
            return self.est * s, rel, np.full(self.est.size, rel)
        unit = self.exit_costs * self._bias                                    # [E] cost at speed 1
        f = self._fractions
        known = ~np.isnan(f[:, 0])
        scale = np.full(len(self.points), self._mean_bias())
        scale[known] = (f[known] @ unit) / (f[known] @ self.exit_costs)
        tuned_mix = float(f[self.index] @ unit) if known[self.index] else np.nan
        mix = 1.0
        if np.isfinite(tuned_mix) and len(self._mix) >= 2:
            seen, sem = self._mix.mean() / tuned_mix, self._mix.sem() / tuned_mix
            if abs(seen - 1.0) > 2 * self.z * sem:      # the exit mix is not the tuned one: harder / easier data
                mix, rel = seen, float(np.hypot(rel, sem / seen))
        n = self._bias_n
        with np.errstate(divide="ignore", invalid="ignore"):
            var = (self._bias_sq - self._bias_sum ** 2 / n) / (n - 1)           # [E] of cost / speed
            err = np.where(n >= 2, np.sqrt(np.maximum(var, 0.0) / n) * n / self._bias_sum, 1.0)  # [E] relative
        bias_rel = np.zeros(len(self.points))
        bias_rel[known] = np.sqrt((f[known] * unit * err) ** 2 @ np.ones(unit.size)) / (f[known] @ unit)
        return self.est * scale * mix * s, rel, np.hypot(rel, bias_rel)

    def _mean_bias(self) -> float:
        n = self._bias_n.sum()
        return float(self._bias_n @ self._bias / n) if n else 1.0

    # ---- control -------------------------------------------------------------------------------------
    def observe(self, cost: float, exit_index: int | None = None) -> OperatingPoint | None:
        """Record one input's measured cost; move along the front if the evidence says so.

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
        cost = float(cost)
        per_input = self.exit_costs is not None and exit_index is not None
        if per_input:
            if not 0 <= exit_index < self.exit_costs.size:
                raise UsageError(f"exit index {exit_index} is outside 0..{self.exit_costs.size - 1}")
            expected = float(self.exit_costs[exit_index] * self._bias[exit_index])
            self._mix.add(expected)
        else:
            expected = float(self.est[self.index])
        self._per_input = per_input
        self._costs.add(cost)
        ratio = cost / expected
        self._speed.add(ratio)
        self._recent.add(ratio)
        self._since_move += 1
        if len(self._recent) == self.hold and len(self._speed) > self.hold:
            step = abs(self._recent.mean() - self._speed.mean())
            noise = self._speed.sem() * np.sqrt(len(self._speed) / self.hold)  # the block's SE, from the window's SD
            if step > 2 * self.z * noise:                                       # a speed step: restart after it
                after = _after_change(list(self._recent.values))
                self._speed.restart(after)
                self._recent.restart(after)
        if per_input and len(self._speed) >= self.hold:                        # speed settled: learn the bias
            self._learn_bias(exit_index, cost)
        if self._since_move < (self.hold if per_input else max(self.hold, self.window // 2)):
            return None
        predicted, rel, rel_points = self._predict()
        fits = np.nonzero(predicted * (1.0 + self.z * rel_points) <= self.target * (1.0 - self.margin))[0]
        best = int(fits[-1]) if fits.size else 0
        band = self.z * max(rel_points[self.index], self._costs.sem() / max(self._costs.mean(), 1e-300))
        current = predicted[self.index]
        if current * (1.0 - band) > self.target * (1.0 + self.tolerance) and best < self.index:
            return self._move(best, predicted)             # over budget beyond the window's noise: down
        if (current * (1.0 + band) < self.target * (1.0 - self.margin) and best > self.index
                and predicted[best] > current * (1.0 + self.z * rel_points[best])):
            return self._move(best, predicted)             # under budget beyond the window's noise: up
        return None

    def _learn_bias(self, k: int, cost: float) -> None:
        x = cost / self.speed_ratio()
        keep = 1.0 - 1.0 / (4 * self.window)           # forget the first guesses (learned while the speed settled)
        self._bias_sum[k] = self._bias_sum[k] * keep + x
        self._bias_sq[k] = self._bias_sq[k] * keep + x * x
        self._bias_n[k] = self._bias_n[k] * keep + 1
        seen = self._bias_n > 0
        self._bias[seen] = self._bias_sum[seen] / (self._bias_n[seen] * self.exit_costs[seen])
        self._bias[~seen] = self._mean_bias()                # exits not seen yet: the average bias

    def _move(self, index: int, predicted: np.ndarray) -> OperatingPoint:
        log.info("budget control: %s %.4g -> point %d/%d (predicted %.4g, target %.4g, speed ratio %.3f)",
                 self.cost_kind, self.window_average or 0.0, index, len(self.points) - 1, predicted[index],
                 self.target, self.speed_ratio())
        self.index = index
        self._since_move = 0
        self._mix.restart(())
        if not self._per_input:        # without exit indices the speed is measured against the point's cost
            self._speed.restart(())
            self._recent.restart(())
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


def _after_change(values: list[float]) -> list[float]:
    """The values after the most likely place of a single change of mean (the split with the largest
    standardised difference of the two means)."""
    x = np.asarray(values, dtype=np.float64)                 # [n]
    n = x.size
    t = np.arange(1, n)                                      # split before index t
    head = np.cumsum(x)[:-1]                                 # sums of x[:t]
    diff = (x.sum() - head) / (n - t) - head / t
    best = int(t[np.argmax(np.abs(diff) * np.sqrt(t * (n - t) / n))])
    return values[best:]


class _Window:
    """Mean and standard error of the last ``size`` values, O(1) per value."""

    __slots__ = ("values", "_sum", "_sq")

    def __init__(self, size: int):
        self.values: deque[float] = deque(maxlen=size)
        self._sum = self._sq = 0.0

    def __len__(self) -> int:
        return len(self.values)

    def add(self, x: float) -> None:
        v = self.values
        if len(v) == v.maxlen:
            old = v[0]
            self._sum -= old
            self._sq -= old * old
        v.append(x)
        self._sum += x
        self._sq += x * x

    def restart(self, values: Any) -> None:
        """Keep only ``values`` (sums recomputed, so rounding does not accumulate)."""
        kept = list(values)
        self.values.clear()
        self._sum = self._sq = 0.0
        for x in kept:
            self.add(x)

    def mean(self) -> float:
        return self._sum / len(self.values)

    def sem(self) -> float:
        """Standard error of the mean (inf below two values)."""
        n = len(self.values)
        if n < 2:
            return float("inf")
        var = max(self._sq - self._sum * self._sum / n, 0.0) / (n - 1)
        return float(np.sqrt(var / n))
