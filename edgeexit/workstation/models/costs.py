"""MACs and parameters of every segment and exit head, counted on the torch modules.

What is counted: multiply-accumulates of ``nn.Conv2d`` (``output elements * in_channels / groups *
kernel_h * kernel_w``) and ``nn.Linear`` (``output elements * in_features``), for one input (batch 1).
BatchNorm (folded into the convolution at conversion), activations, pooling, additions and the global
mean are NOT counted; this matches what the int8 graph spends its multiplies on (CONV_2D,
DEPTHWISE_CONV_2D, FULLY_CONNECTED).

Two cost views per exit ``i`` (as a fraction of the full network = every segment + the final head):

* :meth:`ModelCosts.kappa` -- the EENet authors' definition: trunk up to exit ``i`` + head ``i``;
* :meth:`ModelCosts.cumulative` -- what an input that stops at exit ``i`` really paid: trunk up to ``i``
  + every head ``0..i``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .staged import StagedModel


def layer_macs(module: nn.Module, output_shape: Sequence[int]) -> int:
    """MACs of one call of ``module`` that produced an output of ``output_shape`` (the only MAC formula).

    ``nn.Conv2d``: output elements x in_channels / groups x kernel_h x kernel_w; ``nn.Linear``: output
    elements x in_features; every other module: 0. Divide by the batch size for one input.
    """
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return int(torch.Size(output_shape).numel() * (module.in_channels // module.groups) * kh * kw)
    if isinstance(module, nn.Linear):
        return int(torch.Size(output_shape).numel() * module.in_features)
    return 0


def _count_calls(groups: list[nn.Module], run: Any, batch: int) -> tuple[list[int], Any]:
    """MACs per input spent by the Conv2d/Linear layers of each module in ``groups`` while ``run()`` runs."""
    totals = [0] * len(groups)
    handles = []

    def hook(i: int) -> Any:
        def count(m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            totals[i] += layer_macs(m, out.shape)
        return count

    for i, group in enumerate(groups):
        for sub in group.modules():
            if isinstance(sub, (nn.Conv2d, nn.Linear)):
                handles.append(sub.register_forward_hook(hook(i)))
    try:
        with torch.no_grad():
            out = run()
    finally:
        for h in handles:
            h.remove()
    return [t // batch for t in totals], out


def count_macs(module: nn.Module, example: torch.Tensor) -> tuple[int, Any]:
    """MACs of ``module(example)`` for one input: :func:`layer_macs` of every Conv2d / Linear call (forward hooks).

    Args:
        module: any module; it is run once under ``torch.no_grad()``.
        example: its input, batch size B (the count is divided by B).

    Returns:
        (MACs per input, the module's output).
    """
    total = 0

    def hook(m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += layer_macs(m, out.shape)

    handles = [sub.register_forward_hook(hook) for sub in module.modules() if isinstance(sub, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            out = module(example)
    finally:
        for h in handles:
            h.remove()
    return total // int(example.shape[0]), out


def count_params(module: nn.Module) -> int:
    """Number of parameters (weights and biases, BatchNorm affine included; buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class ModelCosts:
    """Per-stage costs of a :class:`~edgeexit.workstation.models.staged.StagedModel` (MACs for one input)."""

    segment_macs: tuple[int, ...]
    head_macs: tuple[int, ...]
    segment_params: tuple[int, ...]
    head_params: tuple[int, ...]

    @property
    def full_macs(self) -> int:
        """MACs of the network without early exits: every stage's segment + the whole final head.

        The one definition of ``full_macs`` (the manifest stores the same sum counted on the graphs). The
        monolithic .tflite drops the final head's confidence branch, so it counts slightly less.
        """
        return sum(self.segment_macs) + self.head_macs[-1]

    def kappa(self) -> list[float]:
        """EENet's kappa_i = MACs(trunk to exit i + head i) / full; the last one is exactly 1."""
        trunk = 0
        out = []
        for seg, head in zip(self.segment_macs, self.head_macs):
            trunk += seg
            out.append((trunk + head) / self.full_macs)
        return out

    def cumulative(self) -> list[float]:
        """Honest cost of stopping at exit i = (trunk to i + heads 0..i) / full; >= kappa."""
        spent = 0
        out = []
        for seg, head in zip(self.segment_macs, self.head_macs):
            spent += seg + head
            out.append(spent / self.full_macs)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(full_macs=self.full_macs, kappa=self.kappa(), cumulative=self.cumulative())
        return d


def model_costs(model: StagedModel) -> ModelCosts:
    """Count the MACs and parameters of every segment and head of ``model`` on one example input."""
    was_training = model.training
    model.eval()
    x = model.example_input(1)
    seg_macs, head_macs = [], []
    try:
        for stage in model.stages:  # one stage call: a head may read values inside its segment
            (macs, hmacs), (x, _) = _count_calls([stage.segment, stage.head], lambda: stage(x), int(x.shape[0]))
            seg_macs.append(macs)
            head_macs.append(hmacs)
    finally:
        model.train(was_training)
    return ModelCosts(tuple(seg_macs), tuple(head_macs),
                      tuple(count_params(s.segment) for s in model.stages),
                      tuple(count_params(s.head) for s in model.stages))
