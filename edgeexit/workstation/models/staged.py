"""The one staged-model representation used by training, conversion, tests and benchmarks.

An early-exit network is an ordered list of :class:`Stage` objects. Stage ``i`` is a backbone
``segment`` (feature map in, feature map out, NCHW) followed by its exit ``head`` (feature map in,
``{"logits": [N, K], "confidence": [N, 1]}`` out; ``confidence`` is the pre-sigmoid logit and is absent
for heads that have none). The converter cuts any :class:`StagedModel` into one file per stage without
knowing its architecture::

    x ──segment0──► f0 ──segment1──► f1 ── ... ──segmentN──► fN
                     │                │                       │
                   head0            head1                   headN   (headN = the final classifier)

Models carry a JSON-able ``spec`` (builder name + arguments, input shape, preprocessing, labels) so a
checkpoint alone rebuilds them; see :mod:`edgeexit.workstation.catalog.checkpoint` and :mod:`edgeexit.workstation.catalog.registry`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn

#: Keys a head may return.
HEAD_OUTPUTS = ("logits", "confidence")


class ExitHead(nn.Module):
    """Base class of exit heads.

    Subclasses set ``scores`` to "softmax" (mutually exclusive classes) or "sigmoid" (one independent
    score per class, as in *Early Classification for Dynamic Inference of Neural Networks*) and return a dict
    with "logits" and,
    optionally, "confidence" (the pre-sigmoid confidence logit).
    """

    scores: str = "softmax"
    has_confidence: bool = False

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model and to preprocess its inputs; stored in checkpoints."""

    builder: str                       # registry name, e.g. "eenet-small", "eenet-resnet20", "pteenet"
    kwargs: dict[str, Any]             # JSON-able builder arguments
    input_shape: tuple[int, int, int]  # (C, H, W) as the network sees it
    labels: list[str]
    mean: list[float]
    std: list[float]
    color_mode: str = "L"              # "L" or "RGB"
    extra: dict[str, Any] = field(default_factory=dict)  # method info: loss, lambda, betas, thresholds...

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)


class Stage(nn.Module):
    """A backbone segment followed by its exit head."""

    def __init__(self, segment: nn.Module, head: ExitHead):
        super().__init__()
        self.segment = segment
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features = self.segment(x)
        return features, self.head(features)


class StagedModel(nn.Module):
    """An early-exit network as an ordered list of stages.

    ``forward(x)`` runs every stage and returns one output dict per exit (training, evaluation).
    ``forward_until(x, k)`` stops after stage ``k``.
    """

    def __init__(self, stages: Sequence[Stage], spec: ModelSpec):
        super().__init__()
        if not stages:
            raise ValueError("a StagedModel needs at least one stage")
        self.stages = nn.ModuleList(stages)
        self.spec = spec

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    @property
    def num_classes(self) -> int:
        return len(self.spec.labels)

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        outs = []
        for stage in self.stages:
            x, out = stage(x)
            outs.append(out)
        return outs

    def iter_stages(self, x: torch.Tensor) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Yield (features, head outputs) stage by stage."""
        for stage in self.stages:
            x, out = stage(x)
            yield x, out

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, *self.spec.input_shape)


class StageExport(nn.Module):
    """Stage ``i`` as it is exported to ONNX: NHWC at the hand-off boundaries, named outputs.

    The first stage takes the NCHW image (onnx2tf turns it into NHWC); later stages take the previous
    stage's NHWC features and permute them back. Every stage returns its features in NHWC (on the last
    stage this output only marks where the segment ends, for cost accounting), then "logits" and, if the
    head has one, "confidence". With this layout onnx2tf produces graphs without TRANSPOSE ops.
    """

    def __init__(self, stage: Stage, first: bool):
        super().__init__()
        self.stage = stage
        self.first = first

    @property
    def output_names(self) -> list[str]:
        names = ["features", "logits"]
        if self.stage.head.has_confidence:
            names.append("confidence")
        return names

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.first:
            # NHWC hand-off -> NCHW, plain strides (a head may .view it; .contiguous() keeps 1-channel strides)
            x = x.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)
        features, out = self.stage(x)
        result = [features.permute(0, 2, 3, 1), out["logits"]]
        if self.stage.head.has_confidence:
            result.append(out["confidence"])
        return tuple(result)


class MonolithicExport(nn.Module):
    """The same network without early exits: every segment, then the final head's logits only."""

    def __init__(self, model: StagedModel):
        super().__init__()
        self.segments = nn.ModuleList(s.segment for s in model.stages)
        self.final_head = model.stages[-1].head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for seg in self.segments:
            x = seg(x)
        return self.final_head(x)["logits"]
