"""Step 1-2 of the conversion pipeline: split a StagedModel into exportable stages and write them as ONNX.

Every stage becomes a :class:`~edgeexit.workstation.models.staged.StageExport` (NHWC hand-off in and out, outputs named
``features``, ``logits`` and optionally ``confidence``); the network without exits becomes a
:class:`~edgeexit.workstation.models.staged.MonolithicExport` (NCHW image in, ``logits`` out). Both are exported with the
TorchScript-based exporter at a fixed batch size of 1. Adaptive average pools whose output size does not
divide their input size (refused by that exporter; torchvision's VGG on small images has one) are exported
as exact slice means.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from edgeexit.errors import ConversionError, clip

from ..models.staged import MonolithicExport, StagedModel, StageExport

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "input"


@dataclass
class ExportUnit:
    """One module to convert into one .tflite file."""

    name: str                        # "stage_0", ..., "monolithic"
    module: nn.Module                # StageExport or MonolithicExport, eval mode
    example: torch.Tensor            # the batch-1 input it is exported with (NCHW image or NHWC features)
    output_names: list[str]
    first: bool                      # takes the image (NCHW in ONNX, NHWC after conversion)


def split_stages(model: StagedModel) -> list[ExportUnit]:
    """Cut ``model`` into one ExportUnit per stage, with example inputs of the right hand-off shape.

    Returns:
        One unit per stage; stage k > 0 takes stage k-1's features in NHWC, shape [1, H, W, C].
    """
    model = model.eval()
    units = []
    x = model.example_input(1)  # [1, C, H, W]
    with torch.no_grad():
        for i, stage in enumerate(model.stages):
            module = StageExport(stage, first=(i == 0)).eval()
            outs = module(x)
            units.append(ExportUnit(f"stage_{i}", module, x, module.output_names, first=(i == 0)))
            x = outs[0]  # features, NHWC [1, H, W, C]
    return units


def monolithic_unit(model: StagedModel) -> ExportUnit:
    """The network without early exits as one ExportUnit (image in, final ``logits`` out)."""
    return ExportUnit("monolithic", MonolithicExport(model).eval(), model.example_input(1), ["logits"], first=True)


_OP_PATTERNS = (
    re.compile(r"Exporting the operator '?([\w:.]+)'? to ONNX"),
    re.compile(r"Unsupported: ONNX export of operator ([\w:.]+)"),
    re.compile(r"Unsupported: ONNX export of ([\w:. ]+?)(?: in opset| is|\.|$)"),
)




def _failed_op(message: str) -> str | None:
    for pattern in _OP_PATTERNS:
        m = pattern.search(message)
        if m:
            return m.group(1)
    return None


def adaptive_bins(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[tuple[tuple[int, int], ...], ...]:
    """The row and column ranges of adaptive average pooling from ``in_hw`` to ``out_hw``: bin i covers
    [floor(i*H/oh), ceil((i+1)*H/oh)), as torch computes them."""
    return tuple(tuple((i * n // o, math.ceil((i + 1) * n / o)) for i in range(o)) for n, o in zip(in_hw, out_hw))


def slice_mean_pool2d(x: torch.Tensor, rows: tuple[tuple[int, int], ...],
                      cols: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Adaptive average pooling over the given bins as slice means (exported as Slice/ReduceMean/Concat).

    Pooling rows then columns gives the same values as ``F.adaptive_avg_pool2d`` (each bin is a rectangle).
    """
    x = torch.cat([x[:, :, a:b].mean(2, keepdim=True) for a, b in rows], 2)        # [N, C, oh, W]
    return torch.cat([x[:, :, :, a:b].mean(3, keepdim=True) for a, b in cols], 3)  # [N, C, oh, ow]


def divides(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    """True when the exporter can write adaptive pooling from ``in_hw`` to ``out_hw`` as a plain average pool."""
    return in_hw[0] % out_hw[0] == 0 and in_hw[1] % out_hw[1] == 0


class _SliceMeanAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` for one fixed input size, as slice means (:func:`slice_mean_pool2d`).

    The ONNX exporter refuses adaptive average pooling whose output size does not divide the input size
    (torchvision's VGG on 32x32 images pools a 1x1 map to 7x7).
    """

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]):
        super().__init__()
        self.rows, self.cols = adaptive_bins(in_hw, out_hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return slice_mean_pool2d(x, self.rows, self.cols)


def _pool_sizes(pool: nn.AdaptiveAvgPool2d, in_hw: tuple[int, int]) -> tuple[int, int]:
    size = pool.output_size
    out = (size, size) if isinstance(size, int) else tuple(size)
    return tuple(in_hw[i] if out[i] is None else int(out[i]) for i in range(2))  # type: ignore[return-value]


@contextlib.contextmanager
def _exportable_adaptive_pools(unit: ExportUnit) -> Iterator[None]:
    """Swap every ``nn.AdaptiveAvgPool2d`` of ``unit`` the exporter refuses for an exact slice-mean equivalent.

    The swap lasts for the export only; the unit's modules are restored afterwards (they are the user's).
    """
    seen: dict[nn.Module, tuple[int, int]] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        seen[module] = (int(args[0].shape[-2]), int(args[0].shape[-1]))

    pools = [m for m in unit.module.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    if not pools:
        yield
        return
    hooks = [m.register_forward_hook(record) for m in pools]
    try:
        with torch.no_grad():
            unit.module(unit.example)
    finally:
        for h in hooks:
            h.remove()
    swapped = []
    for parent in unit.module.modules():
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.AdaptiveAvgPool2d) or child not in seen:
                continue
            in_hw = seen[child]
            out_hw = _pool_sizes(child, in_hw)
            if divides(in_hw, out_hw):
                continue  # exported as AveragePool / GlobalAveragePool
            setattr(parent, name, _SliceMeanAdaptiveAvgPool2d(in_hw, out_hw))
            swapped.append((parent, name, child))
            log.debug("%s: adaptive average pool %s %s -> %s exported as slice means", unit.name, name, in_hw, out_hw)
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def export_onnx(unit: ExportUnit, path: Path) -> Path:
    """Export one unit to ONNX (opset 17, batch 1, input ``input``, outputs named as the unit says).

    Raises:
        ConversionError: the module cannot be exported (an operator without an ONNX equivalent, a
            data-dependent control flow, ...), naming the operator when torch reports one.
    """

    try:
        with torch.no_grad(), warnings.catch_warnings(), quiet_tool(), _exportable_adaptive_pools(unit):
            warnings.simplefilter("ignore")
            torch.onnx.export(unit.module, (unit.example,), str(path), input_names=[INPUT_NAME],
                              output_names=unit.output_names, opset_version=OPSET, dynamo=False,
                              do_constant_folding=True)
    except Exception as exc:  # torch raises many unrelated types for export failures; re-raised as one
        message = " ".join(str(exc).split())
        op = _failed_op(message)
        if op:
            fix = (f"replace {op} with standard conv/linear/pool/activation layers (or a pooling whose output "
                   "size divides its input size)")
        else:
            fix = ("replace it with standard conv/linear/pool/activation layers, or rewrite it without "
                   "data-dependent control flow")
        raise ConversionError(f"{unit.name}: {f'operator {op}' if op else 'a layer'} cannot be exported to ONNX "
                              f"({clip(message)}); {fix}") from exc
    log.debug("%s: exported ONNX to %s", unit.name, path)
    return path


@contextlib.contextmanager
def quiet_tool() -> Iterator[io.StringIO]:
    """Capture stdout/stderr (Python and C level) and put the venv's bin dir on PATH (onnx2tf runs onnxsim)."""
    captured = io.StringIO()
    old_path = os.environ.get("PATH", "")
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + old_path
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            os.environ["PATH"] = old_path
            sink.seek(0)
            captured.write(sink.read().decode("utf-8", "replace"))
