"""Standard image-classification backbones with torchvision's module names and state_dict keys.

torchvision is not a dependency of edgeexit, yet users hold torchvision weights files
(``torch.save(model.state_dict(), path)``). The architectures here reproduce torchvision's module tree
exactly, so such a file loads with ``load_state_dict(strict=True)``:

==================  ======================================================================
``resnet18``        BasicBlock ResNet (TorchvisionBasicBlock), layers (2, 2, 2, 2)
``resnet50``        Bottleneck ResNet (TorchvisionBottleneck) (v1.5: stride on the 3x3 conv), layers (3, 4, 6, 3)
``vgg11``/``vgg16`` VGG configurations A and D; ``vgg11_bn``/``vgg16_bn`` with BatchNorm
``densenet121``     DenseNet-BC, growth 32, blocks (6, 12, 24, 16)
``mobilenet_v2``    MobileNetV2, width multiplier 1.0 by default
==================  ======================================================================

Options that keep the keys but change shapes (so they only fit weights trained with the same options):
``num_classes``, ``in_channels`` (1 for grey images), ``small_input`` (ResNet: 3x3 stride-1 stem and no
max-pool; MobileNetV2: stride-1 stem; DenseNet: 3x3 stride-1 stem, no pool) and width options for tiny
test networks. Nothing is downloaded: weights come from a file the user names (:func:`load_weights`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgeexit.errors import CheckpointError, UsageError

log = logging.getLogger(__name__)

#: The top-level module where each architecture's feature extractor ends (the rest is the classifier).
FEATURES_END = {"resnet18": "layer4", "resnet50": "layer4", "vgg11": "features", "vgg11_bn": "features",
                "vgg16": "features", "vgg16_bn": "features", "densenet121": "features",
                "mobilenet_v2": "features"}


# ---------------------------------------------------------------------------------------------- ResNet
def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class TorchvisionBasicBlock(nn.Module):
    """torchvision's ResNet basic block: conv1/bn1/relu/conv2/bn2 (+ downsample)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class TorchvisionBottleneck(nn.Module):
    """torchvision's ResNet bottleneck (v1.5): conv1 1x1, conv2 3x3 (stride), conv3 1x1, expansion 4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet module tree: conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc."""

    def __init__(self, block: type[TorchvisionBasicBlock] | type[TorchvisionBottleneck],
                 layers: tuple[int, int, int, int],
                 num_classes: int = 1000, in_channels: int = 3, small_input: bool = False, base_width: int = 64):
        super().__init__()
        self.inplanes = base_width
        if small_input:  # 3x3 stride-1 stem, no max-pool: for 28x28 / 32x32 images
            self.conv1 = nn.Conv2d(in_channels, base_width, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, base_width, layers[0])
        self.layer2 = self._make_layer(block, base_width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base_width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base_width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(base_width * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type[TorchvisionBasicBlock] | type[TorchvisionBottleneck], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)  # [N, C]
        return self.fc(x)


def resnet18(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False,
             base_width: int = 64) -> ResNet:
    """ResNet-18 (torchvision keys: 122 state_dict entries)."""
    return ResNet(TorchvisionBasicBlock, (2, 2, 2, 2), num_classes, in_channels, small_input, base_width)


def resnet50(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False,
             base_width: int = 64) -> ResNet:
    """ResNet-50 (torchvision keys: 320 state_dict entries)."""
    return ResNet(TorchvisionBottleneck, (3, 4, 6, 3), num_classes, in_channels, small_input, base_width)


# ------------------------------------------------------------------------------------------------- VGG
VGG_CONFIGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """torchvision's VGG module tree: features (Sequential), avgpool (7x7), classifier (Sequential 0..6)."""

    def __init__(self, cfg: list[int | str], batch_norm: bool = False, num_classes: int = 1000,
                 in_channels: int = 3, width_div: int = 1, hidden: int = 4096, dropout: float = 0.5,
                 small_input: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        if small_input:  # 28x28 / 32x32 images: no fifth max-pool (it would leave 0x0 of 28x28), 1x1 pooled features
            cfg = cfg[:-1]
        pooled = 1 if small_input else 7
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            cout = int(v) // width_div
            layers.append(nn.Conv2d(cin, cout, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((pooled, pooled))
        self.classifier = nn.Sequential(nn.Linear(cin * pooled * pooled, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
                                        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
                                        nn.Linear(hidden, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)  # [N, C*49] (C with small_input)
        return self.classifier(x)


def _vgg(cfg: str, batch_norm: bool) -> Callable[..., VGG]:
    def build(num_classes: int = 1000, in_channels: int = 3, width_div: int = 1, hidden: int = 4096,
              small_input: bool = False) -> VGG:
        return VGG(VGG_CONFIGS[cfg], batch_norm, num_classes, in_channels, width_div, hidden, small_input=small_input)

    build.__doc__ = f"VGG configuration {cfg}{' with BatchNorm' if batch_norm else ''} (torchvision keys)."
    return build


vgg11, vgg11_bn, vgg16, vgg16_bn = _vgg("A", False), _vgg("A", True), _vgg("D", False), _vgg("D", True)


# -------------------------------------------------------------------------------------------- DenseNet
class _DenseLayer(nn.Module):
    """norm1/relu1/conv1 (1x1 bottleneck) then norm2/relu2/conv2 (3x3, growth_rate channels)."""

    def __init__(self, cin: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x is the concatenation of every earlier feature map of the block (the in-place ReLUs act on the
        # BatchNorm outputs, never on x, which later layers share).
        out = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(out)))


class _DenseBlock(nn.ModuleDict):
    """denselayer1..n; each layer sees the concatenation of the block input and all earlier outputs."""

    def __init__(self, num_layers: int, cin: int, bn_size: int, growth_rate: int):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(cin + i * growth_rate, growth_rate, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.values():
            x = torch.cat([x, layer(x)], 1)  # same channel order as torchvision's cat(features)
        return x


class _Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(cin))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(cin, cout, kernel_size=1, stride=1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNet(nn.Module):
    """torchvision's DenseNet module tree: features (conv0, norm0, relu0, pool0, denseblockN, transitionN,
    norm5) and classifier (Linear)."""

    def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, num_classes: int = 1000, in_channels: int = 3,
                 small_input: bool = False):
        super().__init__()
        if small_input:
            stem = [("conv0", nn.Conv2d(in_channels, num_init_features, 3, 1, 1, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)), ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.Identity())]
        else:
            stem = [("conv0", nn.Conv2d(in_channels, num_init_features, 7, 2, 3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)), ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]
        self.features = nn.Sequential(OrderedDict(stem))
        c = num_init_features
        for i, n in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(n, c, bn_size, growth_rate))
            c += n * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(c, c // 2))
                c //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(c))
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x))
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)  # [N, C]
        return self.classifier(out)


def densenet121(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False,
                growth_rate: int = 32, num_init_features: int = 64) -> DenseNet:
    """DenseNet-121 (torchvision keys: 727 state_dict entries)."""
    return DenseNet(growth_rate, (6, 12, 24, 16), num_init_features, 4, num_classes, in_channels, small_input)


# ----------------------------------------------------------------------------------------- MobileNetV2
def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation with ReLU6: children 0 (conv), 1 (bn), 2 (relu6)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                                   bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """conv = [pw expand (if t != 1)], dw 3x3, pw-linear conv, bn; residual when stride 1 and cin == cout."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNReLU6(cin, hidden, kernel_size=1)] if expand_ratio != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 module tree: features.0..18, classifier (Dropout, Linear)."""

    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3,
                 small_input: bool = False, dropout: float = 0.2):
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(in_channels, cin, stride=1 if small_input else 2)]
        for t, c, n, s in self.SETTING:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, expand_ratio=t))
                cin = cout
        features.append(ConvBNReLU6(cin, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)  # [N, C]
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3,
                 small_input: bool = False) -> MobileNetV2:
    """MobileNetV2 (torchvision keys: 314 state_dict entries)."""
    return MobileNetV2(num_classes, width_mult, in_channels, small_input)


# ------------------------------------------------------------------------------------------ public API
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18, "resnet50": resnet50, "vgg11": vgg11, "vgg11_bn": vgg11_bn, "vgg16": vgg16,
    "vgg16_bn": vgg16_bn, "densenet121": densenet121, "mobilenet_v2": mobilenet_v2,
}


def build_backbone(arch: str, **kwargs: Any) -> nn.Module:
    """Build a zoo architecture by name.

    Args:
        arch: one of :data:`ARCHITECTURES`.
        **kwargs: the architecture's options (num_classes, in_channels, small_input, widths).

    Raises:
        UsageError: unknown architecture or option.
    """
    if arch not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[arch](**kwargs)
    except TypeError as exc:
        raise UsageError(f"architecture {arch!r} does not take these options {sorted(kwargs)} ({exc}); "
                         "see edgeexit/workstation/models/zoo.py for its options") from None


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state_dict or the common {"state_dict": ...} / {"model": ...} wrappers."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state_dict (got {type(obj).__name__}); save weights with "
                              "torch.save(model.state_dict(), path)")
    # nn.DataParallel / torch.compile prefixes
    for prefix in ("module.", "_orig_mod."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming the first missing, unexpected and mis-shaped keys, if any.

    Args:
        model: the network the weights are meant for.
        state: the weights (name -> tensor).
        source: where the weights came from, for the message.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or wrong):
        return
    parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
             f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
             f"{len(wrong)} of another shape, file vs model (e.g. {wrong[0]} {tuple(state[wrong[0]].shape)} vs "
             f"{tuple(own[wrong[0]].shape)})" if wrong else ""]
    raise CheckpointError(f"weights {source} do not fit {type(model).__name__}: keys "
                          f"{', '.join(p for p in parts if p)}; build the network the weights were saved from "
                          "(for zoo architectures: num_classes, in_channels, small_input, width)")


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a torchvision-style weights file into ``model`` strictly.

    Args:
        model: a zoo network (or any module with the same keys).
        path: a file written by ``torch.save(model.state_dict(), path)``.

    Returns:
        ``model``, with the weights loaded.

    Raises:
        CheckpointError: unreadable file, not a state_dict, or keys/shapes that do not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist; pass the path of a torch.save(state_dict) file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or non-weight files
        raise CheckpointError(f"cannot read weights file {path} ({type(exc).__name__}: {str(exc)[:120]}); "
                              "expected a torch.save(model.state_dict()) file") from None
    state = _unwrap_state_dict(obj, path)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
    log.info("loaded %d tensors from %s", len(state), path)
    return model
