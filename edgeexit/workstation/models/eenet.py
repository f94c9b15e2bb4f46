"""Backbones cut into early-exit :class:`~edgeexit.workstation.models.staged.StagedModel` objects.

Every builder makes a flat list of trunk *blocks* (conv units or residual blocks), counts their MACs,
places the exits (:mod:`edgeexit.workstation.models.placement`), groups the blocks between exits into ``nn.Sequential``
segments and puts a head after each segment. The resolved builder arguments are stored in
``model.spec.kwargs`` so :func:`edgeexit.workstation.catalog.registry.build` rebuilds the same model from a checkpoint.

Builders (see :data:`edgeexit.workstation.catalog.registry.BUILDERS`):

* ``eenet-small`` -- a plain conv-BN-ReLU CNN for 28x28 grey images (the MNIST default);
* ``eenet-resnet20/32/44/56/110`` -- CIFAR ResNets, 6n+2 layers, widths 16/32/64, 3x3 stem, 1x1-conv shortcuts;
* ``eenet-resnet18/34/50`` -- ImageNet ResNets (7x7 stride-2 stem + max-pool; basic / bottleneck blocks).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from edgeexit.errors import UsageError

from .costs import count_macs
from .heads import EENET_HEAD_KINDS, ClassHead, EENetHead, PlainHead
from .placement import place_exits, validate_cuts
from .staged import ExitHead, ModelSpec, Stage, StagedModel

#: head kinds a builder accepts: EENet kinds, or "class" (class-based sigmoid exits + plain final head).
HEAD_KINDS = EENET_HEAD_KINDS + ("class",)

MNIST_MEAN, MNIST_STD = [0.1307], [0.3081]
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

#: eenet-small default trunk: (out_channels, stride, max-pool after) per conv-BN-ReLU block, and the
#: blocks after which exits 0..N sit (costs in the docstring of build_eenet_small).
EENET_SMALL_LAYERS = [[16, 2, 0], [32, 2, 0], [64, 1, 0], [64, 1, 0], [128, 2, 0], [128, 1, 0]]
EENET_SMALL_CUTS = [1, 2, 4, 5]


class ConvBNReLU(nn.Sequential):
    """conv k x k (no bias) -> BatchNorm -> ReLU [-> 2x2 max-pool]."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, kernel: int = 3, pool: bool = False):
        layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False),
                                   nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


class EENetBasicBlock(nn.Module):
    """The EENet ResNets' basic block: 2 x conv3x3 + identity (or 1x1-conv projection) shortcut (own keys)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class EENetBottleneck(nn.Module):
    """The EENet ResNets' bottleneck: 1x1 reduce, 3x3 (stride), 1x1 expand (x4) + shortcut (own keys)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        out_ch = planes * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


# ------------------------------------------------------------------------------------------- assembly

def _make_head(kind: str, features: torch.Tensor, num_classes: int, final: bool, width: int | None = None) -> ExitHead:
    in_ch, size = int(features.shape[1]), (int(features.shape[2]), int(features.shape[3]))
    if kind == "class":
        return PlainHead(in_ch, num_classes) if final else ClassHead(in_ch, num_classes)
    # EENet: the final exit is a plain EENet head (pool + confidence + classifier) whatever the early kind.
    return EENetHead(in_ch, num_classes, "pool" if final else kind, spatial_size=size, hidden=None if final else width)


def _check_common(num_classes: int, exits: int, head: str, input_shape: Sequence[int], labels: Sequence[str] | None,
                  mean: Sequence[float], std: Sequence[float]) -> list[str]:
    if head not in HEAD_KINDS:
        raise UsageError(f"unknown head kind '{head}'; expected one of {', '.join(HEAD_KINDS)}")
    if not isinstance(exits, int) or exits < 1:
        raise UsageError(f"exits must be an integer >= 1 (the final classifier counts), got {exits!r}")
    if num_classes < 2:
        raise UsageError(f"num_classes must be at least 2, got {num_classes}")
    if len(input_shape) != 3 or len(mean) != input_shape[0] or len(std) != input_shape[0]:
        raise UsageError(f"input_shape {list(input_shape)} (C,H,W) needs one mean/std per channel, got mean "
                         f"{list(mean)} and std {list(std)}")
    if labels is not None and len(labels) != num_classes:
        raise UsageError(f"{len(labels)} labels given for {num_classes} classes; give one label per class")
    return list(labels) if labels is not None else [str(i) for i in range(num_classes)]


def assemble(blocks: Sequence[nn.Module], placement: str | Sequence[int], exits: int, head: str,
             spec: ModelSpec, head_width: int | None = None) -> StagedModel:
    """Group ``blocks`` into segments at the exit positions and attach heads.

    Args:
        blocks: trunk blocks in order; block ``j`` consumes block ``j-1``'s output.
        placement: a scheme name (:data:`edgeexit.workstation.models.placement.SCHEMES`) or explicit block indices.
        exits: number of exits including the final one (when ``placement`` lists indices, their count wins
            and ``spec.kwargs`` is updated to match).
        head: head kind (:data:`HEAD_KINDS`).
        spec: the model's spec (``spec.kwargs`` must already hold the builder arguments).
        head_width: output channels of the early "spatial" heads' whole-map convolution (None: the feature
            map's channels).
    """
    x = torch.zeros(1, *spec.input_shape)
    costs, shapes = [], []
    for block in blocks:
        block.eval()
        macs, x = count_macs(block, x)
        costs.append(macs)
        shapes.append(x)
    if isinstance(placement, str):
        cuts = place_exits(costs, exits, placement)
    else:
        cuts = validate_cuts(placement, len(blocks))
        spec.kwargs.update(placement=cuts, exits=len(cuts))
    stages, start = [], 0
    for i, cut in enumerate(cuts):
        segment = nn.Sequential(*blocks[start:cut + 1])
        stages.append(Stage(segment, _make_head(head, shapes[cut], len(spec.labels), final=i == len(cuts) - 1,
                                                  width=head_width)))
        start = cut + 1
    model = StagedModel(stages, spec)
    model.train()
    return model


def _spec(builder: str, kwargs: dict[str, Any], labels: list[str], mean: Sequence[float], std: Sequence[float]) -> ModelSpec:
    shape = tuple(int(v) for v in kwargs["input_shape"])
    return ModelSpec(builder=builder, kwargs=kwargs, input_shape=shape, labels=labels, mean=[float(m) for m in mean],
                     std=[float(s) for s in std], color_mode="L" if shape[0] == 1 else "RGB")


# ------------------------------------------------------------------------------------------- builders

#: Channels of eenet-small's early "spatial" exit heads (see :func:`build_eenet_small`).
EENET_SMALL_HEAD_WIDTH = 16


def build_eenet_small(num_classes: int = 10, exits: int = 4, placement: str | Sequence[int] | None = None,
                      head: str = "spatial", input_shape: Sequence[int] = (1, 28, 28),
                      layers: Sequence[Sequence[int]] | None = None, labels: Sequence[str] | None = None,
                      mean: Sequence[float] = MNIST_MEAN, std: Sequence[float] = MNIST_STD,
                      head_width: int | None = EENET_SMALL_HEAD_WIDTH) -> StagedModel:
    """The MNIST default: a plain CNN of conv3x3-BN-ReLU blocks with early exits.

    Default trunk (28x28x1 input; MACs per block): 16@14x14 (s2) 28k, 32@7x7 (s2) 226k, 32@7x7 451k
    | 64@7x7 903k | 64@7x7 1.81M, 128@4x4 (s2) 1.18M, 128@4x4 2.36M | 256@2x2 (s2) 1.18M, 256@2x2 2.36M.
    Exits after blocks 2, 3, 6, 8 (``EENET_SMALL_CUTS``) when ``placement`` is None and ``exits`` is 4;
    otherwise ``placement`` is a scheme name or a list of block indices.

    Args:
        num_classes: K.
        exits: exits including the final classifier.
        placement: None (default cuts), a scheme name or block indices.
        head: head kind (:data:`HEAD_KINDS`).
        input_shape: (C, H, W).
        layers: [[out_channels, stride, pool_after], ...] (default :data:`EENET_SMALL_LAYERS`).
        labels, mean, std: class names and per-channel normalisation.
        head_width: channels of the early "spatial" heads' whole-map convolution (None: the feature map's).
            16 keeps the three early heads at 1.7 % of the network's MACs (64/32/128 channels cost 7.9 % and
            make the bundle forced to its last exit measurably slower than the monolithic model).
    """
    labels = _check_common(num_classes, exits, head, input_shape, labels, mean, std)
    if head_width is not None and (not isinstance(head_width, int) or head_width < 1):
        raise UsageError(f"head_width must be a positive integer or None, got {head_width!r}")
    layers = [list(map(int, layer)) for layer in (layers or EENET_SMALL_LAYERS)]
    if placement is None:
        placement = "pareto" if (exits != len(EENET_SMALL_CUTS) or layers != EENET_SMALL_LAYERS) else list(EENET_SMALL_CUTS)
    kwargs = dict(num_classes=num_classes, exits=exits, placement=placement if isinstance(placement, str) else list(placement),
                  head=head, input_shape=list(input_shape), layers=layers, labels=labels, mean=list(mean), std=list(std),
                  head_width=head_width)
    blocks, in_ch = [], int(input_shape[0])
    for out_ch, stride, pool in layers:
        blocks.append(ConvBNReLU(in_ch, out_ch, stride, pool=bool(pool)))
        in_ch = out_ch
    return assemble(blocks, kwargs["placement"], exits, head, _spec("eenet-small", kwargs, labels, mean, std),
                    head_width=head_width)


def build_cifar_resnet(depth: int = 20, num_classes: int = 10, exits: int = 4, placement: str | Sequence[int] = "pareto",
                       head: str = "pool", input_shape: Sequence[int] = (3, 32, 32), base_width: int = 16,
                       labels: Sequence[str] | None = None, mean: Sequence[float] = CIFAR_MEAN,
                       std: Sequence[float] = CIFAR_STD) -> StagedModel:
    """CIFAR ResNet of ``depth`` = 6n+2 layers (20, 32, 44, 56, 110): 3x3 stem, 3 x n basic blocks of widths
    w, 2w, 4w (w = ``base_width``, 16 in the paper). Exits sit after residual blocks (the stem belongs to
    the first block)."""
    labels = _check_common(num_classes, exits, head, input_shape, labels, mean, std)
    if depth < 8 or (depth - 2) % 6:
        raise UsageError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    kwargs = dict(depth=depth, num_classes=num_classes, exits=exits,
                  placement=placement if isinstance(placement, str) else list(placement), head=head,
                  input_shape=list(input_shape), base_width=base_width, labels=labels, mean=list(mean), std=list(std))
    stem = ConvBNReLU(int(input_shape[0]), base_width)
    blocks: list[nn.Module] = []
    in_ch = base_width
    for s, width in enumerate((base_width, 2 * base_width, 4 * base_width)):
        for b in range(n):
            blocks.append(EENetBasicBlock(in_ch, width, 2 if (s > 0 and b == 0) else 1))
            in_ch = width
    blocks[0] = nn.Sequential(stem, blocks[0])
    return assemble(blocks, kwargs["placement"], exits, head, _spec(f"eenet-resnet{depth}", kwargs, labels, mean, std))


IMAGENET_CONFIGS = {18: (EENetBasicBlock, (2, 2, 2, 2)), 34: (EENetBasicBlock, (3, 4, 6, 3)),
                    50: (EENetBottleneck, (3, 4, 6, 3))}


def build_imagenet_resnet(depth: int = 18, num_classes: int = 1000, exits: int = 4,
                          placement: str | Sequence[int] = "pareto", head: str = "pool",
                          input_shape: Sequence[int] = (3, 224, 224), base_width: int = 64,
                          labels: Sequence[str] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD) -> StagedModel:
    """ImageNet ResNet 18/34 (basic blocks) or 50 (bottlenecks): 7x7 stride-2 stem + 3x3 stride-2 max-pool,
    four stages of widths w, 2w, 4w, 8w (w = ``base_width``, 64 in the paper). Exits after residual blocks."""
    labels = _check_common(num_classes, exits, head, input_shape, labels, mean, std)
    if depth not in IMAGENET_CONFIGS:
        raise UsageError(f"ImageNet ResNet depth must be one of {sorted(IMAGENET_CONFIGS)}, got {depth}")
    block_cls, counts = IMAGENET_CONFIGS[depth]
    kwargs = dict(depth=depth, num_classes=num_classes, exits=exits,
                  placement=placement if isinstance(placement, str) else list(placement), head=head,
                  input_shape=list(input_shape), base_width=base_width, labels=labels, mean=list(mean), std=list(std))
    stem = nn.Sequential(nn.Conv2d(int(input_shape[0]), base_width, 7, 2, 3, bias=False), nn.BatchNorm2d(base_width),
                         nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
    blocks: list[nn.Module] = []
    in_ch = base_width
    for s, count in enumerate(counts):
        planes = base_width * 2 ** s
        for b in range(count):
            blocks.append(block_cls(in_ch, planes, 2 if (s > 0 and b == 0) else 1))
            in_ch = planes * block_cls.expansion
    blocks[0] = nn.Sequential(stem, blocks[0])
    return assemble(blocks, kwargs["placement"], exits, head, _spec(f"eenet-resnet{depth}", kwargs, labels, mean, std))
