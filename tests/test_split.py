"""torchvision-compatible zoo networks and cutting networks into stages at named submodules."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.workstation

from edgeexit.workstation.models.costs import count_macs  # noqa: E402
from edgeexit.workstation.own import split  # noqa: E402
from edgeexit.workstation.models import zoo  # noqa: E402
from edgeexit.errors import CheckpointError, UsageError  # noqa: E402

# torchvision's state_dict of each architecture: number of entries, parameters at 1000 classes (published
# model-card numbers), and a few exact key names.
TORCHVISION_KEYS = {
    "resnet18": (122, 11_689_512, ["conv1.weight", "layer1.0.bn2.running_var", "layer2.0.downsample.0.weight",
                                   "layer4.1.conv2.weight", "fc.bias"]),
    "resnet50": (320, 25_557_032, ["layer1.0.conv3.weight", "layer3.5.bn3.num_batches_tracked",
                                   "layer4.0.downsample.1.running_mean", "fc.weight"]),
    "vgg11": (22, 132_863_336, ["features.0.weight", "features.18.bias", "classifier.0.weight",
                                "classifier.6.bias"]),
    "vgg11_bn": (62, 132_868_840, ["features.1.running_mean", "features.26.weight", "classifier.3.weight"]),
    "vgg16": (32, 138_357_544, ["features.28.weight", "classifier.6.weight"]),
    "vgg16_bn": (97, 138_365_992, ["features.40.weight", "features.41.num_batches_tracked"]),
    "densenet121": (727, 7_978_856, ["features.conv0.weight", "features.denseblock1.denselayer1.norm1.weight",
                                     "features.transition3.conv.weight",
                                     "features.denseblock4.denselayer16.conv2.weight", "features.norm5.running_var",
                                     "classifier.weight"]),
    "mobilenet_v2": (314, 3_504_872, ["features.0.0.weight", "features.1.conv.0.0.weight",
                                      "features.1.conv.2.running_mean", "features.2.conv.3.bias",
                                      "features.18.1.weight", "classifier.1.weight"]),
}

# tiny variants (same keys) that run in milliseconds on 32x32 inputs
TINY = {
    "resnet18": dict(small_input=True, base_width=4),
    "resnet50": dict(small_input=True, base_width=4),
    "vgg11_bn": dict(width_div=16, hidden=16),
    "vgg16": dict(width_div=16, hidden=16),
    "densenet121": dict(small_input=True, growth_rate=4, num_init_features=8),
    "mobilenet_v2": dict(width_mult=0.25, small_input=True),
}
CUTS = {
    "resnet18": (["layer1", "layer2.1", "layer3"], "layer4"),
    "resnet50": (["layer1.2", "layer3"], "layer4"),
    "vgg11_bn": (["features.3", "features.14"], "features"),
    "vgg16": (["features.4", "features.16"], "features"),
    "densenet121": (["features.transition1", "features.denseblock3"], "features"),
    "mobilenet_v2": (["features.3", "features.10"], "features"),
}


@pytest.mark.parametrize("arch", list(TORCHVISION_KEYS), ids=list(TORCHVISION_KEYS))
def test_zoo_matches_torchvision_state_dict(arch):
    count, params, names = TORCHVISION_KEYS[arch]
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        model = zoo.build_backbone(arch)
    keys = list(model.state_dict())
    assert len(keys) == count
    assert sum(p.numel() for p in model.parameters()) == params
    for name in names:
        assert name in keys


@pytest.mark.parametrize("arch", list(TINY), ids=list(TINY))
def test_split_reproduces_the_network_exactly(arch):
    torch.manual_seed(0)
    model = zoo.build_backbone(arch, num_classes=7, **TINY[arch]).eval()
    x = torch.randn(2, 3, 32, 32)
    exits, end = CUTS[arch]
    pieces = split.split_module(model, exits, end)
    assert len(pieces) == len(exits) + 2
    with torch.no_grad():
        y = x
        for piece in pieces:
            y = piece(y)
        assert torch.equal(y, model(x))


def test_split_finds_features_end_and_builds_a_staged_model():
    from edgeexit.workstation.models.heads import PlainHead
    from edgeexit.workstation.models.staged import ModelSpec

    torch.manual_seed(0)
    model = zoo.resnet18(num_classes=5, small_input=True, base_width=4).eval()
    x = torch.randn(1, 3, 32, 32)
    pieces = split.split_module(model, ["layer2"], example_input=x)  # features end found: layer4
    staged = split.staged_from_split(pieces, [PlainHead(8, 5)],
                                     ModelSpec("test", {}, (3, 32, 32), list("abcde"), [0.5] * 3, [0.5] * 3, "RGB"))
    with torch.no_grad():
        outs = staged(x)
    assert len(outs) == 2 and torch.equal(outs[-1]["logits"], model(x))
    assert not staged.stages[-1].head.has_confidence


def test_bad_split_point_lists_valid_names():
    with pytest.raises(UsageError) as err:
        split.split_module(zoo.resnet18(base_width=4), ["layer9"], "layer4")
    msg = str(err.value)
    assert "'layer9'" in msg and "layer1, layer1.0, layer1.1, layer2" in msg and "\n" not in msg


def test_cut_crossed_by_a_skip_connection_is_refused():
    with pytest.raises(UsageError, match="skip connection"):
        split.split_module(zoo.resnet18(base_width=4), ["layer1.0.bn1"], "layer4")


def test_exit_points_out_of_order_are_refused():
    with pytest.raises(UsageError, match="execution order"):
        split.split_module(zoo.resnet18(base_width=4), ["layer2", "layer1"], "layer4")


def test_cut_points_count_macs_up_to_each_cut():
    model = zoo.resnet18(num_classes=10, small_input=True, base_width=4).eval()
    x = torch.zeros(1, 3, 32, 32)
    points = {p.name: p for p in split.cut_points(model, x)}
    assert points["layer1"].shape == (1, 4, 32, 32)
    assert 0 < points["layer1"].macs_before < points["layer2"].macs_before < points["layer4"].macs_before
    assert count_macs(model, x)[0] == points["layer4"].macs_before + 32 * 10  # + the fc layer


def test_weights_file_round_trip_and_mismatch(tmp_path):
    src = zoo.resnet18(num_classes=10, base_width=4)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    dst = zoo.load_weights(zoo.resnet18(num_classes=10, base_width=4), path)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    with pytest.raises(CheckpointError) as err:
        zoo.load_weights(zoo.resnet18(num_classes=7, base_width=4), path)
    assert "fc.weight (10, 32) vs (7, 32)" in str(err.value) and "\n" not in str(err.value)
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="missing"):
        zoo.load_weights(zoo.resnet18(base_width=4), path)
