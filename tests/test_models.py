"""Builders, heads and the registry: shapes, exits, specs that rebuild their model."""

import pytest

pytest.importorskip("torch")  # workstation-only tests: skipped in the device environments
pytestmark = pytest.mark.workstation
import torch

from edgeexit.workstation.models.costs import model_costs
from edgeexit.workstation.models.heads import ClassHead, EENetHead, PlainHead
from edgeexit.workstation.catalog.registry import BUILDERS, build, create
from edgeexit.workstation.models.staged import MonolithicExport, StageExport
from edgeexit.errors import UsageError

SMALL = {
    "eenet-small": {},
    "eenet-resnet20": {"exits": 3},
    "eenet-resnet32": {"exits": 4, "placement": "fine", "base_width": 4},
    "eenet-resnet44": {"exits": 2, "placement": "linear", "base_width": 4},
    "eenet-resnet56": {"exits": 3, "placement": "gold_ratio", "base_width": 4},
    "eenet-resnet110": {"exits": 3, "base_width": 2, "head": "class"},
    "eenet-resnet18": {"input_shape": [3, 64, 64], "num_classes": 5, "base_width": 8},
    "eenet-resnet34": {"input_shape": [3, 32, 32], "num_classes": 5, "base_width": 4, "head": "bnpool"},
    "eenet-resnet50": {"input_shape": [3, 32, 32], "num_classes": 5, "base_width": 4, "head": "conv2"},
}


def test_every_registered_model_is_covered():
    assert set(SMALL) == set(BUILDERS) - {"pteenet"}  # PTEENet has its own tests


@pytest.mark.parametrize("name", list(SMALL))
def test_builders_give_staged_models_that_rebuild_from_their_spec(name):
    model = create(name, **SMALL[name]).eval()
    x = torch.randn(2, *model.spec.input_shape)
    outs = model(x)
    k = model.num_classes
    assert len(outs) == model.num_exits == model.spec.kwargs["exits"]
    for i, (stage, out) in enumerate(zip(model.stages, outs)):
        assert out["logits"].shape == (2, k)
        if stage.head.has_confidence:
            assert out["confidence"].shape == (2, 1)
    assert torch.equal(MonolithicExport(model)(x), outs[-1]["logits"])
    twin = build(model.spec)
    twin.load_state_dict(model.state_dict())  # same architecture, parameter for parameter
    twin.eval()
    torch.testing.assert_close(twin(x)[-1]["logits"], outs[-1]["logits"], rtol=0, atol=0)


def test_class_head_models_use_sigmoid_exits_and_a_plain_final_head():
    model = create("eenet-resnet20", exits=3, head="class", base_width=4)
    assert [type(s.head) for s in model.stages] == [ClassHead, ClassHead, PlainHead]
    assert model.stages[0].head.scores == "sigmoid" and not model.stages[0].head.has_confidence


@pytest.mark.parametrize("kind", ["pool", "bnpool", "conv1", "conv3", "spatial"])
def test_eenet_head_kinds(kind):
    head = EENetHead(8, 4, kind, spatial_size=(5, 5)).eval()
    out = head(torch.randn(3, 8, 5, 5))
    assert out["logits"].shape == (3, 4) and out["confidence"].shape == (3, 1)


def test_stage_export_is_nhwc_at_the_hand_off():
    model = create("eenet-small").eval()
    x = model.example_input(1)
    f0, l0, c0 = StageExport(model.stages[0], first=True)(x)
    f1, l1, c1 = StageExport(model.stages[1], first=False)(f0)
    ref = model(x)
    assert f0.shape == (1, 7, 7, 32)  # NHWC: channels last
    torch.testing.assert_close(l1, ref[1]["logits"])
    torch.testing.assert_close(c0, ref[0]["confidence"])


def test_mnist_default_costs_suit_early_exit():
    costs = model_costs(create("eenet-small"))
    assert 5e6 <= costs.full_macs <= 20e6          # big enough that compute dominates per-stage overhead
    assert costs.cumulative()[0] <= 0.10           # the first exit is cheap
    assert len(costs.segment_macs) == 4
    # the early heads are what a bundle forced to its last exit pays on top of the monolithic network
    assert sum(costs.head_macs[:-1]) <= 0.02 * costs.full_macs
    wide = model_costs(create("eenet-small", head_width=None))
    assert sum(wide.head_macs[:-1]) > 4 * sum(costs.head_macs[:-1])


@pytest.mark.parametrize("call,match", [
    (lambda: create("vgg16"), "unknown model 'vgg16'; expected one of eenet-small, eenet-resnet20"),
    (lambda: create("eenet-small", head="fancy"), "unknown head kind"),
    (lambda: create("eenet-small", exits=9), "need at least 9 blocks"),
    (lambda: create("eenet-small", placement=[3, 1]), "strictly increasing"),
    (lambda: create("eenet-resnet20", num_classes=3, labels=["a"]), "one label per class"),
    (lambda: create("eenet-small", head_width=0), "head_width must be a positive integer"),
], ids=["model", "head", "exits", "cuts", "labels", "head_width"])
def test_builder_errors(call, match):
    with pytest.raises(UsageError, match=match):
        call()


def test_explicit_cuts_fix_the_number_of_exits():
    model = create("eenet-small", placement=[1, 3])
    assert model.num_exits == 3 and model.spec.kwargs["placement"] == [1, 3, 5]
    assert build(model.spec).num_exits == 3


def test_a_checkpoint_that_names_an_old_resnet_id_still_loads(tmp_path):
    """The EENet ResNets were renamed resnetN -> eenet-resnetN (resnet18/50 also name torchvision layouts); checkpoints
    trained before store the old id as their builder and must rebuild the same network."""
    from edgeexit.workstation.catalog.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

    model = create("eenet-resnet20", exits=3, base_width=4).eval()
    assert model.spec.builder == "eenet-resnet20"
    model.spec.builder = "resnet20"  # what a checkpoint written before the rename holds
    save_checkpoint(model, tmp_path / "old.pt")
    assert read_checkpoint(tmp_path / "old.pt")["spec"]["builder"] == "resnet20"
    loaded = load_checkpoint(tmp_path / "old.pt").eval()
    x = torch.randn(2, *model.spec.input_shape)
    torch.testing.assert_close(loaded(x)[-1]["logits"], model(x)[-1]["logits"], rtol=0, atol=0)
    assert [type(s.segment) for s in loaded.stages] == [type(s.segment) for s in model.stages]


def test_train_names_the_new_id_of_a_renamed_model():
    from edgeexit.workstation.cli.train import TRAINABLE, run_training
    from edgeexit.workstation.training.train import TrainConfig

    assert "resnet18" not in TRAINABLE and "eenet-resnet18" in TRAINABLE
    with pytest.raises(UsageError) as err:
        run_training("resnet18", "mnist", TrainConfig())
    assert str(err.value) == ("model 'resnet18' is now called 'eenet-resnet18' (an EENet ResNet); a torchvision-layout "
                              "resnet18 with post-trained exits is 'edgeexit post-train --backbone resnet18'")
