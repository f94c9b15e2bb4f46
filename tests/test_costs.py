"""MAC counts against hand counts and torch's FlopCounterMode; placement schemes."""

import pytest

pytest.importorskip("torch")  # workstation-only tests: skipped in the device environments
pytestmark = pytest.mark.workstation
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgeexit.workstation.models.costs import count_macs, model_costs
from edgeexit.workstation.models.heads import EENetHead, PlainHead
from edgeexit.workstation.models.placement import place_exits, target_fractions
from edgeexit.workstation.catalog.registry import create
from edgeexit.workstation.models.staged import ModelSpec, Stage, StagedModel
from edgeexit.errors import UsageError


def _tiny() -> StagedModel:
    spec = ModelSpec("tiny", {}, (1, 8, 8), ["a", "b", "c"], [0.0], [1.0])
    s0 = Stage(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()), PlainHead(4, 3))
    s1 = Stage(nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)), EENetHead(8, 3))
    return StagedModel([s0, s1], spec)


def test_costs_match_hand_count():
    c = model_costs(_tiny())
    # conv 1->4 3x3 on 8x8: 4*8*8 outputs * 1*9 = 2304; head Linear(4,3) = 12
    # conv 4->8 3x3 s2 -> 4x4: 8*4*4 * 4*9 = 4608; EENet head: Linear(8,1) + Linear(8,3) = 32
    assert c.segment_macs == (2304, 4608)
    assert c.head_macs == (12, 32)
    assert c.full_macs == 2304 + 4608 + 32
    assert c.kappa() == pytest.approx([(2304 + 12) / 6944, 1.0])
    assert c.cumulative() == pytest.approx([(2304 + 12) / 6944, (2304 + 12 + 4608 + 32) / 6944])
    assert c.segment_params == (4 * 9 + 4, 8 * 4 * 9 + 8 + 16)


@pytest.mark.parametrize("name,kwargs", [
    ("eenet-small", {}),
    ("eenet-resnet20", {"exits": 3}),
    ("eenet-resnet18", {"input_shape": [3, 64, 64], "num_classes": 10, "base_width": 16}),
    ("eenet-resnet50", {"input_shape": [3, 64, 64], "num_classes": 10, "base_width": 8, "head": "conv1"}),
], ids=["eenet-small", "eenet-resnet20", "eenet-resnet18", "eenet-resnet50-conv-heads"])
def test_costs_agree_with_flop_counter(name, kwargs):
    model = create(name, **kwargs).eval()
    costs = model_costs(model)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(model.example_input(1))
    assert fc.get_total_flops() // 2 == sum(costs.segment_macs) + sum(costs.head_macs)
    # and the monolithic network (no early heads) is exactly full_macs
    macs, _ = count_macs(nn.Sequential(*[s.segment for s in model.stages]), model.example_input(1))
    assert macs + costs.head_macs[-1] == costs.full_macs


def test_full_macs_of_the_mnist_default():
    # eenet-small on 28x28x1, 10 classes (`edgeexit train` on MNIST): every segment + the whole final head
    costs = model_costs(create("eenet-small", num_classes=10, input_shape=[1, 28, 28]))
    assert sum(costs.segment_macs) == 6_502_464 and costs.head_macs[-1] == 1_408
    assert costs.full_macs == 6_503_872
    assert costs.kappa()[-1] == 1.0 and costs.cumulative()[-1] > 1.0  # early heads are paid for on top


def test_count_macs_divides_by_batch():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    single, _ = count_macs(conv, torch.zeros(1, 3, 6, 6))
    batched, _ = count_macs(conv, torch.zeros(4, 3, 6, 6))
    assert single == batched == 5 * 36 * 27


@pytest.mark.parametrize("scheme,expected", [
    ("linear", [2, 4, 7, 9]),      # targets 2.5, 5, 7.5 of 10
    ("pareto", [1, 3, 4, 9]),      # 2, 3.6, 4.88
    ("fine", [0, 1, 2, 9]),        # 0.5, 0.975, 1.43 -> collisions move to the next block
    ("gold_ratio", [2, 3, 6, 9]),  # 2.36, 3.82, 6.18
])
def test_placement_schemes_on_equal_blocks(scheme, expected):
    assert place_exits([1] * 10, 4, scheme) == expected


def test_placement_fractions_and_errors():
    assert target_fractions(3, "pareto") == pytest.approx([0.2, 0.36])
    assert target_fractions(1, "fine") == []
    assert place_exits([5, 1, 1, 1], 2, "linear") == [0, 3]  # the first block already holds half the cost
    with pytest.raises(UsageError, match="unknown placement scheme"):
        place_exits([1] * 4, 2, "random")
    with pytest.raises(UsageError, match="need at least 5 blocks"):
        place_exits([1] * 4, 5, "linear")


def test_resnet_placement_puts_exits_near_targets():
    model = create("eenet-resnet56", exits=4, placement="linear")
    kappa = model_costs(model).kappa()
    assert len(kappa) == 4 and kappa[-1] == 1.0
    for k, target in zip(kappa[:-1], (0.25, 0.5, 0.75)):
        assert target <= k < target + 0.08  # the first residual block at or past the target
