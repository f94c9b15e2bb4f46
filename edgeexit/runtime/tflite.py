"""MACs and parameter bytes of a converted .tflite graph, read through the interpreter (numpy only).

What is counted (one input, batch 1), per op:

* ``CONV_2D``            -- output elements * kernel_h * kernel_w * input channels per group
* ``DEPTHWISE_CONV_2D``  -- output elements * kernel_h * kernel_w (each output uses one input channel)
* ``FULLY_CONNECTED``    -- output elements * in_features
* ``BATCH_MATMUL``       -- output elements * the contracted dimension
* ``TRANSPOSE_CONV``     -- input elements * kernel_h * kernel_w * output channels

Element-wise ops, pooling, MEAN and activations are not MACs. Parameter bytes are the bytes of the
constant tensors (weights, biases, and the few shape constants the ops need) as stored in the file.

A stage graph is split into its *segment* (the ops the ``features`` output depends on) and its *head*
(every other op), so the runtime can tell what continuing past an exit costs. ``head_output_macs`` tells
what each output needs of the head: the monolithic graph (no confidence output) needs only the final head's
``logits`` part, so its MACs are the segments' plus ``head_output_macs["logits"]`` of the last stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from ..errors import BundleError

#: Ops whose multiply-accumulates are counted.
MAC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV")


@dataclass(frozen=True)
class OpInfo:
    """One op of a graph: its kind, tensor indices and MACs."""

    index: int
    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    macs: int


@dataclass(frozen=True)
class GraphCosts:
    """Costs of one .tflite graph, split at an optional boundary tensor (the stage's ``features``)."""

    macs: int                 # all ops
    param_bytes: int          # all constant tensors
    segment_macs: int         # ops the boundary tensor depends on (all ops when there is no boundary)
    head_macs: int            # the rest
    segment_param_bytes: int
    head_param_bytes: int
    mac_ops: Mapping[str, int]  # op name -> MACs summed over the graph
    head_output_macs: Mapping[str, int]  # graph output name -> MACs of the head ops it depends on


def _shape(details: Mapping[int, Mapping[str, Any]], idx: int) -> tuple[int, ...]:
    return tuple(int(s) for s in details[idx]["shape"])


def _op_macs(name: str, ins: tuple[int, ...], outs: tuple[int, ...],
             details: Mapping[int, Mapping[str, Any]]) -> int:
    """MACs of one op from its tensor shapes (0 for ops that are not counted)."""
    if name not in MAC_OPS or not outs:
        return 0
    out = _shape(details, outs[0])
    out_elems = int(np.prod(out)) if out else 1
    if name == "CONV_2D":
        _, kh, kw, cin_per_group = _shape(details, ins[1])  # filter [Cout, Kh, Kw, Cin/groups]
        return out_elems * kh * kw * cin_per_group
    if name == "DEPTHWISE_CONV_2D":
        _, kh, kw, _ = _shape(details, ins[1])  # filter [1, Kh, Kw, Cin*multiplier]
        return out_elems * kh * kw
    if name == "FULLY_CONNECTED":
        return out_elems * _shape(details, ins[1])[-1]  # weights [out_features, in_features]
    if name == "BATCH_MATMUL":
        a = _shape(details, ins[0])
        # A is [..., M, K] (or [..., K, M] when adjoint); M is the output's second-to-last dimension.
        k = a[-1] if len(a) < 2 or len(out) < 2 or a[-2] == out[-2] else a[-2]
        return out_elems * k
    # TRANSPOSE_CONV: inputs (output_shape, filter [Cout, Kh, Kw, Cin], input)
    cout, kh, kw, _ = _shape(details, ins[1])
    return int(np.prod(_shape(details, ins[2]))) * kh * kw * cout


def read_ops(interpreter: Any) -> tuple[list[OpInfo], dict[int, Mapping[str, Any]]]:
    """The ops of an interpreter's graph with their MACs, and its tensor details by index.

    Raises:
        BundleError: the interpreter cannot list its ops (a runtime without ``_get_ops_details``).
    """
    if not hasattr(interpreter, "_get_ops_details"):
        raise BundleError("this TFLite interpreter cannot list graph ops (no _get_ops_details); use ai-edge-litert "
                          ">= 1.0 or tensorflow >= 2.5 to count MACs")
    details = {int(d["index"]): d for d in interpreter.get_tensor_details()}
    ops = []
    for op in interpreter._get_ops_details():
        if op["op_name"] == "DELEGATE":  # a delegate's node stands for ops that are listed on their own too
            continue
        ins = tuple(int(i) for i in op["inputs"] if int(i) >= 0)
        outs = tuple(int(i) for i in op["outputs"] if int(i) >= 0)
        ops.append(OpInfo(int(op["index"]), str(op["op_name"]), ins, outs, _op_macs(op["op_name"], ins, outs,
                                                                                     details)))
    return ops, details


def _ancestors(ops: list[OpInfo], target: int) -> set[int]:
    """Indices of the ops that ``target`` (a tensor index) depends on."""
    producer = {t: op for op in ops for t in op.outputs}
    needed: set[int] = set()
    stack = [target]
    while stack:
        op = producer.get(stack.pop())
        if op is None or op.index in needed:
            continue
        needed.add(op.index)
        stack.extend(op.inputs)
    return needed


def _constant_bytes(tensors: Iterable[int], details: Mapping[int, Mapping[str, Any]]) -> int:
    return sum(int(np.prod(_shape(details, t))) * np.dtype(details[t]["dtype"]).itemsize for t in tensors)


def graph_costs(interpreter: Any, boundary: str | None = "features") -> GraphCosts:
    """Count MACs and parameter bytes of a graph, split into segment and head at tensor ``boundary``.

    Args:
        interpreter: a TFLite interpreter (allocation not needed).
        boundary: name of the tensor that ends the segment (a stage's ``features`` output); ``None`` or a
            name the graph does not have puts every op in the segment.

    Returns:
        The :class:`GraphCosts`.
    """
    ops, details = read_ops(interpreter)
    produced = {t for op in ops for t in op.outputs}
    graph_inputs = {int(d["index"]) for d in interpreter.get_input_details()}
    by_name = {d["name"]: i for i, d in details.items()}
    seg_ops = {op.index for op in ops}
    if boundary is not None and boundary in by_name:
        seg_ops = _ancestors(ops, by_name[boundary])
    seg_consts: set[int] = set()
    head_consts: set[int] = set()
    for op in ops:
        consts = {t for t in op.inputs if t not in produced and t not in graph_inputs}
        (seg_consts if op.index in seg_ops else head_consts).update(consts)
    head_consts -= seg_consts  # a constant shared by both is paid once, by the segment
    mac_ops: dict[str, int] = {}
    for op in ops:
        if op.macs:
            mac_ops[op.name] = mac_ops.get(op.name, 0) + op.macs
    seg_macs = sum(op.macs for op in ops if op.index in seg_ops)
    head_macs = sum(op.macs for op in ops if op.index not in seg_ops)
    seg_bytes, head_bytes = _constant_bytes(seg_consts, details), _constant_bytes(head_consts, details)
    macs_of = {op.index: op.macs for op in ops}
    head_output_macs = {}
    for d in interpreter.get_output_details():
        needed = _ancestors(ops, int(d["index"])) - seg_ops
        head_output_macs[str(d["name"])] = sum(macs_of[i] for i in needed)
    return GraphCosts(macs=seg_macs + head_macs, param_bytes=seg_bytes + head_bytes, segment_macs=seg_macs,
                      head_macs=head_macs, segment_param_bytes=seg_bytes, head_param_bytes=head_bytes,
                      mac_ops=mac_ops, head_output_macs=head_output_macs)


def file_costs(path: str | os.PathLike[str], boundary: str | None = "features", backend: str = "auto") -> GraphCosts:
    """:func:`graph_costs` of a .tflite file, with an interpreter from :mod:`edgeexit.runtime.interpreter`."""
    from .interpreter import create_interpreter, resolve_backend

    return graph_costs(create_interpreter(path, resolve_backend(backend)), boundary)
