"""Reading and checking .tflite files without an interpreter, and counting their MACs.

:func:`read_model` walks the TFLite flatbuffer (``schema.fbs``: Model, OperatorCode, SubGraph, Tensor,
QuantizationParameters, Operator, Buffer) with every offset, length and index checked against the file
before it is used, then checks what the interpreter would otherwise trust blindly:

* one subgraph; version 3; known operators, none that calls subgraphs, holds state or is random (the only
  custom operator is the Edge TPU's);
* every tensor: a known type, dimensions >= 1 (at most :data:`MAX_ELEMENTS` elements), its buffer index in
  range, constant data exactly ``elements * itemsize`` bytes, no sparsity, quantization with finite positive
  scales and zero points the type can hold (one per channel along an in-range dimension; zero for per-channel
  and wider-than-8-bit tensors);
* every operator: its op code in range, tensor indices in range, every input present (only biases and
  RESHAPE's shape are optional), each input either a graph input, the output of an earlier operator, or
  constant data (filters, weights and biases must be constant data), outputs produced once and never
  constant, and sane strides, dilations, padding and activation values for convolutions and pooling.

A file that breaks any rule is refused with a one-line :class:`~edgeexit.errors.BundleError` before an
interpreter sees it. A reader of our own, not the ``tflite`` package or an interpreter's generated schema
module: Python's flatbuffers library has no verifier, so generated readers follow hostile offsets anywhere
(``struct.unpack_from`` with a negative offset silently reads from the end of the file), and this one needs
nothing outside the standard library and numpy, in every environment edgeexit runs in.

MACs (one input, batch 1), per op:

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

import math
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from ..errors import BundleError, printable
from .files import read_regular

#: Largest .tflite file read (bytes); edgeexit's stage files are kilobytes to a few megabytes.
MAX_FILE_BYTES = 512 << 20
#: Largest tensor, in elements.
MAX_ELEMENTS = 1 << 28
#: Smallest normal float32: smaller (subnormal) scales are no quantization a converter writes.
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
#: Largest stride, dilation or pooling window accepted.
MAX_WINDOW = 1 << 16

#: Ops whose multiply-accumulates are counted.
MAC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV")

#: schema.fbs ``BuiltinOperator``: operator code -> name (the schema's order, codes 0..209).
OP_NAMES: tuple[str, ...] = tuple("""
ADD AVERAGE_POOL_2D CONCATENATION CONV_2D DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE EMBEDDING_LOOKUP FLOOR
FULLY_CONNECTED HASHTABLE_LOOKUP L2_NORMALIZATION L2_POOL_2D LOCAL_RESPONSE_NORMALIZATION LOGISTIC LSH_PROJECTION
LSTM MAX_POOL_2D MUL RELU RELU_N1_TO_1 RELU6 RESHAPE RESIZE_BILINEAR RNN SOFTMAX SPACE_TO_DEPTH SVDF TANH
CONCAT_EMBEDDINGS SKIP_GRAM CALL CUSTOM EMBEDDING_LOOKUP_SPARSE PAD UNIDIRECTIONAL_SEQUENCE_RNN GATHER
BATCH_TO_SPACE_ND SPACE_TO_BATCH_ND TRANSPOSE MEAN SUB DIV SQUEEZE UNIDIRECTIONAL_SEQUENCE_LSTM STRIDED_SLICE
BIDIRECTIONAL_SEQUENCE_RNN EXP TOPK_V2 SPLIT LOG_SOFTMAX DELEGATE BIDIRECTIONAL_SEQUENCE_LSTM CAST PRELU MAXIMUM
ARG_MAX MINIMUM LESS NEG PADV2 GREATER GREATER_EQUAL LESS_EQUAL SELECT SLICE SIN TRANSPOSE_CONV SPARSE_TO_DENSE
TILE EXPAND_DIMS EQUAL NOT_EQUAL LOG SUM SQRT RSQRT SHAPE POW ARG_MIN FAKE_QUANT REDUCE_PROD REDUCE_MAX PACK
LOGICAL_OR ONE_HOT LOGICAL_AND LOGICAL_NOT UNPACK REDUCE_MIN FLOOR_DIV REDUCE_ANY SQUARE ZEROS_LIKE FILL FLOOR_MOD
RANGE RESIZE_NEAREST_NEIGHBOR LEAKY_RELU SQUARED_DIFFERENCE MIRROR_PAD ABS SPLIT_V UNIQUE CEIL REVERSE_V2 ADD_N
GATHER_ND COS WHERE RANK ELU REVERSE_SEQUENCE MATRIX_DIAG QUANTIZE MATRIX_SET_DIAG ROUND HARD_SWISH IF WHILE
NON_MAX_SUPPRESSION_V4 NON_MAX_SUPPRESSION_V5 SCATTER_ND SELECT_V2 DENSIFY SEGMENT_SUM BATCH_MATMUL
PLACEHOLDER_FOR_GREATER_OP_CODES CUMSUM CALL_ONCE BROADCAST_TO RFFT2D CONV_3D IMAG REAL COMPLEX_ABS HASHTABLE
HASHTABLE_FIND HASHTABLE_IMPORT HASHTABLE_SIZE REDUCE_ALL CONV_3D_TRANSPOSE VAR_HANDLE READ_VARIABLE
ASSIGN_VARIABLE BROADCAST_ARGS RANDOM_STANDARD_NORMAL BUCKETIZE RANDOM_UNIFORM MULTINOMIAL GELU
DYNAMIC_UPDATE_SLICE RELU_0_TO_1 UNSORTED_SEGMENT_PROD UNSORTED_SEGMENT_MAX UNSORTED_SEGMENT_SUM ATAN2
UNSORTED_SEGMENT_MIN SIGN BITCAST BITWISE_XOR RIGHT_SHIFT STABLEHLO_LOGISTIC STABLEHLO_ADD STABLEHLO_DIVIDE
STABLEHLO_MULTIPLY STABLEHLO_MAXIMUM STABLEHLO_RESHAPE STABLEHLO_CLAMP STABLEHLO_CONCATENATE
STABLEHLO_BROADCAST_IN_DIM STABLEHLO_CONVOLUTION STABLEHLO_SLICE STABLEHLO_CUSTOM_CALL STABLEHLO_REDUCE
STABLEHLO_ABS STABLEHLO_AND STABLEHLO_COSINE STABLEHLO_EXPONENTIAL STABLEHLO_FLOOR STABLEHLO_LOG STABLEHLO_MINIMUM
STABLEHLO_NEGATE STABLEHLO_OR STABLEHLO_POWER STABLEHLO_REMAINDER STABLEHLO_RSQRT STABLEHLO_SELECT
STABLEHLO_SUBTRACT STABLEHLO_TANH STABLEHLO_SCATTER STABLEHLO_COMPARE STABLEHLO_CONVERT STABLEHLO_DYNAMIC_SLICE
STABLEHLO_DYNAMIC_UPDATE_SLICE STABLEHLO_PAD STABLEHLO_IOTA STABLEHLO_DOT_GENERAL STABLEHLO_REDUCE_WINDOW
STABLEHLO_SORT STABLEHLO_WHILE STABLEHLO_GATHER STABLEHLO_TRANSPOSE DILATE STABLEHLO_RNG_BIT_GENERATOR
REDUCE_WINDOW STABLEHLO_COMPOSITE STABLEHLO_SHIFT_LEFT STABLEHLO_CBRT STABLEHLO_CASE
""".split())
#: Operators a bundle may not use: they call other subgraphs, hold state or resources, or are random.
REFUSED_OPS = frozenset({
    "CALL", "IF", "WHILE", "CALL_ONCE", "DELEGATE", "PLACEHOLDER_FOR_GREATER_OP_CODES", "VAR_HANDLE",
    "READ_VARIABLE", "ASSIGN_VARIABLE", "HASHTABLE", "HASHTABLE_FIND", "HASHTABLE_IMPORT", "HASHTABLE_SIZE",
    "RANDOM_STANDARD_NORMAL", "RANDOM_UNIFORM", "MULTINOMIAL", "STABLEHLO_WHILE", "STABLEHLO_CASE",
    "STABLEHLO_COMPOSITE", "STABLEHLO_CUSTOM_CALL", "STABLEHLO_RNG_BIT_GENERATOR"})
#: Custom operators a bundle may use: the Edge TPU compiler's.
CUSTOM_OPS = ("edgetpu-custom-op",)

#: schema.fbs ``TensorType`` -> numpy dtype name, for the types a bundle may hold.
TYPES: dict[int, str] = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16",
                         8: "complex64", 9: "int8", 10: "float64", 11: "complex128", 12: "uint64", 15: "uint32",
                         16: "uint16"}

#: Operator -> (options table of schema.fbs ``BuiltinOptions``, its field indices of padding, stride_w,
#: stride_h, fused activation, dilation_w, dilation_h, filter_w, filter_h; -1 = the table has no such field).
_WINDOW_OPTIONS: dict[str, tuple[int, tuple[int, ...]]] = {
    "CONV_2D": (1, (0, 1, 2, 3, 4, 5, -1, -1)),
    "DEPTHWISE_CONV_2D": (2, (0, 1, 2, 4, 5, 6, -1, -1)),
    "AVERAGE_POOL_2D": (5, (0, 1, 2, 5, -1, -1, 3, 4)),
    "MAX_POOL_2D": (5, (0, 1, 2, 5, -1, -1, 3, 4)),
    "TRANSPOSE_CONV": (49, (0, 1, 2, 3, -1, -1, -1, -1)),
}
#: Operator -> input positions that may be absent (-1): biases and RESHAPE's shape. Every other input of an
#: operator must be present (recurrent ops, whose many optional inputs bundles never use, are not listed).
_OPTIONAL_INPUTS: dict[str, tuple[int, ...]] = {
    "CONV_2D": (2,), "DEPTHWISE_CONV_2D": (2,), "FULLY_CONNECTED": (2,), "TRANSPOSE_CONV": (3,), "RESHAPE": (1,),
}
#: Operator -> input positions that must be constant data: filters, weights, biases.
_CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {
    "CONV_2D": (1, 2), "DEPTHWISE_CONV_2D": (1, 2), "FULLY_CONNECTED": (1, 2), "TRANSPOSE_CONV": (0, 1, 3),
}
#: Operator -> the fewest inputs it has.
_MIN_INPUTS = {"CONV_2D": 2, "DEPTHWISE_CONV_2D": 2, "FULLY_CONNECTED": 2, "TRANSPOSE_CONV": 3, "BATCH_MATMUL": 2}
#: Rank of the filter / weights of the MAC ops (input 1).
_WEIGHT_RANK = {"CONV_2D": 4, "DEPTHWISE_CONV_2D": 4, "FULLY_CONNECTED": 2, "TRANSPOSE_CONV": 4}


@dataclass(frozen=True)
class Quant:
    """A tensor's quantization as the file stores it (scales are float32 values)."""

    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    dimension: int


@dataclass(frozen=True)
class Tensor:
    """One tensor of the graph."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    buffer: int
    data_bytes: int      # bytes of constant data in its buffer (0: not a constant)
    quant: Quant | None
    variable: bool

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.elements * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Operator:
    """One operator: its name, input tensor indices (-1 = optional input absent) and output indices."""

    index: int
    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class Model:
    """The checked main subgraph of a .tflite file."""

    name: str
    tensors: tuple[Tensor, ...]
    operators: tuple[Operator, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    def tensor(self, name: str) -> Tensor | None:
        """The tensor called ``name`` (None when there is none)."""
        return next((t for t in self.tensors if t.name == name), None)

    @property
    def has_custom_ops(self) -> bool:
        return any(op.name.startswith("CUSTOM:") for op in self.operators)


class _Reader:
    """Bounds-checked access to a flatbuffer: every read refuses an offset outside the data."""

    def __init__(self, data: bytes, name: str):
        self.buf, self.n, self.name = memoryview(data), len(data), name

    def fail(self, what: str) -> "BundleError":
        return BundleError(f"{self.name}: not a valid TFLite model ({what}); the file is corrupt or was edited: "
                           "re-copy the bundle or re-create it with `edgeexit convert`")

    def get(self, fmt: str, pos: int) -> int | float:
        if pos < 0 or pos + struct.calcsize(fmt) > self.n:
            raise self.fail(f"offset {pos} outside the file")
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def table(self, pos: int) -> tuple[int, int, int, int]:
        """(table position, vtable position, vtable size, table size) of the table at ``pos``."""
        vt = pos - int(self.get("<i", pos))
        vsize, tsize = int(self.get("<H", vt)), int(self.get("<H", vt + 2))
        if vsize < 4 or vsize % 2 or vt + vsize > self.n or tsize < 4 or pos + tsize > self.n:
            raise self.fail(f"bad table at offset {pos}")
        if any(off >= tsize for off in struct.unpack_from(f"<{(vsize - 4) // 2}H", self.buf, vt + 4)):
            raise self.fail(f"a field of the table at offset {pos} lies outside it")
        return pos, vt, vsize, tsize

    def field(self, t: tuple[int, int, int, int], i: int, size: int) -> int | None:
        pos, vt, vsize, tsize = t
        if 4 + 2 * i >= vsize:
            return None
        off = int(self.get("<H", vt + 4 + 2 * i))
        if off == 0:
            return None
        if off + size > tsize:
            raise self.fail(f"field {i} of the table at offset {pos} overruns it")
        return pos + off

    def scalar(self, t: tuple[int, int, int, int], i: int, fmt: str, default: int | float) -> int | float:
        p = self.field(t, i, struct.calcsize(fmt))
        return default if p is None else self.get(fmt, p)

    def ref(self, t: tuple[int, int, int, int], i: int) -> int | None:
        """Where the offset field ``i`` points (None when absent)."""
        p = self.field(t, i, 4)
        return None if p is None else self._follow(p)

    def _follow(self, p: int) -> int:
        target = p + int(self.get("<I", p))
        if target + 4 > self.n:
            raise self.fail(f"offset at {p} points outside the file")
        return target

    def vector(self, t: tuple[int, int, int, int], i: int, fmt: str) -> tuple:
        v = self.ref(t, i)
        if v is None:
            return ()
        start, length = self._span(v, struct.calcsize(fmt))
        return struct.unpack_from(f"<{length}{fmt}", self.buf, start)

    def _span(self, v: int, esize: int) -> tuple[int, int]:
        length = int(self.get("<I", v))
        if v + 4 + length * esize > self.n:
            raise self.fail(f"vector at offset {v} ({length} elements) overruns the file")
        return v + 4, length

    def bytes_len(self, t: tuple[int, int, int, int], i: int) -> int:
        v = self.ref(t, i)
        return 0 if v is None else self._span(v, 1)[1]

    def tables(self, t: tuple[int, int, int, int], i: int) -> list[tuple[int, int, int, int]]:
        v = self.ref(t, i)
        if v is None:
            return []
        start, length = self._span(v, 4)
        return [self.table(self._follow(start + 4 * k)) for k in range(length)]

    def string(self, t: tuple[int, int, int, int], i: int) -> str:
        v = self.ref(t, i)
        if v is None:
            return ""
        start, length = self._span(v, 1)
        try:
            return bytes(self.buf[start:start + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"the string at offset {v} is not UTF-8") from None


def read_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a .tflite file (regular, at most :data:`MAX_FILE_BYTES`); BundleError otherwise."""
    return read_regular(path, MAX_FILE_BYTES, printable(os.path.basename(os.fspath(path))))


def read_model(data: bytes, name: str = "model.tflite") -> Model:
    """Parse and check a .tflite file's bytes (see the module docstring for every rule).

    Raises:
        BundleError: the file breaks a rule (one-line message naming the file).
    """
    r = _Reader(data, name)
    if r.n < 8 or bytes(r.buf[4:8]) != b"TFL3":
        raise r.fail("no TFL3 file identifier")
    model = r.table(int(r.get("<I", 0)))
    version = r.scalar(model, 0, "<I", 0)
    if version != 3:
        raise r.fail(f"schema version {version}, expected 3")
    op_names = [_op_name(r, code) for code in r.tables(model, 1)]
    buffers = []
    for k, b in enumerate(r.tables(model, 4)):
        if r.scalar(b, 1, "<Q", 0) > 1 or r.scalar(b, 2, "<Q", 0):
            raise r.fail(f"buffer {k} stores its data outside the flatbuffer, which bundles never do")
        buffers.append(r.bytes_len(b, 0))
    subgraphs = r.tables(model, 2)
    if len(subgraphs) != 1:
        raise r.fail(f"{len(subgraphs)} subgraphs, expected 1")
    sg = subgraphs[0]
    _check_extras(r, model, sg)
    tensors = tuple(_tensor(r, k, t, buffers) for k, t in enumerate(r.tables(sg, 0)))
    inputs = _indices(r, r.vector(sg, 1, "i"), len(tensors), "subgraph input")
    outputs = _indices(r, r.vector(sg, 2, "i"), len(tensors), "subgraph output")
    operators = tuple(_operator(r, k, op, op_names, tensors) for k, op in enumerate(r.tables(sg, 3)))
    _check_dataflow(r, tensors, operators, inputs, outputs)
    return Model(name=name, tensors=tensors, operators=operators, inputs=inputs, outputs=outputs)


def read_model_file(path: str | os.PathLike[str]) -> Model:
    """:func:`read_model` of a file (read with :func:`read_file`)."""
    return read_model(read_file(path), os.path.basename(os.fspath(path)))


def _check_extras(r: _Reader, model: tuple[int, int, int, int], sg: tuple[int, int, int, int]) -> None:
    """Bounds of what edgeexit does not use but the interpreter's own verifier reads: the description,
    metadata, signature definitions, tensors' shape signatures and min / max, and every operator's options."""
    r.bytes_len(model, 3)
    r.vector(model, 5, "i")
    for meta in r.tables(model, 6):
        r.bytes_len(meta, 0)
    for sig in r.tables(model, 7):
        for i in (0, 1):
            for tensor_map in r.tables(sig, i):
                r.bytes_len(tensor_map, 0)
        r.bytes_len(sig, 2)
    r.bytes_len(sg, 4)
    for t in r.tables(sg, 0):
        r.vector(t, 7, "i")
        q = r.ref(t, 4)
        if q is not None:
            qt = r.table(q)
            r.vector(qt, 0, "f")
            r.vector(qt, 1, "f")
    for op in r.tables(sg, 3):
        for i in (4, 12):
            v = r.ref(op, i)
            if v is not None:
                r.table(v)
        for i, fmt in ((5, "B"), (7, "B"), (8, "i")):
            r.vector(op, i, fmt)


def _op_name(r: _Reader, code: tuple[int, int, int, int]) -> str:
    builtin = max(int(r.scalar(code, 0, "<b", 0)), int(r.scalar(code, 3, "<i", 0)))
    name = OP_NAMES[builtin] if 0 <= builtin < len(OP_NAMES) else None
    if name is None or name in REFUSED_OPS:
        raise r.fail(f"operator {name or builtin} is not one edgeexit bundles may use")
    if name == "CUSTOM":
        custom = r.string(code, 1)
        if custom not in CUSTOM_OPS:
            raise r.fail(f"custom operator {custom[:40]!r} is not one edgeexit bundles use")
        return f"CUSTOM:{custom}"
    return name


def _indices(r: _Reader, values: Iterable[int], count: int, what: str, optional: bool = False) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    for v in out:
        if not (0 <= v < count or (optional and v == -1)):
            raise r.fail(f"{what} refers to tensor {v}; the graph has {count}")
    return out


def _tensor(r: _Reader, k: int, t: tuple[int, int, int, int], buffers: list[int]) -> Tensor:
    shape = tuple(int(v) for v in r.vector(t, 0, "i"))
    type_code = int(r.scalar(t, 1, "<b", 0))
    dtype = TYPES.get(type_code)
    if dtype is None:
        raise r.fail(f"tensor {k} has type code {type_code}, which bundles never use")
    if any(d < 1 for d in shape) or math.prod(shape) > MAX_ELEMENTS:
        raise r.fail(f"tensor {k} has shape {list(shape)}; every dimension must be >= 1 (at most {MAX_ELEMENTS} "
                     "elements)")
    buffer = int(r.scalar(t, 2, "<I", 0))
    if buffer >= len(buffers):
        raise r.fail(f"tensor {k} refers to buffer {buffer}; the file has {len(buffers)}")
    if r.ref(t, 6) is not None:
        raise r.fail(f"tensor {k} is sparse, which bundles never are")
    tensor = Tensor(index=k, name=r.string(t, 3), shape=shape, dtype=dtype, buffer=buffer, data_bytes=buffers[buffer],
                    quant=_quant(r, k, t, shape, dtype), variable=bool(r.scalar(t, 5, "<B", 0)))
    if tensor.data_bytes and tensor.data_bytes != tensor.nbytes:
        raise r.fail(f"tensor {k} ({tensor.name[:40]!r}) holds {tensor.data_bytes} bytes of data, its shape "
                     f"{list(shape)} and type {dtype} need {tensor.nbytes}")
    return tensor


def _quant(r: _Reader, k: int, t: tuple[int, int, int, int], shape: tuple[int, ...], dtype: str) -> Quant | None:
    qpos = r.ref(t, 4)
    if qpos is None:
        return None
    q = r.table(qpos)
    if r.scalar(q, 4, "<B", 0):
        raise r.fail(f"tensor {k} uses custom quantization details, which bundles never do")
    scales = tuple(float(v) for v in r.vector(q, 2, "f"))
    zero_points = tuple(int(v) for v in r.vector(q, 3, "q"))
    if not scales and not zero_points:
        return None  # min/max only (float tensors): no quantization in effect
    dim = int(r.scalar(q, 6, "<i", 0))
    if len(zero_points) != len(scales) or not all(math.isfinite(s) and s >= _FLOAT32_TINY for s in scales):
        raise r.fail(f"tensor {k} has {len(scales)} scales {list(scales[:4])} and {len(zero_points)} zero points; "
                     "expected equal counts of positive, finite, normal float32 scales")
    if len(scales) > 1 and not (0 <= dim < len(shape) and shape[dim] == len(scales)):
        raise r.fail(f"tensor {k} has {len(scales)} per-channel scales along dimension {dim} of shape {list(shape)}")
    if dtype in ("int8", "uint8"):
        info = np.iinfo(dtype)
        if any(not info.min <= z <= info.max for z in zero_points):
            raise r.fail(f"tensor {k} has zero points {list(zero_points[:4])} outside the {dtype} range")
    if (len(scales) > 1 or dtype not in ("int8", "uint8")) and any(zero_points):
        raise r.fail(f"tensor {k} ({dtype}, {len(scales)} scales) has non-zero zero points {list(zero_points[:4])}; "
                     "per-channel and wider-than-8-bit quantization is symmetric")
    return Quant(scales=scales, zero_points=zero_points, dimension=dim)


def _operator(r: _Reader, k: int, op: tuple[int, int, int, int], op_names: list[str],
              tensors: tuple[Tensor, ...]) -> Operator:
    code = int(r.scalar(op, 0, "<I", 0))
    if code >= len(op_names):
        raise r.fail(f"operator {k} uses operator code {code}; the file has {len(op_names)}")
    name = op_names[code]
    ins = _indices(r, r.vector(op, 1, "i"), len(tensors), f"operator {k} ({name}) input", optional=True)
    outs = _indices(r, r.vector(op, 2, "i"), len(tensors), f"operator {k} ({name}) output")
    if not outs:
        raise r.fail(f"operator {k} ({name}) has no output")
    if not name.startswith("CUSTOM:"):
        optional = _OPTIONAL_INPUTS.get(name, ())
        if len(ins) < _MIN_INPUTS.get(name, 1):
            raise r.fail(f"operator {k} ({name}) has {len(ins)} inputs")
        for pos, t in enumerate(ins):
            if t < 0 and pos not in optional:
                raise r.fail(f"operator {k} ({name}) lacks its input {pos}")
    for pos in _CONSTANT_INPUTS.get(name, ()):
        if pos < len(ins) and ins[pos] >= 0 and not tensors[ins[pos]].data_bytes:
            raise r.fail(f"operator {k} ({name}) input {pos} (tensor {ins[pos]}) must be constant data and has none")
    rank = _WEIGHT_RANK.get(name)
    if rank is not None and len(tensors[ins[1]].shape) != rank:
        raise r.fail(f"operator {k} ({name}) weights have shape {list(tensors[ins[1]].shape)}, expected rank {rank}")
    if name in _WINDOW_OPTIONS:
        _check_window(r, k, name, op)
    return Operator(index=k, name=name, inputs=ins, outputs=outs)


def _check_window(r: _Reader, k: int, name: str, op: tuple[int, int, int, int]) -> None:
    """Strides, dilations, windows >= 1 (and bounded), padding SAME/VALID, a known fused activation."""
    table_type, (pad, sw, sh, act, dw, dh, fw, fh) = _WINDOW_OPTIONS[name]
    opts = r.ref(op, 4)
    if int(r.scalar(op, 3, "<B", 0)) != table_type or opts is None:
        raise r.fail(f"operator {k} ({name}) lacks its options")
    t = r.table(opts)
    values = {"stride": [r.scalar(t, sw, "<i", 0), r.scalar(t, sh, "<i", 0)],
              "dilation": [r.scalar(t, i, "<i", 1) for i in (dw, dh) if i >= 0],
              "window": [r.scalar(t, i, "<i", 0) for i in (fw, fh) if i >= 0]}
    for what, vals in values.items():
        if any(not 1 <= int(v) <= MAX_WINDOW for v in vals):
            raise r.fail(f"operator {k} ({name}) has {what} {vals}")
    if r.scalar(t, pad, "<b", 0) not in (0, 1) or not 0 <= r.scalar(t, act, "<b", 0) <= 5:
        raise r.fail(f"operator {k} ({name}) has an unknown padding or activation")


def _check_dataflow(r: _Reader, tensors: tuple[Tensor, ...], operators: tuple[Operator, ...], inputs: tuple[int, ...],
                    outputs: tuple[int, ...]) -> None:
    """Every tensor an operator reads exists when it runs; nothing writes into constants or twice."""
    ready = set(inputs)
    for t in inputs:
        if tensors[t].data_bytes:
            raise r.fail(f"graph input tensor {t} holds constant data")
    for op in operators:
        for t in op.inputs:
            if t >= 0 and t not in ready and not tensors[t].data_bytes and not tensors[t].variable:
                raise r.fail(f"operator {op.index} ({op.name}) reads tensor {t} ({tensors[t].name[:40]!r}), which "
                             "has no data and is computed by no earlier operator")
        for t in op.outputs:
            if t in ready or tensors[t].data_bytes:
                raise r.fail(f"operator {op.index} ({op.name}) writes tensor {t}, which is an input, a constant or "
                             "written twice")
            ready.add(t)
    for t in outputs:
        if t not in ready:
            raise r.fail(f"graph output tensor {t} is computed by no operator")


# ---- costs ------------------------------------------------------------------------------------------------
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


def op_macs(model: Model, op: Operator) -> int:
    """MACs of one op from its tensor shapes (0 for ops that are not counted)."""
    if op.name not in MAC_OPS:
        return 0
    shape = [model.tensors[i].shape if i >= 0 else () for i in op.inputs]
    out = model.tensors[op.outputs[0]].shape
    out_elems = math.prod(out)
    if op.name == "CONV_2D":
        _, kh, kw, cin_per_group = shape[1]  # filter [Cout, Kh, Kw, Cin/groups]
        return out_elems * kh * kw * cin_per_group
    if op.name == "DEPTHWISE_CONV_2D":
        _, kh, kw, _ = shape[1]  # filter [1, Kh, Kw, Cin*multiplier]
        return out_elems * kh * kw
    if op.name == "FULLY_CONNECTED":
        return out_elems * shape[1][-1]  # weights [out_features, in_features]
    if op.name == "BATCH_MATMUL":
        a = shape[0]
        # A is [..., M, K] (or [..., K, M] when adjoint); M is the output's second-to-last dimension.
        k = 1 if not a else a[-1] if len(a) < 2 or len(out) < 2 or a[-2] == out[-2] else a[-2]
        return out_elems * k
    # TRANSPOSE_CONV: inputs (output_shape, filter [Cout, Kh, Kw, Cin], input)
    cout, kh, kw, _ = shape[1]
    return math.prod(shape[2]) * kh * kw * cout


def _ancestors(model: Model, target: int) -> set[int]:
    """Indices of the ops that tensor ``target`` depends on."""
    producer = {t: op for op in model.operators for t in op.outputs}
    needed: set[int] = set()
    stack = [target]
    while stack:
        op = producer.get(stack.pop())
        if op is None or op.index in needed:
            continue
        needed.add(op.index)
        stack.extend(t for t in op.inputs if t >= 0)
    return needed


def graph_costs(model: Model | str | os.PathLike[str], boundary: str | None = "features") -> GraphCosts:
    """Count MACs and parameter bytes of a graph, split into segment and head at tensor ``boundary``.

    Args:
        model: a graph from :func:`read_model`, or a .tflite file's path.
        boundary: name of the tensor that ends the segment (a stage's ``features`` output); ``None`` or a
            name the graph does not have puts every op in the segment.
    """
    if not isinstance(model, Model):
        model = read_model_file(model)
    ops = model.operators
    seg_ops = {op.index for op in ops}
    cut = model.tensor(boundary) if boundary is not None else None
    if cut is not None:
        seg_ops = _ancestors(model, cut.index)
    seg_consts: set[int] = set()
    head_consts: set[int] = set()
    for op in ops:
        consts = {t for t in op.inputs if t >= 0 and model.tensors[t].data_bytes}
        (seg_consts if op.index in seg_ops else head_consts).update(consts)
    head_consts -= seg_consts  # a constant shared by both is paid once, by the segment
    macs = {op.index: op_macs(model, op) for op in ops}
    mac_ops: dict[str, int] = {}
    for op in ops:
        if macs[op.index]:
            mac_ops[op.name] = mac_ops.get(op.name, 0) + macs[op.index]
    seg_macs = sum(macs[i] for i in seg_ops)
    head_macs = sum(m for i, m in macs.items() if i not in seg_ops)
    seg_bytes = sum(model.tensors[t].data_bytes for t in seg_consts)
    head_bytes = sum(model.tensors[t].data_bytes for t in head_consts)
    head_output_macs = {model.tensors[t].name: sum(macs[i] for i in _ancestors(model, t) - seg_ops)
                        for t in model.outputs}
    return GraphCosts(macs=seg_macs + head_macs, param_bytes=seg_bytes + head_bytes, segment_macs=seg_macs,
                      head_macs=head_macs, segment_param_bytes=seg_bytes, head_param_bytes=head_bytes,
                      mac_ops=mac_ops, head_output_macs=head_output_macs)


def file_costs(path: str | os.PathLike[str], boundary: str | None = "features") -> GraphCosts:
    """:func:`graph_costs` of a .tflite file."""
    return graph_costs(path, boundary)


__all__ = ["Model", "Tensor", "Operator", "Quant", "GraphCosts", "read_file", "read_model", "read_model_file",
           "graph_costs", "file_costs", "op_macs", "MAC_OPS"]
