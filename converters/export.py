"""Step 1-2 of the conversion pipeline: split a StagedModel into exportable stages and write them as ONNX.

Every stage becomes a :class:`~converters.staged.StageExport` (NHWC hand-off in and out, outputs named
``features``, ``logits`` and optionally ``confidence``); the network without exits becomes a
:class:`~converters.staged.MonolithicExport` (NCHW image in, ``logits`` out). Both are exported with the
TorchScript-based exporter at a fixed batch size of 1.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeexit.errors import ConversionError

from .staged import MonolithicExport, StagedModel, StageExport

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
    re.compile(r"Unsupported: ONNX export of ([\w:. ]+?)(?: in opset| is|\.|$)"),
)


def _failed_op(message: str) -> str | None:
    for pattern in _OP_PATTERNS:
        m = pattern.search(message)
        if m:
            return m.group(1)
    return None


def export_onnx(unit: ExportUnit, path: Path) -> Path:
    """Export one unit to ONNX (opset 17, batch 1, input ``input``, outputs named as the unit says).

    Raises:
        ConversionError: the module cannot be exported (an operator without an ONNX equivalent, a
            data-dependent control flow, ...), naming the operator when torch reports one.
    """
    from .quantize import quiet_tool  # imported here: quantize imports this module

    try:
        with torch.no_grad(), warnings.catch_warnings(), quiet_tool():
            warnings.simplefilter("ignore")
            torch.onnx.export(unit.module, (unit.example,), str(path), input_names=[INPUT_NAME],
                              output_names=unit.output_names, opset_version=OPSET, dynamo=False,
                              do_constant_folding=True)
    except Exception as exc:  # torch raises many unrelated types for export failures; re-raised as one
        message = " ".join(str(exc).split())
        op = _failed_op(message)
        what = f"operator {op}" if op else "a layer"
        raise ConversionError(f"{unit.name}: {what} cannot be exported to ONNX ({message[:300]}); replace it with "
                              "standard conv/linear/pool/activation layers or rewrite it without "
                              "data-dependent control flow") from exc
    log.debug("%s: exported ONNX to %s", unit.name, path)
    return path
