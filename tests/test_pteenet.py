"""PTEENet: branches post-trained on a frozen zoo backbone, rebuilt from the spec, converted and run int8."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.workstation

from edgeexit.workstation.posttrain import pteenet
from edgeexit.workstation.models import zoo  # noqa: E402
from edgeexit.workstation.training.train import TrainConfig  # noqa: E402
from edgeexit.datasets import ImageSet  # noqa: E402
from edgeexit.errors import UsageError  # noqa: E402

LABELS = [str(i) for i in range(10)]
DESC = {"arch": "resnet18", "options": {"num_classes": 10, "in_channels": 1, "small_input": True, "base_width": 4}}


def _backbone(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return zoo.build_backbone(DESC["arch"], **DESC["options"]).eval()


def _sets():
    from synthetic import synthetic_digits

    (xt, yt), (xv, yv) = synthetic_digits(192, seed=0), synthetic_digits(64, seed=1)
    return ImageSet(xt, yt, tuple(LABELS), "train"), ImageSet(xv, yv, tuple(LABELS), "val")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_branches_train_and_the_backbone_stays_bit_identical():
    backbone = _backbone()
    before = _state(backbone)
    model = pteenet.attach_branches(backbone, (1, 28, 28), LABELS, exits_after=["layer1", "layer2"],
                                    branch="conv2", backbone_desc=DESC)
    heads_before = _state(model.stages[0].head)
    train_set, val_set = _sets()
    result = pteenet.train_branches(model, train_set, val_set, TrainConfig(loss="v2", lam=0.9, epochs=1,
                                                                          batch_size=64))
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # parameters AND BatchNorm buffers
    assert any(not torch.equal(heads_before[k], v) for k, v in result.model.stages[0].head.state_dict().items())
    assert result.model.spec.extra["backbone_sha256"] == pteenet.backbone_digest(result.model)
    # the branch is PTEENet's: 2 x conv3x3+BN+ReLU, then confidence + classifier
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.stages[0].head.modules()) == 2
    assert model.stages[0].head.has_confidence and not model.stages[-1].head.has_confidence


def test_digest_notices_a_changed_batchnorm_statistic():
    model = pteenet.attach_branches(_backbone(), (1, 28, 28), LABELS, exits_after=["layer2"], backbone_desc=DESC)
    digest = pteenet.backbone_digest(model)
    with torch.no_grad():
        model.stages[1].segment.get_submodule("layer3.0.bn1").running_var[0] += 1e-6
    assert pteenet.backbone_digest(model) != digest


def test_final_exit_is_the_backbone_and_the_spec_rebuilds_the_model():
    from edgeexit.workstation.catalog.registry import BUILDERS

    backbone = _backbone()
    model = pteenet.attach_branches(backbone, (1, 28, 28), LABELS, exits_after=["layer1"], backbone_desc=DESC)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x)[-1]["logits"], backbone(x))
    builder = BUILDERS.get("pteenet", pteenet.build_pteenet)
    rebuilt = builder(**model.spec.kwargs)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    with torch.no_grad():
        for a, b in zip(rebuilt(x), model(x)):
            assert torch.equal(a["logits"], b["logits"])


def test_no_branches_is_the_backbone_alone_and_its_checkpoint_refills_a_zoo_module(tmp_path):
    """exits_after=[] (not None) means no branches: a one-exit model of the whole backbone, e.g. to train a zoo
    network as a plain classifier; its checkpoint rebuilds it and fills a fresh zoo module with the weights."""
    from edgeexit.workstation.catalog.checkpoint import load_checkpoint, save_checkpoint

    backbone = _backbone(seed=3)
    model = pteenet.attach_branches(backbone, (1, 28, 28), LABELS, exits_after=[], backbone_desc=DESC)
    assert model.num_exits == 1
    save_checkpoint(model, tmp_path / "plain.pt")
    fresh = _backbone(seed=4)
    shell = pteenet.attach_branches(fresh, (1, 28, 28), LABELS, exits_after=[], backbone_desc=DESC)
    shell.load_state_dict(load_checkpoint(tmp_path / "plain.pt").state_dict())
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), backbone(x))


def test_placement_by_cost_fraction():
    backbone = _backbone()
    names = pteenet.place_branches(backbone, torch.zeros(1, 1, 28, 28), "layer4", num_exits=3, scheme="linear")
    # first block boundaries where the trunk reaches 1/3 and 2/3 of its MACs (layers cost about the same)
    assert names == ["layer2.0", "layer3"]


def test_bad_arguments_give_one_line_errors():
    with pytest.raises(UsageError, match="logits \\[1, 3\\]"):
        pteenet.attach_branches(_backbone(), (1, 28, 28), ["a", "b", "c"], exits_after=["layer1"])
    with pytest.raises(UsageError, match="unknown branch"):
        pteenet.attach_branches(_backbone(), (1, 28, 28), LABELS, exits_after=["layer1"], branch="conv9")
    # preprocessing that cannot describe the input is refused here, not after a minute of conversion
    with pytest.raises(UsageError, match=r"one value per input channel \(1 for input shape"):
        pteenet.attach_branches(_backbone(), (1, 28, 28), LABELS, exits_after=["layer1"], mean=[0.5] * 3, std=[0.5] * 3)


@pytest.mark.slow
def test_split_zoo_network_converts_and_runs_on_the_device_path(tmp_path):
    pytest.importorskip("onnx2tf")
    from edgeexit.workstation.conversion.pipeline import convert
    from edgeexit.runtime.runner import Runner
    from synthetic import synthetic_digits

    model = pteenet.attach_branches(_backbone(), (1, 28, 28), LABELS, exits_after=["layer2"], branch="conv1",
                                    backbone_desc=DESC)
    calib, _ = synthetic_digits(32, seed=3)
    images, labels = synthetic_digits(40, seed=4)
    report = convert(model, calib, tmp_path / "bundle", verify_images=images, verify_labels=labels,
                     monolithic=False, name="pteenet-test")
    assert len(report.manifest.stages) == 2
    runner = Runner(tmp_path / "bundle", power_sensor=None)
    trace = runner.trace(list(images), labels)
    with torch.no_grad():
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
        float_final = model(x)[-1]["logits"].numpy()
    # the int8 final exit is the frozen backbone: same answers as torch on almost every input
    agree = np.mean(trace.logits[-1].argmax(1) == float_final.argmax(1))
    assert agree >= 0.9
    result = runner(images[0])
    assert result.exit_index in (0, 1) and 0 <= result.label < 10


def test_spatial_branches_see_the_whole_map_and_rebuild_from_their_spec():
    from edgeexit.workstation.catalog.registry import build

    model = pteenet.attach_branches(_backbone(), (1, 28, 28), LABELS, exits_after=["layer1", "layer2"],
                                    branch="spatial", backbone_desc=DESC)
    x = torch.randn(2, 1, 28, 28)
    rebuilt = build(model.spec)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        for a, b in zip(model(x), rebuilt(x)):
            assert torch.equal(a["logits"], b["logits"])


def test_spatial_branch_width_is_recorded_and_rebuilt():
    from edgeexit.workstation.catalog.registry import build

    model = pteenet.attach_branches(_backbone(), (1, 28, 28), LABELS, exits_after=["layer1"], branch="spatial",
                                    hidden=5, backbone_desc=DESC)
    assert model.stages[0].head.body[0].out_channels == 5 and model.spec.kwargs["hidden"] == 5
    rebuilt = build(model.spec)
    rebuilt.load_state_dict(model.state_dict(), strict=True)  # a width mismatch would fail here
    rebuilt.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x)[0]["confidence"], rebuilt(x)[0]["confidence"])
    with pytest.raises(UsageError, match="hidden=5 applies only to whole-map heads"):
        pteenet.attach_branches(_backbone(), (1, 28, 28), LABELS, exits_after=["layer1"], branch="conv1", hidden=5)
