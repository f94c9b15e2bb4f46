"""EENet and class-based losses against numbers computed by hand."""

import math

import pytest

pytest.importorskip("torch")  # workstation-only tests: skipped in the device environments
pytestmark = pytest.mark.workstation
import torch

from edgeexit.workstation.training.losses import class_based_loss, eenet_loss
from edgeexit.errors import UsageError


def _two_exits(labels):
    """Exit 0: p = [0.8, 0.2], c = 0.75; exit 1 (final): p = [0.6, 0.4]; kappa = [0.25, 1]."""
    n = len(labels)
    p0 = torch.log(torch.tensor([[0.8, 0.2]] * n))
    p1 = torch.log(torch.tensor([[0.6, 0.4]] * n))
    conf = torch.full((n, 1), math.log(3.0))  # sigmoid(ln 3) = 0.75
    return [{"logits": p0, "confidence": conf}, {"logits": p1, "confidence": torch.zeros(n, 1)}], torch.tensor(labels)


# By hand, label 0: Y_1 = 0.6, K_1 = 1; Y_0 = 0.75*0.8 + 0.25*0.6 = 0.75, K_0 = 0.75*0.25 + 0.25*1 = 0.4375.
# Label 1: Y_0 = 0.75*0.2 + 0.25*0.4 = 0.25, Y_1 = 0.4.
CASES = [
    ("v0", [0], 1.0, -math.log(0.8) - math.log(0.6)),                       # 0.733969
    ("v1", [0], 2.0, -math.log(0.75) + 2 * 0.4375),                         # 1.162682
    ("v2", [0], 2.0, (-math.log(0.75) + 2 * 0.4375) + (-math.log(0.6) + 2 * 1.0)),  # 3.673508
    ("v1", [0, 1], 2.0, (-math.log(0.75) - math.log(0.25)) / 2 + 2 * 0.4375),      # 1.711988
    ("v2", [0, 1], 0.0, (-math.log(0.75) - math.log(0.25)) / 2 + (-math.log(0.6) - math.log(0.4)) / 2),
]


@pytest.mark.parametrize("version,labels,lam,expected", CASES, ids=[f"{c[0]}-n{len(c[1])}-lam{c[2]}" for c in CASES])
def test_eenet_loss_matches_hand_computation(version, labels, lam, expected):
    outputs, target = _two_exits(labels)
    loss = eenet_loss(outputs, target, kappa=[0.25, 1.0], version=version, lam=lam)
    assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_eenet_v2_three_exits_by_hand():
    # exit 0: p=[0.5,0.5], c=0.5; exit 1: p=[0.9,0.1], c=0.75; exit 2: p=[0.2,0.8]; kappa=[0.1,0.4,1]; y=0
    outputs = [
        {"logits": torch.log(torch.tensor([[0.5, 0.5]])), "confidence": torch.zeros(1, 1)},
        {"logits": torch.log(torch.tensor([[0.9, 0.1]])), "confidence": torch.full((1, 1), math.log(3.0))},
        {"logits": torch.log(torch.tensor([[0.2, 0.8]])), "confidence": torch.zeros(1, 1)},
    ]
    y2, k2 = 0.2, 1.0
    y1, k1 = 0.75 * 0.9 + 0.25 * y2, 0.75 * 0.4 + 0.25 * k2      # 0.725, 0.55
    y0, k0 = 0.5 * 0.5 + 0.5 * y1, 0.5 * 0.1 + 0.5 * k1          # 0.6125, 0.325
    expected = sum(-math.log(y) + 0.9 * k for y, k in ((y0, k0), (y1, k1), (y2, k2)))
    loss = eenet_loss(outputs, torch.tensor([0]), kappa=[0.1, 0.4, 1.0], version="v2", lam=0.9)
    assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_cost_term_pushes_confidence_up_when_early_exit_is_right():
    outputs, target = _two_exits([0])
    conf = outputs[0]["confidence"].clone().requires_grad_(True)
    outputs[0]["confidence"] = conf
    eenet_loss(outputs, target, [0.25, 1.0], "v2", lam=1.0).backward()
    assert float(conf.grad) < 0  # gradient descent raises the confidence of a cheap, correct exit


def test_class_based_loss_by_hand():
    # early exit logits [0, 0], label 0 -> one-hot [1, 0]; pos_weight 4:
    # BCE elements: -4*ln(0.5) and -ln(0.5), mean = 2.5*ln 2; final CE of [0, 0] = ln 2; w_0 = 0.5
    outputs = [{"logits": torch.zeros(1, 2)}, {"logits": torch.zeros(1, 2)}]
    loss = class_based_loss(outputs, torch.tensor([0]), weights=[0.5], pos_weight=4.0)
    assert float(loss) == pytest.approx(math.log(2) + 0.5 * 2.5 * math.log(2), abs=1e-6)


def test_losses_reject_bad_inputs():
    outputs, target = _two_exits([0])
    with pytest.raises(UsageError, match="unknown EENet loss"):
        eenet_loss(outputs, target, [0.25, 1.0], version="v9")
    with pytest.raises(UsageError, match="one kappa per exit"):
        eenet_loss(outputs, target, [1.0], version="v2")
    no_conf = [{"logits": outputs[0]["logits"]}, outputs[1]]
    with pytest.raises(UsageError, match="no confidence"):
        eenet_loss(no_conf, target, [0.25, 1.0], version="v2")
