"""Bring your own early-exit network as an ONNX file (from Keras/TensorFlow, PyTorch or anything else).

The ONNX graph is rebuilt as a ``torch.fx`` GraphModule of standard torch layers (``nn.Conv2d``,
``nn.Linear``, ``nn.BatchNorm2d``, pools, activations; constants become buffers), compared with onnxruntime on
random inputs, and handed to :func:`~edgeexit.workstation.own.user_network.stage_network`: the split at
the exits, its numeric check, the MACs count, the conversion and the verification are the same code path as
for a torch network.

The head contract, read from the ONNX graph outputs (exits 0..E-1, the final classifier last):

* by default every graph output belongs to an exit, in output order; ``outputs=[...]`` names the ones to use
  (in exit order) when the model has others or orders them differently;
* an output shaped ``[N, K]`` (K >= 2) is an exit's class logits; one shaped ``[N, 1]`` or ``[N]`` is an
  exit's confidence and comes right before that exit's logits (``(confidence, logits)`` pairs, as the torch
  contract; exits without one are decided on their logits);
* a confidence is declared once: ``confidence="probability"`` (the output of a Sigmoid, removed so that the
  device compares ``sigmoid(logit) > T``, the same number) or ``confidence="logit"`` (the pre-sigmoid value);
* logits that end in a Softmax (Keras' ``Dense(K, activation="softmax")``) are taken before it (the same
  classes and softmax scores); ``scores="sigmoid"`` reads logits as independent per-class scores;
* one float32 image input, ``[N, C, H, W]`` or, with ``input_layout="NHWC"``, ``[N, H, W, C]`` (the usual
  Keras layout; transposed inside, the bundle still takes images); the batch is 1 or dynamic. The layout is
  found from the declared input shape when only one fits.

Supported operators: those of CNN classifiers (Conv 2-D, Gemm/MatMul, BatchNormalization, pools,
activations, element-wise arithmetic, shape operators on constants or keeping the batch first); anything else
is refused in one line naming the operators. Values that depend on the input keep the batch as their first
dimension; an operator that moves or mixes it is refused.
"""

from __future__ import annotations

import hashlib
import logging
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from edgeexit.errors import ConversionError, UsageError

from edgeexit.errors import clip
from ..models.staged import StagedModel
from .user_network import CONFIDENCE_KINDS, _check_args, stage_network

log = logging.getLogger(__name__)

LAYOUTS = ("NCHW", "NHWC")

#: onnxruntime vs the rebuilt torch module: largest difference allowed, relative to max(1, |output|max).
ORT_TOLERANCE = 1e-4
#: Random inputs of the onnxruntime comparison.
ORT_SAMPLES = 4


@dataclass
class _Val:
    """A value of the ONNX graph: a constant (``node`` None) or an fx node, with its value for the example input."""

    value: torch.Tensor
    node: fx.Node | None = None
    permuted: tuple[_Val, tuple[int, ...]] | None = None  # this value = source.permute(perm)
    softmax_of: _Val | None = None                        # this value = softmax(source) over its last axis
    region: _PoolRegion | None = None                     # computed inside a lowered adaptive average pool

    @property
    def const(self) -> bool:
        return self.node is None

    @property
    def shape(self) -> list[int]:
        return list(self.value.shape)


@dataclass
class _PoolRegion:
    """Values computed from ``source`` after a Transpose that moved its batch dimension: torch's ONNX exporter
    lowers adaptive average pooling whose output size does not divide the input size that way (Transpose,
    GatherND with constant indices, masks, sums, a division). They are evaluated on the example input only,
    never put in the graph, until one equals ``adaptive_avg_pool2d(source)``: that one becomes an
    ``nn.AdaptiveAvgPool2d`` (exported as exact slice means). Anything else read from the region is refused
    with ``error``."""

    source: _Val
    error: str


class _Unsupported(Exception):
    """An operator this rebuild cannot express (turned into one ConversionError naming the node)."""


def _identifier(text: str, fallback: str) -> str:
    name = re.sub(r"\W+", "_", text).strip("_")
    return name if name and not name[0].isdigit() else fallback


class _Builder:
    """Builds the fx graph while evaluating every value on an example input (constants are folded)."""

    def __init__(self) -> None:
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.names: set[str] = set()
        self.consts = 0
        self.node_name = "node"           # the ONNX node being rebuilt (names its fx nodes and modules)
        self.op_type = ""
        self.num_outputs = 1
        self.bias: torch.Tensor | None = None  # a MatMul's bias, from the Add that only it feeds
        self.bias_used = False

    def _unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names or hasattr(self.root, name):
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def arg(self, a: Any) -> Any:
        """An fx argument for ``a``: a node, a Python scalar for a 0-d constant, a buffer for other constants."""
        if isinstance(a, _Val):
            if a.node is not None:
                return a.node
            t = a.value
            if t.dim() == 0:
                return t.item()
            name = self._unique(f"const_{self.consts}")
            self.consts += 1
            self.root.register_buffer(name, t.clone())
            return self.graph.get_attr(name)
        if isinstance(a, (tuple, list)):
            return type(a)(self.arg(v) for v in a)
        return a

    @staticmethod
    def example(a: Any) -> Any:
        if isinstance(a, _Val):
            return a.value
        if isinstance(a, (tuple, list)):
            return type(a)(_Builder.example(v) for v in a)
        return a

    @staticmethod
    def dynamic(a: Any) -> bool:
        if isinstance(a, _Val):
            return a.node is not None
        if isinstance(a, (tuple, list)):
            return any(_Builder.dynamic(v) for v in a)
        return False

    def fn(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> _Val:
        """``target(*args)``: computed now when every argument is a constant, else a call_function node."""
        with torch.no_grad():
            value = target(*self.example(args), **kwargs)
        if not self.dynamic(args):
            return _Val(value)
        node = self.graph.create_node("call_function", target, self.arg(args), kwargs,
                                      name=self._unique(self.node_name))
        return _Val(value, node)

    def module(self, mod: nn.Module, *args: _Val) -> _Val:
        mod.eval()
        path = self._unique(self.node_name)
        self.root.add_module(path, mod)
        with torch.no_grad():
            value = mod(*self.example(args))
        return _Val(value, self.graph.call_module(path, self.arg(args)))


# ---- reading ONNX nodes ----------------------------------------------------------------------------------------

def _tensor(array: np.ndarray) -> torch.Tensor:
    a = np.asarray(array)
    if a.dtype.kind == "f":
        a = a.astype(np.float32)
    elif a.dtype.kind in "iu":
        a = a.astype(np.int64)
    elif a.dtype.kind == "b":
        a = a.astype(np.bool_)
    return torch.from_numpy(np.array(a, order="C", copy=True))  # (np.ascontiguousarray makes 0-d arrays 1-d)


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper, numpy_helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif hasattr(v, "data_type") and hasattr(v, "dims"):  # a TensorProto
            v = numpy_helper.to_array(v)
        out[a.name] = v
    return out


def _ints(v: _Val | None, what: str) -> list[int] | None:
    if v is None:
        return None
    if not v.const:
        raise _Unsupported(f"its {what} are computed from the input")
    return [int(x) for x in v.value.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _keep_batch(x: _Val, axes: Sequence[int], what: str) -> None:
    if not x.const and 0 in [_axis(a, x.value.dim()) for a in axes]:
        raise _Unsupported(f"{what} the batch dimension (axis 0)")


def _reshape(b: _Builder, x: _Val, shape: Sequence[int]) -> _Val:
    """``x`` reshaped to ``shape`` (fully resolved); a value of the input keeps its batch first."""
    shape = [int(s) for s in shape]
    if x.const:
        return _Val(x.value.reshape(shape))
    if not shape or shape[0] != x.shape[0] or math.prod(shape[1:]) != math.prod(x.shape[1:]):
        raise _Unsupported(f"it reshapes {x.shape} to {shape}, mixing the batch dimension with the others")
    if shape == x.shape:
        return x
    return b.fn(torch.reshape, x, (-1, *shape[1:]))


def _onnx_reshape_target(in_shape: Sequence[int], target: Sequence[int], allowzero: int) -> list[int]:
    out = [in_shape[i] if (t == 0 and not allowzero) else t for i, t in enumerate(target)]
    if out.count(-1) == 1:
        known = math.prod(v for v in out if v != -1)
        out[out.index(-1)] = math.prod(in_shape) // known if known else 0
    return out


def _pads_2d(pads: Sequence[int] | None, auto_pad: str, in_hw: Sequence[int], kernel: Sequence[int],
             strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """ONNX pads [top, left, bottom, right] of a 2-D window op (auto_pad resolved on the example's size)."""
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for i in range(2):
            out = -(-in_hw[i] // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_hw[i], 0)
            small = total // 2
            pads[i], pads[i + 2] = (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
        return pads
    if auto_pad == "VALID":
        return [0, 0, 0, 0]
    return list(pads) if pads else [0, 0, 0, 0]


def _window(attrs: dict[str, Any], x: _Val, kernel: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    if x.value.dim() != 4:
        raise _Unsupported(f"only 2-D windows on [N, C, H, W] are supported (input {x.shape})")
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    pads = _pads_2d(attrs.get("pads"), attrs.get("auto_pad", "NOTSET"), x.shape[2:], kernel, strides, dilations)
    return strides, dilations, pads


# ---- the operators ------------------------------------------------------------------------------------------------

Handler = Callable[[_Builder, list, dict, int], list]
_OPS: dict[str, Handler] = {}


def _op(*names: str) -> Callable[[Handler], Handler]:
    def register(f: Handler) -> Handler:
        for n in names:
            _OPS[n] = f
        return f
    return register


@_op("Conv")
def _conv(b, ins, attrs, opset):
    x, w, bias = (ins + [None])[:3]
    if not w.const or (bias is not None and not bias.const):
        raise _Unsupported("its weights are computed from the input")
    if w.value.dim() != 4 or x.value.dim() != 4:
        raise _Unsupported(f"only 2-D convolutions are supported (weights {w.shape})")
    out_ch, in_per_group, kh, kw = w.shape
    group = int(attrs.get("group", 1))
    strides, dilations, pads = _window(attrs, x, [kh, kw])
    if pads[0] != pads[2] or pads[1] != pads[3]:
        x = b.fn(F.pad, x, (pads[1], pads[3], pads[0], pads[2]))
        pads = [0, 0, 0, 0]
    conv = nn.Conv2d(in_per_group * group, out_ch, (kh, kw), tuple(strides), (pads[0], pads[1]), tuple(dilations),
                     group, bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(w.value)
        if bias is not None:
            conv.bias.copy_(bias.value.reshape(-1))
    return [b.module(conv, x)]


@_op("Gemm")
def _gemm(b, ins, attrs, opset):
    a, w, c = (ins + [None])[:3]
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if a.const or not w.const or (c is not None and not c.const) or attrs.get("transA", 0):
        if a.const and w.const and (c is None or c.const):
            aa = a.value.T if attrs.get("transA", 0) else a.value
            ww = w.value.T if attrs.get("transB", 0) else w.value
            return [_Val(alpha * aa @ ww + (0 if c is None else beta * c.value))]
        raise _Unsupported("only input @ constant weights (+ constant bias) is supported")
    weight = w.value if attrs.get("transB", 0) else w.value.T  # [out, in]
    return [_linear(b, a, alpha * weight, None if c is None else beta * c.value)]


def _linear(b: _Builder, x: _Val, weight: torch.Tensor, bias: torch.Tensor | None) -> _Val:
    out_f, in_f = weight.shape
    if bias is not None:
        if bias.numel() == 1:
            bias = bias.reshape(1).expand(out_f)
        elif bias.numel() != out_f:
            raise _Unsupported(f"its bias {list(bias.shape)} is not one value per output ({out_f})")
    layer = nn.Linear(in_f, out_f, bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias.reshape(-1))
    return b.module(layer, x)


@_op("MatMul")
def _matmul(b, ins, attrs, opset):
    a, w = ins
    if a.const and w.const:
        return [_Val(a.value @ w.value)]
    if not a.const and w.const and w.value.dim() == 2 and a.value.dim() >= 2:
        bias = b.bias if b.bias is not None and b.bias.numel() == w.shape[1] else None
        b.bias_used = bias is not None
        return [_linear(b, a, w.value.T, bias)]
    if not a.const and not w.const and a.value.dim() == w.value.dim() >= 3:
        return [b.fn(torch.matmul, a, w)]
    raise _Unsupported(f"only input @ constant 2-D weights is supported (shapes {a.shape} @ {w.shape})")


@_op("BatchNormalization")
def _batchnorm(b, ins, attrs, opset):
    x, scale, bias, mean, var = ins[:5]
    if attrs.get("training_mode", 0) or not all(v.const for v in (scale, bias, mean, var)):
        raise _Unsupported("only inference batch normalization with constant statistics is supported")
    if x.value.dim() not in (2, 4):
        raise _Unsupported(f"only [N, C] and [N, C, H, W] inputs are supported (input {x.shape})")
    bn = (nn.BatchNorm2d if x.value.dim() == 4 else nn.BatchNorm1d)(x.shape[1], eps=float(attrs.get("epsilon", 1e-5)))
    with torch.no_grad():
        bn.weight.copy_(scale.value)
        bn.bias.copy_(bias.value)
        bn.running_mean.copy_(mean.value)
        bn.running_var.copy_(var.value)
    return [b.module(bn, x)]


@_op("MaxPool", "AveragePool")
def _pool(b, ins, attrs, opset):
    x = ins[0]
    kernel = list(attrs["kernel_shape"])
    if len(kernel) != 2:
        raise _Unsupported(f"only 2-D pooling is supported (kernel {kernel})")
    strides, dilations, pads = _window(attrs, x, kernel)
    if pads[0] != pads[2] or pads[1] != pads[3]:
        raise _Unsupported(f"its padding {pads} is not the same on both sides (use padding='valid' or even sizes)")
    ceil = bool(attrs.get("ceil_mode", 0))
    if b.op_type == "MaxPool":
        if attrs.get("storage_order", 0):
            raise _Unsupported("storage_order=1 is not supported")
        pool = nn.MaxPool2d(kernel, strides, (pads[0], pads[1]), dilations, ceil_mode=ceil)
    else:
        if dilations != [1, 1]:
            raise _Unsupported("dilated average pooling is not supported")
        pool = nn.AvgPool2d(kernel, strides, (pads[0], pads[1]), ceil_mode=ceil,
                            count_include_pad=bool(attrs.get("count_include_pad", 0)))
    return [b.module(pool, x)]


@_op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(b, ins, attrs, opset):
    x = ins[0]
    if x.value.dim() != 4:
        raise _Unsupported(f"only [N, C, H, W] inputs are supported (input {x.shape})")
    return [b.module(nn.AdaptiveAvgPool2d(1) if b.op_type == "GlobalAveragePool" else nn.AdaptiveMaxPool2d(1), x)]


@_op("Relu")
def _relu(b, ins, attrs, opset):
    return [b.module(nn.ReLU(), ins[0])]


_UNARY = {"Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt,
          "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal, "Erf": torch.erf, "Floor": torch.floor,
          "Ceil": torch.ceil, "HardSwish": F.hardswish, "Softplus": F.softplus}


@_op(*_UNARY)
def _unary(b, ins, attrs, opset):
    return [b.fn(_UNARY[b.op_type], ins[0])]


@_op("LeakyRelu")
def _leaky(b, ins, attrs, opset):
    return [b.fn(F.leaky_relu, ins[0], float(attrs.get("alpha", 0.01)))]


@_op("Elu")
def _elu(b, ins, attrs, opset):
    return [b.fn(F.elu, ins[0], float(attrs.get("alpha", 1.0)))]


@_op("Gelu")
def _gelu(b, ins, attrs, opset):
    return [b.fn(F.gelu, ins[0], approximate=attrs.get("approximate", "none"))]


@_op("HardSigmoid")
def _hard_sigmoid(b, ins, attrs, opset):
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    if abs(alpha - 1 / 6) < 1e-6 and beta == 0.5:
        return [b.fn(F.hardsigmoid, ins[0])]
    return [b.fn(torch.clamp, b.fn(torch.add, b.fn(torch.mul, ins[0], alpha), beta), 0.0, 1.0)]


@_op("Clip")
def _clip(b, ins, attrs, opset):
    x = ins[0]
    lo = ins[1] if len(ins) > 1 else None
    hi = ins[2] if len(ins) > 2 else None
    if (lo is not None and not lo.const) or (hi is not None and not hi.const):
        raise _Unsupported("its bounds are computed from the input")
    lo_v = float(lo.value) if lo is not None else attrs.get("min")
    hi_v = float(hi.value) if hi is not None else attrs.get("max")
    if lo_v is None and hi_v is None:
        return [x]
    if lo_v == 0.0 and hi_v is None:
        return [b.module(nn.ReLU(), x)]
    return [b.fn(torch.clamp, x, lo_v, hi_v)]


_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Pow": torch.pow,
           "Max": torch.maximum, "Min": torch.minimum}


@_op(*_BINARY)
def _binary(b, ins, attrs, opset):
    if len(ins) != 2:
        if b.op_type in ("Max", "Min") and len(ins) > 2:  # variadic
            out = ins[0]
            for other in ins[1:]:
                out = _binary(b, [out, other], attrs, opset)[0]
            return [out]
        raise _Unsupported(f"{len(ins)} inputs")
    x, y = ins
    if x.const and y.const:
        if b.op_type == "Div" and not x.value.is_floating_point() and not y.value.is_floating_point():
            return [_Val(torch.div(x.value, y.value, rounding_mode="trunc"))]  # integer division, as ONNX
        return [_Val(_BINARY[b.op_type](x.value, y.value))]
    rank = max(x.value.dim(), y.value.dim())
    for v in (x, y):
        if not v.const and v.value.dim() < rank:
            raise _Unsupported(f"it broadcasts a value of the input {v.shape} with a value of higher rank, moving "
                               "the batch dimension")
    return [b.fn(_BINARY[b.op_type], x, y)]


@_op("Sum")
def _sum(b, ins, attrs, opset):
    out = ins[0]
    for other in ins[1:]:
        out = b.fn(torch.add, out, other)
    return [out]


@_op("Softmax", "LogSoftmax")
def _softmax(b, ins, attrs, opset):
    x = ins[0]
    rank = x.value.dim()
    axis = _axis(int(attrs.get("axis", -1 if opset >= 13 else 1)), rank)
    if opset < 13 and axis != rank - 1:
        raise _Unsupported(f"opset {opset} softmax over axes {axis}.. of a rank-{rank} value is not supported")
    _keep_batch(x, [axis], "it normalises over")
    out = b.fn(torch.softmax if b.op_type == "Softmax" else torch.log_softmax, x, axis)
    if b.op_type == "Softmax" and axis == rank - 1:
        out.softmax_of = x
    return [out]


@_op("Identity", "Dropout")
def _identity(b, ins, attrs, opset):
    return [ins[0], None]


@_op("Flatten")
def _flatten(b, ins, attrs, opset):
    x = ins[0]
    axis = _axis(int(attrs.get("axis", 1)), x.value.dim())
    if not x.const and axis == 0:
        raise _Unsupported("Flatten(axis=0) merges the batch dimension")
    shape = x.shape
    return [_reshape(b, x, [math.prod(shape[:axis]), math.prod(shape[axis:])])]


@_op("Reshape")
def _reshape_op(b, ins, attrs, opset):
    x = ins[0]
    target = _ints(ins[1], "target shape") if len(ins) > 1 else list(attrs["shape"])
    return [_reshape(b, x, _onnx_reshape_target(x.shape, target, int(attrs.get("allowzero", 0))))]


@_op("Squeeze", "Unsqueeze")
def _squeeze(b, ins, attrs, opset):
    x = ins[0]
    axes = _ints(ins[1], "axes") if len(ins) > 1 and ins[1] is not None else attrs.get("axes")
    shape = x.shape
    if b.op_type == "Squeeze":
        rank = len(shape)
        axes = [_axis(a, rank) for a in axes] if axes else [i for i, s in enumerate(shape) if s == 1 and
                                                             (x.const or i > 0)]
        _keep_batch(x, axes, "it removes")
        new = [s for i, s in enumerate(shape) if i not in axes]
    else:
        rank = len(shape) + len(axes)
        axes = sorted(_axis(a, rank) for a in axes)
        _keep_batch(x, axes, "it inserts an axis before")
        new = list(shape)
        for a in axes:
            new.insert(a, 1)
    return [_reshape(b, x, new)]


@_op("Transpose")
def _transpose(b, ins, attrs, opset):
    x = ins[0]
    perm = [int(p) for p in attrs.get("perm", list(range(x.value.dim()))[::-1])]
    if x.const:
        return [_Val(x.value.permute(perm))]
    if perm[0] != 0:
        raise _Unsupported(f"perm {perm} moves the batch dimension")
    if perm == list(range(len(perm))):
        return [x]
    if x.permuted is not None:  # two transposes in a row (an NHWC input followed by its NCHW transpose)
        source, first = x.permuted
        composed = [first[p] for p in perm]
        if composed == list(range(len(composed))):
            return [source]
        x, perm = source, composed
    out = b.fn(torch.permute, x, tuple(perm))
    out.permuted = (x, tuple(perm))
    return [out]


@_op("Concat")
def _concat(b, ins, attrs, opset):
    ins = [v for v in ins if v is not None and (not v.const or v.value.numel() > 0)]
    axis = _axis(int(attrs["axis"]), ins[0].value.dim())
    if all(v.const for v in ins):
        return [_Val(torch.cat([v.value for v in ins], axis))]
    if any(v.const for v in ins):
        raise _Unsupported("it joins values of the input with constants (which have no batch dimension)")
    _keep_batch(ins[0], [axis], "it concatenates along")
    return [b.fn(torch.cat, list(ins), axis)]


@_op("Shape")
def _shape_op(b, ins, attrs, opset):
    shape = ins[0].shape  # the example's shape: the batch is that of the example (reshapes keep it first)
    start, end = int(attrs.get("start", 0)), attrs.get("end")
    return [_Val(torch.tensor(shape[start:None if end is None else int(end)], dtype=torch.int64))]


@_op("Size")
def _size(b, ins, attrs, opset):
    return [_Val(torch.tensor(ins[0].value.numel(), dtype=torch.int64))]


@_op("Constant")
def _constant(b, ins, attrs, opset):
    for key, kind in (("value", None), ("value_float", np.float32), ("value_floats", np.float32),
                      ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return [_Val(_tensor(np.asarray(attrs[key], dtype=kind)))]
    raise _Unsupported(f"constant attributes {sorted(attrs)} are not supported")


@_op("ConstantOfShape")
def _constant_of_shape(b, ins, attrs, opset):
    shape = _ints(ins[0], "shape")
    fill = attrs.get("value", np.zeros(1, np.float32))
    return [_Val(_tensor(np.full(shape, np.asarray(fill).reshape(-1)[0], dtype=np.asarray(fill).dtype)))]


@_op("Cast")
def _cast(b, ins, attrs, opset):
    from onnx import helper

    x = ins[0]
    dtype = helper.tensor_dtype_to_np_dtype(int(attrs["to"]))
    if x.const:
        return [_Val(_tensor(x.value.numpy().astype(dtype)))]
    if np.dtype(dtype).kind == "f":
        return [x]
    raise _Unsupported(f"it casts a value of the input to {np.dtype(dtype).name}")


@_op("Gather")
def _gather(b, ins, attrs, opset):
    x, idx = ins
    if not idx.const:
        raise _Unsupported("its indices are computed from the input")
    axis = _axis(int(attrs.get("axis", 0)), x.value.dim())
    if x.const:
        return [_Val(_tensor(np.take(x.value.numpy(), idx.value.numpy(), axis=axis)))]
    _keep_batch(x, [axis], "it gathers along")
    index = idx.value.reshape(-1) % x.shape[axis]
    if idx.value.dim() == 0:
        return [b.fn(torch.select, x, axis, int(index))]
    out = b.fn(torch.index_select, x, axis, _Val(index))
    return [_reshape(b, out, x.shape[:axis] + list(idx.value.shape) + x.shape[axis + 1:])]


@_op("GatherND")
def _gather_nd(b, ins, attrs, opset):
    x, idx = ins
    if not (x.const and idx.const) or int(attrs.get("batch_dims", 0)):
        raise _Unsupported("only constant GatherND without batch_dims is supported (as torch exports adaptive "
                           "average pooling)")
    index = idx.value.numpy()
    return [_Val(_tensor(x.value.numpy()[tuple(index[..., i] for i in range(index.shape[-1]))]))]


@_op("Where")
def _where(b, ins, attrs, opset):
    cond, x, y = ins
    if not (cond.const and x.const and y.const):
        raise _Unsupported("only Where on constants is supported (as torch exports adaptive average pooling)")
    return [_Val(torch.where(cond.value.bool(), x.value, y.value))]


@_op("Slice")
def _slice(b, ins, attrs, opset):
    x = ins[0]
    if len(ins) > 1:
        starts, ends = _ints(ins[1], "starts"), _ints(ins[2], "ends")
        axes = _ints(ins[3], "axes") if len(ins) > 3 and ins[3] is not None else None
        steps = _ints(ins[4], "steps") if len(ins) > 4 and ins[4] is not None else None
    else:
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    rank = x.value.dim()
    axes = [_axis(a, rank) for a in (axes if axes is not None else range(len(starts)))]
    steps = steps or [1] * len(axes)
    index: list[Any] = [slice(None)] * rank
    for a, s, e, st in zip(axes, starts, ends, steps):
        if st == 0 or (st < 0 and not x.const):
            raise _Unsupported(f"step {st} is not supported on values of the input")
        if not x.const and a == 0:
            if s == 0 and e >= 2 ** 31 - 1 and st == 1:
                continue
            raise _Unsupported("it slices the batch dimension")
        n = x.shape[a]
        s, e = s + n if s < 0 else s, e + n if e < 0 else e
        if st > 0:
            index[a] = slice(min(max(s, 0), n), min(max(e, 0), n), st)
        else:  # backwards (constants only): ONNX clamps start to [0, n-1] and end to [-1, n-1], -1 = past index 0
            e = min(max(e, -1), n - 1)
            index[a] = slice(min(max(s, 0), n - 1), None if e < 0 else e, st)
    if x.const:
        return [_Val(_tensor(x.value.numpy()[tuple(index)]))]
    if all(i == slice(None) for i in index):
        return [x]
    return [b.fn(operator.getitem, x, tuple(index))]


@_op("Split")
def _split(b, ins, attrs, opset):
    x = ins[0]
    axis = _axis(int(attrs.get("axis", 0)), x.value.dim())
    sizes = _ints(ins[1], "split sizes") if len(ins) > 1 and ins[1] is not None else attrs.get("split")
    if sizes is None:
        parts = int(attrs.get("num_outputs", b.num_outputs))
        step = -(-x.shape[axis] // parts)
        sizes = [min(step, x.shape[axis] - i * step) for i in range(parts)]
    _keep_batch(x, [axis], "it splits along")
    out, start = [], 0
    for size in sizes:
        index = [slice(None)] * x.value.dim()
        index[axis] = slice(start, start + size)
        out.append(_Val(x.value[tuple(index)].clone()) if x.const else b.fn(operator.getitem, x, tuple(index)))
        start += size
    return out


@_op("Pad")
def _pad(b, ins, attrs, opset):
    x = ins[0]
    rank = x.value.dim()
    if len(ins) > 1:
        pads = _ints(ins[1], "pads")
        value = float(ins[2].value) if len(ins) > 2 and ins[2] is not None else 0.0
        axes = _ints(ins[3], "axes") if len(ins) > 3 and ins[3] is not None else None
    else:
        pads, value, axes = list(attrs["pads"]), float(attrs.get("value", 0.0)), None
    axes = [_axis(a, rank) for a in axes] if axes is not None else list(range(rank))
    full = [0] * (2 * rank)
    for i, a in enumerate(axes):
        full[a], full[a + rank] = pads[i], pads[i + len(axes)]
    if any(p < 0 for p in full):
        raise _Unsupported("negative pads (cropping) are not supported")
    _keep_batch(x, [a for a in range(rank) if full[a] or full[a + rank]], "it pads")
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(attrs.get("mode", "constant"))
    if mode is None:
        raise _Unsupported(f"pad mode {attrs.get('mode')!r} is not supported")
    first = min([a for a in range(rank) if full[a] or full[a + rank]], default=rank - 1)
    torch_pads: list[int] = []
    for a in range(rank - 1, first - 1, -1):
        torch_pads += [full[a], full[a + rank]]
    if x.const:
        return [_Val(F.pad(x.value, torch_pads, mode=mode, value=value if mode == "constant" else None))]
    if mode == "constant":
        return [b.fn(F.pad, x, tuple(torch_pads), "constant", value)]
    return [b.fn(F.pad, x, tuple(torch_pads), mode)]


_REDUCE = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax, "ReduceMin": torch.amin}


@_op(*_REDUCE)
def _reduce(b, ins, attrs, opset):
    x = ins[0]
    axes = _ints(ins[1], "axes") if len(ins) > 1 and ins[1] is not None else attrs.get("axes")
    keep = bool(attrs.get("keepdims", 1))
    rank = x.value.dim()
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(rank))
    axes = sorted(_axis(a, rank) for a in axes)
    if x.const:
        return [_Val(_REDUCE[b.op_type](x.value, dim=tuple(axes), keepdim=keep))]
    _keep_batch(x, axes, "it reduces over")
    if b.op_type == "ReduceMean" and axes == [2, 3] and rank == 4 and keep:
        return [b.module(nn.AdaptiveAvgPool2d(1), x)]
    return [b.fn(_REDUCE[b.op_type], x, tuple(axes), keep)]


@_op("LayerNormalization")
def _layer_norm(b, ins, attrs, opset):
    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    if not scale.const or (bias is not None and not bias.const):
        raise _Unsupported("its scale and bias are computed from the input")
    axis = _axis(int(attrs.get("axis", -1)), x.value.dim())
    _keep_batch(x, [axis], "it normalises over")
    shape = tuple(x.shape[axis:])
    return [b.fn(F.layer_norm, x, shape, _Val(scale.value.expand(shape).contiguous()),
                 None if bias is None else _Val(bias.value.expand(shape).contiguous()),
                 float(attrs.get("epsilon", 1e-5)))]


SUPPORTED_OPS = tuple(sorted(_OPS))


# ---- the whole graph --------------------------------------------------------------------------------------------

@dataclass
class OnnxConversion:
    """An ONNX model rebuilt in torch.

    Attributes:
        module: ``module(x)`` with x ``[N, C, H, W]`` returns the ONNX graph's outputs (all of them, in order).
        outputs: the ONNX output names, in the order ``module`` returns them.
        input_name: the ONNX input's name; input_layout: "NCHW" or "NHWC" (what the ONNX input takes).
        input_shape: (C, H, W); batch: the ONNX input's fixed batch size, or None when dynamic.
    """

    module: fx.GraphModule
    builder: _Builder
    values: dict[str, _Val]
    outputs: list[str]
    input_name: str
    input_layout: str
    input_shape: tuple[int, int, int]
    batch: int | None
    source: str


def load_onnx(path: str | Path) -> Any:
    """The ONNX ModelProto in ``path`` (external data next to it is read too); UsageError in one line."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"ONNX file {p} does not exist; give the .onnx file the network was exported to")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # protobuf DecodeError, missing external data...: any reader error
        raise UsageError(f"cannot read {p} as an ONNX model ({type(exc).__name__}: "
                         f"{clip(str(exc), 120)}); export the network to ONNX again") from None
    if not model.graph.node:
        raise UsageError(f"{p} holds no ONNX graph (no nodes); export the network to ONNX again")
    return model


def _input_dims(model: Any, source: str) -> tuple[Any, list[int | None]]:
    from onnx import TensorProto

    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UsageError(f"{source} takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); an early-exit "
                         "network takes one image tensor")
    inp = inputs[0]
    ttype = inp.type.tensor_type
    if ttype.elem_type != TensorProto.FLOAT:
        raise UsageError(f"{source} input {inp.name!r} is not float32 (ONNX type {ttype.elem_type}); export the "
                         "network with a float32 image input")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in ttype.shape.dim]
    if len(dims) != 4:
        raise UsageError(f"{source} input {inp.name!r} has rank {len(dims)}; an image network takes "
                         "[N, C, H, W] (or [N, H, W, C] with input_layout='NHWC')")
    return inp, dims


def _show(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _resolve_input(dims: list[int | None], input_shape: Sequence[int] | None, layout: str | None, source: str,
                   name: str) -> tuple[tuple[int, int, int], str]:
    """(C, H, W) and the ONNX input's layout, from the declared dims and what the user said."""
    if layout is not None:
        layout = layout.upper()
        if layout not in LAYOUTS:
            raise UsageError(f"input_layout={layout!r}; expected NCHW or NHWC")
    in_dims = dims[1:]

    def fits(shape: Sequence[int], lay: str) -> bool:
        c, h, w = shape
        want = (c, h, w) if lay == "NCHW" else (h, w, c)
        return all(d is None or d == v for d, v in zip(in_dims, want))

    if input_shape is None:
        if None in in_dims:
            raise UsageError(f"{source} input {name!r} has the dynamic shape {_show(dims)}; give the shape it takes: "
                             "input_shape=(C, H, W) (--input-shape C,H,W)")
        lays = [layout] if layout else [lay for lay, c in (("NCHW", in_dims[0]), ("NHWC", in_dims[2])) if c in (1, 3)]
        channels = in_dims[0] if lays and lays[0] == "NCHW" else in_dims[2]
        if len(lays) == 1 and channels not in (1, 3):
            other = "NHWC" if lays[0] == "NCHW" else "NCHW"
            raise UsageError(f"{source} input {name!r} {_show(dims)} read as {lays[0]} has {channels} channels, not 1 "
                             f"or 3; if it is {other}, say so: input_layout={other!r} (--input-layout "
                             f"{other.lower()})")
        if len(lays) != 1:
            raise UsageError(f"cannot tell whether {source} input {name!r} {_show(dims)} is NCHW or NHWC; give "
                             "input_layout (--input-layout nchw or nhwc)")
        lay = lays[0]
        shape = tuple(in_dims) if lay == "NCHW" else (in_dims[2], in_dims[0], in_dims[1])
        return shape, lay  # type: ignore[return-value]
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3:
        return shape, layout or "NCHW"  # _check_args says what is wrong
    lays = [layout] if layout else [lay for lay in LAYOUTS if fits(shape, lay)]
    if not lays or not fits(shape, lays[0]):
        c, h, w = shape
        want = f"[N, {c}, {h}, {w}] (NCHW)" if layout != "NHWC" else f"[N, {h}, {w}, {c}] (NHWC)"
        other = "" if layout else f" nor [N, {h}, {w}, {c}] (NHWC)"
        raise UsageError(f"{source} input {name!r} is {_show(dims)}, which input_shape {list(shape)} does not fit: "
                         f"expected {want}{other}; give the (C, H, W) the network was exported with")
    if len(lays) > 1:
        raise UsageError(f"cannot tell whether {source} input {name!r} {_show(dims)} is NCHW or NHWC for input_shape "
                         f"{list(shape)}; give input_layout (--input-layout nchw or nhwc)")
    return shape, lays[0]  # type: ignore[return-value]


def onnx_to_torch(path: str | Path, input_shape: Sequence[int] | None = None,
                  input_layout: str | None = None) -> OnnxConversion:
    """Rebuild the ONNX model in ``path`` as a torch.fx GraphModule taking ``[N, C, H, W]`` images.

    Raises:
        UsageError: a missing or unreadable file, or an input that is not one image tensor of a known shape.
        ConversionError: operators (or uses of them) that cannot be rebuilt, named in one line.
    """
    from onnx import numpy_helper

    source = Path(path).name
    model = load_onnx(path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    inp, dims = _input_dims(model, source)
    shape, layout = _resolve_input(dims, input_shape, input_layout, source, inp.name)
    _check_args(shape, 0.0, 1.0, None, None, "softmax")  # the (C, H, W) itself
    batch = dims[0]
    if batch is not None and batch != 1:
        raise UsageError(f"{source} input {inp.name!r} has the fixed batch size {batch}; export it with batch 1 or a "
                         "dynamic batch axis")
    unknown: dict[str, str] = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _OPS:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            unknown.setdefault(key, node.name)
    if unknown:
        shown = ", ".join(f"{op} (node {name!r})" if name else op for op, name in list(unknown.items())[:6])
        raise ConversionError(f"{source} uses ONNX operators edgeexit cannot convert: {shown}; supported: "
                              f"{', '.join(SUPPORTED_OPS)}; export the network without them")

    b = _Builder()
    c, h, w = shape
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0))
    placeholder = b.graph.placeholder("x")
    values: dict[str, _Val] = {}
    image = _Val(x, placeholder)
    if layout == "NHWC":
        b.node_name = "to_nhwc"
        image = b.fn(torch.permute, image, (0, 2, 3, 1))
        image.permuted = (_Val(x, placeholder), (0, 2, 3, 1))
    values[inp.name] = image
    for init in model.graph.initializer:
        values[init.name] = _Val(_tensor(numpy_helper.to_array(init)))
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = [o.name for o in model.graph.output]
    for name in outputs:
        consumers.setdefault(name, []).append(None)
    fused: dict[int, str] = {}  # id of an Add folded into the MatMul before it -> that MatMul's output
    for i, node in enumerate(model.graph.node):
        if id(node) in fused:
            values[node.output[0]] = values[fused[id(node)]]
            continue
        b.op_type = node.op_type
        b.num_outputs = len(node.output)
        b.node_name = _identifier(node.name, f"{node.op_type.lower()}_{i}")
        b.bias, b.bias_used = None, False
        add = consumers.get(node.output[0], []) if node.op_type == "MatMul" else []
        if len(add) == 1 and add[0] is not None and add[0].op_type == "Add" and len(add[0].input) == 2:
            other = values.get(next(n for n in add[0].input if n != node.output[0]) if add[0].input[0] !=
                               add[0].input[1] else "")
            if other is not None and other.const and other.value.is_floating_point() and other.value.dim() <= 2 \
                    and math.prod(other.shape[:-1]) == 1:
                b.bias = other.value.reshape(-1)
        try:
            ins = [values[n] if n else None for n in node.input]
        except KeyError as exc:
            raise UsageError(f"{source}: node {node.name!r} reads {exc.args[0]!r}, which nothing computes; the "
                             "ONNX graph is broken: export it again") from None
        while ins and ins[-1] is None:
            ins.pop()
        attrs = _attributes(node)
        region = next((v.region for v in ins if v is not None and v.region is not None), None)
        if region is None and node.op_type == "Transpose" and ins and not ins[0].const and ins[0].value.dim() == 4:
            perm = [int(p) for p in attrs.get("perm", [3, 2, 1, 0])]
            if perm[0] != 0:  # the start of a lowered adaptive average pool, or an error if nothing matches
                region = _PoolRegion(ins[0], f"{source}: node {node.name or i!r} (Transpose) cannot be converted: "
                                              f"perm {perm} moves the batch dimension; export the network without it")
                ins = [_Val(ins[0].value)]
        if region is not None and any(v is not None and not v.const and v.region is None for v in ins):
            raise ConversionError(region.error)
        try:
            outs = _OPS[node.op_type](b, ins, attrs, opset)
        except _Unsupported as exc:
            raise ConversionError(f"{source}: node {node.name or i!r} ({node.op_type}) cannot be converted: {exc}; "
                                  "export the network without it") from None
        except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as exc:
            raise ConversionError(f"{source}: node {node.name or i!r} ({node.op_type}) failed on the input shape "
                                  f"{list(shape)} ({type(exc).__name__}: {clip(str(exc), 150)}); give "
                                  "the input shape it was exported with") from None
        if b.bias_used:
            fused[id(add[0])] = node.output[0]
        if region is not None:
            outs = [None if v is None else _pooled(b, v, region) for v in outs]
        for name, val in zip(node.output, outs):
            if name and val is not None:
                values[name] = val
            elif name and consumers.get(name):
                raise ConversionError(f"{source}: node {node.name or i!r} ({node.op_type}) output {name!r} is used "
                                      "but not supported; export the network without it")
    for name in outputs:
        if values[name].region is not None:
            raise ConversionError(values[name].region.error)
        if values[name].const:
            raise UsageError(f"{source} output {name!r} does not depend on the input (a constant); export only the "
                             "exits' outputs")
    b.root.eval()
    gm = _graph_module(b, tuple(values[n].node for n in outputs))
    return OnnxConversion(gm, b, values, outputs, inp.name, layout, shape, batch, source)


def _pooled(b: _Builder, v: _Val, region: _PoolRegion) -> _Val:
    """``v`` as an ``nn.AdaptiveAvgPool2d`` of the region's source when it equals one on the example input, else
    ``v`` marked as inside the region."""
    src = region.source
    value = v.value
    if value.dim() == 4 and value.is_floating_point() and list(value.shape[:2]) == src.shape[:2] \
            and value.shape[2] <= src.shape[2] and value.shape[3] <= src.shape[3]:
        out_hw = (int(value.shape[2]), int(value.shape[3]))
        if torch.allclose(value, F.adaptive_avg_pool2d(src.value, out_hw), rtol=1e-5, atol=1e-6):
            log.info("%s: torch's lowering of adaptive average pooling %s -> %s rebuilt as one pool", b.node_name,
                     tuple(src.shape[2:]), out_hw)
            return b.module(nn.AdaptiveAvgPool2d(out_hw), src)
    return _Val(value, None, region=region)


def _graph_module(b: _Builder, result: Any) -> fx.GraphModule:
    """A GraphModule of a copy of the built graph returning ``result`` (nodes of the built graph, nested)."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    g.graph_copy(b.graph, env)
    g.output(fx.node.map_arg(result, lambda n: env[n]))
    gm = fx.GraphModule(b.root, g, class_name="OnnxNetwork")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm.eval()


def check_against_onnxruntime(conv: OnnxConversion, path: str | Path, samples: int = ORT_SAMPLES,
                              seed: int = 0) -> float | None:
    """Largest difference (relative to max(1, |output|)) of ``conv.module`` against onnxruntime on random inputs.

    Returns None (with a warning in the log) when onnxruntime is not installed.

    Raises:
        ConversionError: an output differs by more than :data:`ORT_TOLERANCE`.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is not installed: the torch rebuild of %s is not compared with it", conv.source)
        return None
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime refuses the model: any of its error types
        raise UsageError(f"onnxruntime cannot load {conv.source} ({type(exc).__name__}: "
                         f"{clip(str(exc), 160)}); export a valid ONNX model") from None
    x = torch.randn(samples, *conv.input_shape, generator=torch.Generator().manual_seed(seed))
    feed = x.permute(0, 2, 3, 1) if conv.input_layout == "NHWC" else x
    feed = feed.contiguous().numpy()
    try:
        if conv.batch is None:
            want = session.run(conv.outputs, {conv.input_name: feed})
        else:  # a fixed batch of 1: one input at a time
            runs = [session.run(conv.outputs, {conv.input_name: feed[i:i + 1]}) for i in range(samples)]
            want = [np.concatenate([r[k] for r in runs]) for k in range(len(conv.outputs))]
    except Exception as exc:  # onnxruntime fails on the declared input: any of its error types
        raise UsageError(f"onnxruntime cannot run {conv.source} on [N, {', '.join(map(str, conv.input_shape))}] "
                         f"({conv.input_layout}) ({type(exc).__name__}: {clip(str(exc), 160)}); give "
                         "the input shape it was exported with") from None
    with torch.no_grad():
        got = conv.module(x)
    worst = 0.0
    for name, ref, mine in zip(conv.outputs, want, got):
        mine = mine.numpy()
        if ref.shape != mine.shape or not np.isfinite(mine).all():
            raise ConversionError(f"{conv.source} output {name!r}: the torch rebuild gives shape {list(mine.shape)}, "
                                  f"onnxruntime {list(ref.shape)}; the graph uses the batch in a way edgeexit cannot "
                                  "follow: export it with the batch as every value's first axis")
        scale = max(1.0, float(np.abs(ref).max()))
        err = float(np.abs(ref - mine).max()) / scale
        worst = max(worst, err)
        if err > ORT_TOLERANCE:
            raise ConversionError(f"{conv.source} output {name!r}: the torch rebuild differs from onnxruntime by "
                                  f"{err:.3g} (relative; allowed {ORT_TOLERANCE:g}); an operator is not rebuilt "
                                  "faithfully: export the network without unusual operators")
    return worst


# ---- outputs -> exits --------------------------------------------------------------------------------------------

def _group_exits(conv: OnnxConversion, outputs: Sequence[str] | None, confidence: str | None
                 ) -> list[tuple[str | None, str]]:
    """(confidence output or None, logits output) per exit, from output shapes and order."""
    source = conv.source
    names = list(conv.outputs) if outputs is None else [str(n) for n in outputs]
    missing = [n for n in names if n not in conv.values]
    if missing:
        raise UsageError(f"outputs names {missing[0]!r}, which {source} does not compute; its outputs: "
                         f"{', '.join(conv.outputs)}")
    if len(set(names)) != len(names):
        raise UsageError(f"outputs names {min(n for n in names if names.count(n) > 1)!r} twice; name each "
                         "exit output once")
    kinds = []
    for n in names:
        v = conv.values[n]
        s = v.shape
        if v.const:
            raise UsageError(f"{source} value {n!r} does not depend on the input (a constant); name exit outputs")
        if len(s) == 1 or (len(s) == 2 and s[1] == 1):
            kinds.append("confidence")
        elif len(s) == 2:
            kinds.append("logits")
        else:
            raise UsageError(f"{source} output {n!r} has shape {_show([None] + s[1:])}; every exit output is logits "
                             "[N, K] or a confidence [N, 1]: export only the exits' outputs, or name them with "
                             "outputs=[...] (--outputs)")
    exits: list[tuple[str | None, str]] = []
    i = 0
    while i < len(names):
        if kinds[i] == "logits":
            exits.append((None, names[i]))
            i += 1
        elif i + 1 < len(names) and kinds[i + 1] == "logits":
            exits.append((names[i], names[i + 1]))
            i += 2
        else:
            after = f"is followed by the confidence {names[i + 1]!r}" if i + 1 < len(names) else "is the last output"
            shape = _show([None] + conv.values[names[i]].shape[1:])
            raise UsageError(f"{source} output {names[i]!r} is a confidence {shape} "
                             f"that {after}; a confidence comes right before its exit's logits: give the outputs in "
                             "the order conf0,logits0,conf1,logits1,... with outputs=[...] (--outputs)")
    _check_pairs(conv, names, exits)
    has_conf = any(c is not None for c, _ in exits)
    if has_conf and confidence is None:
        first = next(c for c, _ in exits if c is not None)
        raise UsageError(f"{source} output {first!r} is an exit's confidence; declare what it is: "
                         "confidence='probability' (a sigmoid output) or confidence='logit' (pre-sigmoid) "
                         "(--confidence probability or logit)")
    if confidence is not None and not has_conf:
        raise UsageError(f"confidence={confidence!r} declared, but {source}'s outputs {', '.join(names)} are the "
                         f"logits of {len(exits)} exits, none a confidence [N, 1]; drop confidence (--confidence), or "
                         "export each exit as (confidence, logits)")
    if len(exits) < 2:
        raise UsageError(f"{source} outputs {', '.join(names)} make {len(exits)} exit; an early-exit network has at "
                         "least 2 (the early exits and the final classifier): export every exit's output")
    return exits


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += n.all_input_nodes
    return seen


def _check_pairs(conv: OnnxConversion, names: list[str], exits: list[tuple[str | None, str]]) -> None:
    """UsageError when a confidence is computed where the logits before it are rather than the logits after it
    (outputs given as (logits, confidence) pairs would otherwise pair each confidence with the next exit)."""
    for conf, logits in exits:
        if conf is None:
            continue
        i = names.index(conf)
        if i == 0 or conv.values[names[i - 1]].shape[-1] == 1 or len(conv.values[names[i - 1]].shape) == 1:
            continue
        before = names[i - 1]
        anc = {n: _ancestors(conv.values[n].node) for n in (conf, logits, before)}
        if len(anc[conf] ^ anc[before]) < len(anc[conf] ^ anc[logits]):
            raise UsageError(f"{conv.source} output {conf!r} comes right before {logits!r}, but is computed where "
                             f"{before!r} is (the output before it): a confidence comes right before its exit's "
                             "logits: give the outputs in the order conf0,logits0,conf1,logits1,... with "
                             "outputs=[...] (--outputs)")


def _exits_module(conv: OnnxConversion, exits: list[tuple[str | None, str]]) -> fx.GraphModule:
    """A GraphModule on the same layers returning one output per exit: logits or (confidence, logits)."""
    result = []
    for conf, logits in exits:
        v = conv.values[logits]
        if v.softmax_of is not None and not v.softmax_of.const:
            log.info("%s: exit output %r is a softmax; the logits before it are used", conv.source, logits)
            v = v.softmax_of
        result.append(v.node if conf is None else (conv.values[conf].node, v.node))
    return _graph_module(conv.builder, tuple(result))


def stage_onnx(path: str | Path, input_shape: Sequence[int] | None = None, mean: Sequence[float] | float = 0.0,
               std: Sequence[float] | float = 1.0, labels: Sequence[str] | None = None, color_mode: str | None = None,
               confidence: str | None = None, scores: str = "softmax", outputs: Sequence[str] | None = None,
               input_layout: str | None = None, name: str | None = None) -> StagedModel:
    """Cut the multi-output ONNX early-exit network in ``path`` into a :class:`StagedModel` ready for ``convert``.

    Args:
        path: the .onnx file; its outputs follow the head contract of this module's docstring (one output per
            exit, logits ``[N, K]``, or a confidence ``[N, 1]`` right before its exit's logits).
        input_shape: (C, H, W) the network takes, C = 1 or 3 (default: read from the ONNX input when static).
        mean, std: per-channel (or one) normalisation the network was trained with: it sees
            ``(pixel / 255 - mean) / std`` (a model that normalises inside takes mean 0, std 1/255).
        labels: class names, one per logit (default "0".."K-1").
        color_mode: "L" or "RGB" (default from C).
        confidence: "probability" (a sigmoid output) or "logit"; needed only when exits have confidences.
        scores: "softmax" or "sigmoid" (independent per-class scores).
        outputs: the ONNX outputs (or other values) to use as exit outputs, in exit order (default: every
            graph output, in order).
        input_layout: "NCHW" or "NHWC", the ONNX input's layout (default: the one the declared input fits).
        name: the model's name in the bundle (default: the file's name without .onnx).

    Returns:
        A StagedModel with one stage per exit whose exits equal the ONNX model's (the torch rebuild is compared
        with onnxruntime, the stages with the rebuild, both on random inputs).

    Raises:
        UsageError: a missing or unreadable file, an input or outputs that break the head contract (one line).
        ConversionError: operators that cannot be rebuilt, a rebuild that differs from onnxruntime, or a network
            that cannot be cut.
    """
    if confidence is not None and confidence not in CONFIDENCE_KINDS:
        raise UsageError(f"confidence={confidence!r}; expected one of {', '.join(CONFIDENCE_KINDS)} or None")
    conv = onnx_to_torch(path, input_shape, input_layout)
    _check_args(conv.input_shape, mean, std, color_mode, confidence, scores)
    exits = _group_exits(conv, outputs, confidence)
    worst = check_against_onnxruntime(conv, path)
    if worst is not None:
        log.info("%s rebuilt in torch: largest difference to onnxruntime %.2g (relative)", conv.source, worst)
    net = _exits_module(conv, exits)
    staged = stage_network(net, conv.input_shape, mean, std, labels=labels, color_mode=color_mode,
                           confidence=confidence, scores=scores, name=name or Path(path).stem)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    extra = dict(staged.spec.extra)
    extra.pop("class", None)
    extra.update(source="onnx file", onnx=conv.source, onnx_sha256=digest, input_layout=conv.input_layout,
                 exit_outputs=[[c, lg] if c else lg for c, lg in exits])
    staged.spec.extra = extra
    return staged
