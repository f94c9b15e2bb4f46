"""Exit heads: what sits on a backbone feature map and answers "which class, and how sure".

Three kinds, all ending in a global average pool over H and W (``mean(dim=(2, 3))``: one MEAN op after
conversion, no reshapes of NCHW data):

* :class:`EENetHead` -- EENet / PTEENet exit: optional BatchNorm or 1-3 x [conv3x3 + BN + ReLU], pool,
  then two separate linear layers: ``confidence`` [N, 1] (pre-sigmoid logit) and ``logits`` [N, K].
  Kind ``spatial`` replaces the pooling by a convolution whose kernel covers the whole feature map
  (conv HxW + BN + ReLU -> [N, C', 1, 1]): a linear layer over the flattened map that keeps *where* a
  feature fired (shallow exits on small images need that), exported without any reshape of NCHW data.
* :class:`ClassHead` -- class-based early exit: pool + one linear layer of K independent per-class logits
  (scores = sigmoid), no confidence. :class:`SpatialClassHead` is its whole-map variant (the "spatial"
  convolution above, then the K per-class logits); :func:`class_head` builds either kind.
* :class:`PlainHead` -- pool + linear softmax logits, no confidence (a plain final classifier).
"""

from __future__ import annotations

import torch
from torch import nn

from edgeexit.errors import UsageError

from .staged import ExitHead

#: EENetHead kinds: "pool" (pool only), "bnpool" (BatchNorm then pool), "convN" (N conv blocks then pool),
#: "spatial" (a whole-map convolution instead of pooling; needs the feature map size).
EENET_HEAD_KINDS = ("pool", "bnpool", "conv1", "conv2", "conv3", "spatial")

#: Class-exit kinds: "pool" (:class:`ClassHead`) or "spatial" (:class:`SpatialClassHead`).
CLASS_HEAD_KINDS = ("pool", "spatial")


def _global_pool(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))  # [N, C, H, W] -> [N, C]


def _conv_bn_relu(ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True))


def check_hidden(hidden: int | None) -> None:
    """Raise a one-line UsageError unless ``hidden`` (a spatial head's width) is None or a positive integer."""
    if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
        raise UsageError(f"hidden (the spatial head's width) must be a positive integer or None, got {hidden!r}; "
                         "e.g. hidden=16")


def _whole_map_conv(in_ch: int, hidden: int, spatial_size: tuple[int, int] | None, what: str) -> nn.Sequential:
    """conv with a kernel the size of the feature map + BN + ReLU: [N, in_ch, H, W] -> [N, hidden, 1, 1]."""
    if spatial_size is None:
        raise UsageError(f"{what} kind 'spatial' needs the feature map size (spatial_size=(H, W))")
    return nn.Sequential(nn.Conv2d(in_ch, hidden, tuple(int(v) for v in spatial_size), bias=False),
                         nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))


class EENetHead(ExitHead):
    """EENet exit block: [BN | conv blocks] -> global average pool -> (confidence, classifier).

    Args:
        in_ch: channels of the feature map it reads.
        num_classes: K.
        kind: one of :data:`EENET_HEAD_KINDS`.
        spatial_size: (H, W) of the feature map; required by kind "spatial".
        hidden: output channels of the "spatial" convolution (default in_ch).
    """

    scores = "softmax"
    has_confidence = True

    def __init__(self, in_ch: int, num_classes: int, kind: str = "pool", spatial_size: tuple[int, int] | None = None,
                 hidden: int | None = None):
        super().__init__()
        if kind not in EENET_HEAD_KINDS:
            raise UsageError(f"unknown EENet head kind '{kind}'; expected one of {', '.join(EENET_HEAD_KINDS)}")
        self.kind = kind
        pooled_ch = in_ch
        if kind == "spatial":
            check_hidden(hidden)
            pooled_ch = int(hidden or in_ch)
            self.body: nn.Module = _whole_map_conv(in_ch, pooled_ch, spatial_size, "EENet head")
        elif kind == "bnpool":
            self.body = nn.BatchNorm2d(in_ch)
        elif kind.startswith("conv"):
            self.body = nn.Sequential(*[_conv_bn_relu(in_ch) for _ in range(int(kind[4:]))])
        else:
            self.body = nn.Identity()
        self.confidence = nn.Linear(pooled_ch, 1)
        self.classifier = nn.Linear(pooled_ch, num_classes)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = _global_pool(self.body(features))  # [N, C] (kind "spatial": mean of a 1x1 map)
        return {"logits": self.classifier(pooled), "confidence": self.confidence(pooled)}  # [N,K], [N,1]


class PlainHead(ExitHead):
    """A plain classifier: global average pool + Linear(C, K) softmax logits, no confidence."""

    scores = "softmax"
    has_confidence = False

    def __init__(self, in_ch: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.classifier(_global_pool(features))}  # [N, K]


class ClassHead(PlainHead):
    """Class-based exit: the same pool + Linear(C, K), read as one independent sigmoid logit per class."""

    scores = "sigmoid"


class SpatialClassHead(ClassHead):
    """Class exit reading the whole feature map: conv HxW -> BN -> ReLU -> Linear(hidden, K) sigmoid logits.

    A pooled :class:`ClassHead` on the early maps of a narrow network sees only C globally averaged numbers;
    this head keeps every position (a linear map of the whole feature map to ``hidden`` units) for a few %
    of the network's MACs. The 1x1 result is "pooled" by a mean, as in :class:`EENetHead` (no reshapes).

    Args:
        in_ch: channels of the feature map it reads.
        num_classes: K.
        spatial_size: (H, W) of the feature map.
        hidden: output channels of the whole-map convolution (default in_ch).
    """

    def __init__(self, in_ch: int, num_classes: int, spatial_size: tuple[int, int] | None,
                 hidden: int | None = None):
        check_hidden(hidden)
        width = int(hidden or in_ch)
        super().__init__(width, num_classes)
        self.body = _whole_map_conv(in_ch, width, spatial_size, "class head")

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.classifier(_global_pool(self.body(features)))}  # [N, K]


def class_head(in_ch: int, num_classes: int, kind: str = "pool", spatial_size: tuple[int, int] | None = None,
               hidden: int | None = None) -> ClassHead:
    """A class exit of ``kind`` ("pool" or "spatial", see :data:`CLASS_HEAD_KINDS`).

    Raises:
        UsageError: an unknown kind, ``hidden`` given to a "pool" head, or a bad ``hidden``.
    """
    if kind not in CLASS_HEAD_KINDS:
        raise UsageError(f"unknown class head kind '{kind}'; expected one of {', '.join(CLASS_HEAD_KINDS)}")
    if kind == "pool":
        if hidden is not None:
            raise UsageError(f"hidden={hidden!r} applies only to class head kind 'spatial', got kind 'pool'; "
                             "drop hidden or use kind 'spatial'")
        return ClassHead(in_ch, num_classes)
    return SpatialClassHead(in_ch, num_classes, spatial_size, hidden)
