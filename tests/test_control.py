"""Budget control at run time: a simulated board that throttles, and the controller holding its target."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_tune import COSTS, synthetic_trace  # noqa: E402

from edgeexit.tuning.control import BudgetController  # noqa: E402
from edgeexit.errors import TuningError, UsageError  # noqa: E402
from edgeexit.runtime.rules import RULES  # noqa: E402
from edgeexit.tuning.results import Target
from edgeexit.tuning.search import search_front  # noqa: E402

STAGE_MS = np.array([0.1, 0.12, 0.15, 0.2])  # the simulated board's per-stage latency before throttling


class SimulatedBoard:
    """A deterministic clock: an input costs the sum of its stages' latencies, times a throttle factor.

    Inputs are drawn (seeded) from a trace; which exit each one takes under each front point is
    precomputed with the exit rule itself.
    """

    def __init__(self, trace, front, seed: int = 1):
        self.exits = [RULES[p.rule](p.thresholds).simulate(trace)[0] for p in front]  # per point: [N] exits
        self.index = len(front) - 1
        self.throttle = 1.0
        self.rng = np.random.default_rng(seed)
        self.n = trace.num_inputs
        self.points = list(front)

    def apply(self, point) -> None:
        self.index = self.points.index(point)

    def classify(self) -> tuple[float, int]:
        exit_index = int(self.exits[self.index][self.rng.integers(0, self.n)])
        return float(np.sum(STAGE_MS[:exit_index + 1]) * self.throttle), exit_index


@pytest.fixture(scope="module")
def front():
    trace = synthetic_trace(n=4000)
    return trace, search_front(trace, COSTS, "confidence", Target(budget_latency_ms=0.3)).front


def _run(ctl, board, n, averages):
    for _ in range(n):
        cost, exit_index = board.classify()
        ctl.observe(cost, exit_index)
        averages.append(ctl.window_average)


def test_throttling_is_absorbed_within_a_bounded_number_of_inputs(front):
    trace, points = front
    target, window = 0.35, 2048
    board = SimulatedBoard(trace, points)
    ctl = BudgetController(points, target, exit_costs=np.cumsum(STAGE_MS), window=window, apply=board.apply)
    averages: list[float] = []
    _run(ctl, board, 4000, averages)
    settled = np.abs(np.asarray(averages[window + 500:]) / target - 1)
    assert settled.max() <= 0.05                      # holds the target before the step
    accurate_before = ctl.point.accuracy
    moves_before = ctl.moves

    board.throttle = 2.0                              # the board throttles: every stage takes twice as long
    after: list[float] = []
    _run(ctl, board, 8000, after)
    rel = np.abs(np.asarray(after) / target - 1)
    bound = window + 4 * ctl.hold                     # window flush plus a few decisions
    assert rel[bound:].max() <= 0.05                  # back within 5 % and held
    assert ctl.point.accuracy < accurate_before       # it paid for the budget with accuracy
    assert ctl.moves - moves_before <= 4              # no oscillation

    board.throttle = 1.0                              # cooled down: headroom -> back to the accurate point
    _run(ctl, board, 4000, after)
    assert ctl.point.accuracy == pytest.approx(accurate_before)


def test_constant_speed_does_not_oscillate(front):
    trace, points = front
    board = SimulatedBoard(trace, points, seed=3)
    ctl = BudgetController(points, 0.3, exit_costs=np.cumsum(STAGE_MS), window=1024, apply=board.apply)
    _run(ctl, board, 6000, [])
    assert ctl.moves <= 3


def test_without_exit_indices_it_still_converges(front):
    trace, points = front
    board = SimulatedBoard(trace, points, seed=5)
    ctl = BudgetController(points, 0.35, window=1024, apply=board.apply)
    averages: list[float] = []
    board.throttle = 1.5
    for _ in range(6000):
        cost, _ = board.classify()
        ctl.observe(cost)
        averages.append(ctl.window_average)
    assert np.abs(np.asarray(averages[3000:]) / 0.35 - 1).max() <= 0.06
    assert ctl.moves <= 12


def test_bad_parameters(front):
    _, points = front
    with pytest.raises(UsageError, match="target"):
        BudgetController(points, 0.0)
    with pytest.raises(UsageError, match="cost"):
        BudgetController(points, 1.0, cost="macs")
    ctl = BudgetController(points, 1.0, exit_costs=np.cumsum(STAGE_MS))
    with pytest.raises(UsageError, match="finite"):
        ctl.observe(float("nan"))
    with pytest.raises(UsageError, match="exit index 7"):
        ctl.observe(1.0, 7)
    with pytest.raises(TuningError, match="no operating point"):
        BudgetController([p.__class__(**{**p.__dict__, "energy_mj": None}) for p in points], 1.0, cost="energy")


def test_controller_drives_a_runner(tiny_bundle_copy, tiny_data, tmp_path):
    from edgeexit.runtime.runner import Runner
    from edgeexit.tuning.tune import tune_bundle

    images, labels = tiny_data
    np.savez(tmp_path / "val.npz", images=images, labels=labels)
    tune_bundle(tiny_bundle_copy, str(tmp_path / "val.npz"), Target(max_drop_pp=1.0), rule="max_softmax")
    runner = Runner(tiny_bundle_copy, power_sensor=None)
    ctl = BudgetController.for_runner(runner, target=1e-6, window=16, hold=4)  # unreachable: the cheapest point
    for image in images[:64]:
        r = runner.classify(image)
        ctl.observe(r.latency_ms, r.exit_index)
    assert ctl.index == 0
    assert tuple(runner.rule.thresholds) == ctl.points[0].thresholds
