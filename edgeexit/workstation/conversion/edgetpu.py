"""Edge TPU readiness of a bundle's stages, and compiling them for the Edge TPU.

:func:`edgetpu_report` reads every stage ``.tflite`` flatbuffer and checks it against the Coral Edge TPU
compiler's documented requirements: every activation tensor int8/uint8 (full-integer model), static shapes,
at most 3 dimensions larger than 1 per tensor (batch 1), one subgraph, and only operations from the
Edge TPU's supported-operation table with their documented constraints. The compiler maps the graph up to
the first operation it cannot map; that operation and every later one (in execution order) run on the CPU.
The report says, per stage, which operations would not map and how many would run on the CPU.

:func:`compile_for_edgetpu` runs ``edgetpu_compiler`` once over all stages of a bundle, so that they share
the Edge TPU's on-chip parameter cache (the compiler's co-compilation), and records what it mapped.

Both return plain JSON-serialisable dicts meant for the manifest's ``edgetpu`` field. Only the flatbuffer
schema that ships with the interpreter package is used (``ai_edge_litert`` or TensorFlow), no interpreter
is created, so the check runs anywhere the bundle can be read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeexit.runtime.bundle import write_manifest_atomic
from edgeexit.errors import BundleError, ConversionError
from edgeexit.runtime.manifest import MANIFEST_FILE, Manifest

log = logging.getLogger(__name__)

#: Where the requirements below come from.
SOURCE = "Coral Edge TPU model requirements and supported operations (coral.ai/docs/edgetpu/models-intro)"
#: The compiler's documented maximum number of elements of a SOFTMAX input.
SOFTMAX_MAX_ELEMENTS = 16000
#: Install hint for the compiler (x86-64 Debian/Ubuntu only).
COMPILER_HINT = ("install it on an x86-64 Debian/Ubuntu workstation from the Coral apt repository "
                 "(apt-get install edgetpu-compiler, see coral.ai/docs/edgetpu/compiler) or pass its path")

# TFLite builtin operator -> documented constraint (checked in _op_problems where it can be read from the file).
SUPPORTED_OPS: dict[str, str] = {
    "ADD": "",
    "AVERAGE_POOL_2D": "no fused activation function",
    "CONCATENATION": "no fused activation function; a constant input must be all zeros and the only other input",
    "CONV_2D": "same dilation in x and y",
    "DEPTHWISE_CONV_2D": "same dilation in x and y",
    "EXPAND_DIMS": "",
    "FULLY_CONNECTED": "default weights format; output tensor one-dimensional",
    "L2_NORMALIZATION": "",
    "LOGISTIC": "",
    "LSTM": "unidirectional only",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "unidirectional only",
    "MAXIMUM": "",
    "MAX_POOL_2D": "no fused activation function",
    "MEAN": "no reduction over the batch dimension; a channel reduction needs a multiple of 4 channels",
    "MINIMUM": "",
    "MUL": "",
    "PACK": "no packing along the batch dimension",
    "PAD": "no padding of the batch dimension",
    "PRELU": "alpha one-dimensional",
    "QUANTIZE": "",
    "REDUCE_MAX": "no reduction over the batch dimension",
    "REDUCE_MIN": "no reduction over the batch dimension",
    "RELU": "",
    "RELU6": "",
    "RELU_N1_TO_1": "",
    "RESHAPE": "some reshapes of large tensors are not mapped",
    "RESIZE_BILINEAR": "3-dimensional input/output; some sizes are not mapped (precision)",
    "RESIZE_NEAREST_NEIGHBOR": "3-dimensional input/output; some sizes are not mapped (precision)",
    "RSQRT": "",
    "SLICE": "",
    "SOFTMAX": f"one-dimensional input of at most {SOFTMAX_MAX_ELEMENTS} elements",
    "SPACE_TO_DEPTH": "",
    "SPLIT": "no splitting along the batch dimension",
    "SQUARED_DIFFERENCE": "",
    "SQUEEZE": "",
    "STRIDED_SLICE": "all strides 1, ellipsis and new-axis masks 0",
    "SUB": "",
    "SUM": "no reduction over the batch dimension",
    "TANH": "",
    "TRANSPOSE": "",
    "TRANSPOSE_CONV": "",
}
_INT8_TYPES = ("INT8", "UINT8")
# Constant inputs that legitimately are not 8-bit: biases (int32), shapes, axes, paddings, slice bounds.
_INT_CONSTANT_TYPES = ("INT32", "INT64")


def _schema() -> Any:
    """The TFLite flatbuffer schema module from whichever interpreter package is installed."""
    for name in ("ai_edge_litert.schema_py_generated", "tensorflow.lite.python.schema_py_generated"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ConversionError("cannot read .tflite files: neither ai_edge_litert nor tensorflow is installed; "
                          "pip install -c requirements/constraints.txt '.[device]'")


def _names(enum_cls: Any) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


class _Graph:
    """One .tflite file's main subgraph, read with the flatbuffer object API."""

    def __init__(self, path: Path):
        s = _schema()
        self.path = path
        self.raw = path.read_bytes()
        try:
            self.model = s.ModelT.InitFromPackedBuf(bytearray(self.raw), 0)
        except Exception as exc:  # the generated flatbuffer reader raises anything on garbage input
            raise BundleError(f"{path.name}: not a TFLite flatbuffer ({type(exc).__name__}); re-create the "
                              "bundle with `edgeexit convert`") from None
        if not self.model.subgraphs:
            raise BundleError(f"{path.name}: the TFLite file has no subgraph; re-create the bundle")
        self.sg = self.model.subgraphs[0]
        self.op_names = _names(s.BuiltinOperator)
        self.type_names = _names(s.TensorType)
        self.produced = {t for op in (self.sg.operators or []) for t in _idx(op.outputs)}
        self.graph_inputs = set(_idx(self.sg.inputs))

    def op_name(self, op: Any) -> str:
        code = self.model.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        name = self.op_names.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            custom = code.customCode.decode() if isinstance(code.customCode, bytes) else str(code.customCode)
            return f"CUSTOM:{custom}"
        return name

    def tensor(self, i: int) -> Any:
        return self.sg.tensors[i]

    def tname(self, i: int) -> str:
        name = self.tensor(i).name
        return name.decode() if isinstance(name, bytes) else str(name)

    def ttype(self, i: int) -> str:
        return self.type_names.get(self.tensor(i).type, str(self.tensor(i).type))

    def shape(self, i: int) -> list[int]:
        return [int(d) for d in _idx(self.tensor(i).shape)]

    def signature(self, i: int) -> list[int]:
        """Shape with -1 for dynamic dimensions (the shape itself when the file stores no signature)."""
        sig = self.tensor(i).shapeSignature
        return self.shape(i) if sig is None else [int(d) for d in sig]

    def static(self, i: int) -> bool:
        return min(self.signature(i), default=0) >= 0

    def is_constant(self, i: int) -> bool:
        return i not in self.produced and i not in self.graph_inputs

    def constant(self, i: int) -> np.ndarray | None:
        """Value of a constant int32/int64 tensor (axes, paddings, strides), or None when it has no data."""
        buf = self.model.buffers[self.tensor(i).buffer]
        dtype = {"INT32": np.int32, "INT64": np.int64}.get(self.ttype(i))
        if dtype is None:
            return None
        if buf.data is not None and len(buf.data):
            data = bytes(bytearray(buf.data))
        elif getattr(buf, "offset", 0) and getattr(buf, "size", 0):  # large models keep buffers after the flatbuffer
            data = self.raw[buf.offset:buf.offset + buf.size]
        else:
            return None
        return np.frombuffer(data, dtype=dtype).reshape(self.shape(i) or [-1])


def _idx(seq: Any) -> list[int]:
    return [int(v) for v in (seq if seq is not None else []) if int(v) >= 0]


def _big_dims(shape: Sequence[int]) -> int:
    return sum(1 for d in shape if d > 1)


def _op_problems(g: _Graph, op: Any, name: str) -> list[str]:
    """Why one operator would not be mapped to the Edge TPU (empty list: it would)."""
    problems: list[str] = []
    if name not in SUPPORTED_OPS:
        problems.append(f"{name} is not an Edge TPU operation")
    tensors = _idx(op.inputs) + _idx(op.outputs)
    for t in tensors:
        kind, shape = g.ttype(t), g.shape(t)
        if g.is_constant(t):
            if kind not in _INT8_TYPES + _INT_CONSTANT_TYPES:
                problems.append(f"constant '{g.tname(t)}' is {kind}, not 8/32-bit integer")
            continue
        if kind not in _INT8_TYPES:
            problems.append(f"tensor '{g.tname(t)}' is {kind}, not int8/uint8 (model not full-integer)")
        if not g.static(t):
            problems.append(f"tensor '{g.tname(t)}' has a dynamic shape {g.signature(t)}")
        elif len(shape) > 3 and _big_dims(shape[:-3]) > 0:
            problems.append(f"tensor '{g.tname(t)}' has shape {shape}: only the 3 innermost dimensions may be > 1")
    problems += _constraint_problems(g, op, name)
    return problems


def _constraint_problems(g: _Graph, op: Any, name: str) -> list[str]:
    """The per-operation constraints of the supported-operation table that the file lets us read."""
    s = _schema()
    opts = op.builtinOptions
    ins, outs = _idx(op.inputs), _idx(op.outputs)
    act = getattr(opts, "fusedActivationFunction", 0) if opts is not None else 0
    out: list[str] = []
    if name in ("AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION") and act != s.ActivationFunctionType.NONE:
        out.append(f"{name} has a fused activation function")
    if name in ("CONV_2D", "DEPTHWISE_CONV_2D") and opts is not None and opts.dilationWFactor != opts.dilationHFactor:
        out.append(f"{name} has different x/y dilation ({opts.dilationWFactor}, {opts.dilationHFactor})")
    if name == "FULLY_CONNECTED":
        if opts is not None and opts.weightsFormat != s.FullyConnectedOptionsWeightsFormat.DEFAULT:
            out.append("FULLY_CONNECTED uses a non-default weights format")
        if outs and _big_dims(g.shape(outs[0])) > 1:
            out.append(f"FULLY_CONNECTED output {g.shape(outs[0])} is not one-dimensional")
    if name == "SOFTMAX" and ins:
        shape = g.shape(ins[0])
        if _big_dims(shape) > 1 or int(np.prod(shape or [1])) > SOFTMAX_MAX_ELEMENTS:
            out.append(f"SOFTMAX input {shape} is not one-dimensional with <= {SOFTMAX_MAX_ELEMENTS} elements")
    if name in ("MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN") and len(ins) > 1:
        axes, rank = g.constant(ins[1]), len(g.shape(ins[0]))
        if axes is not None and rank:
            axes = {int(a) % rank for a in axes.ravel()}
            if rank == 4 and 0 in axes and g.shape(ins[0])[0] > 1:
                out.append(f"{name} reduces over the batch dimension")
            if name == "MEAN" and rank - 1 in axes and g.shape(ins[0])[-1] % 4:
                out.append(f"MEAN reduces over {g.shape(ins[0])[-1]} channels, not a multiple of 4")
    if name == "PAD" and len(ins) > 1:
        pads = g.constant(ins[1])
        if pads is None:
            out.append("PAD paddings are not constant")
        elif len(g.shape(ins[0])) == 4 and np.any(pads.reshape(-1, 2)[0] != 0):
            out.append("PAD pads the batch dimension")
    if name == "STRIDED_SLICE":
        strides = g.constant(ins[3]) if len(ins) > 3 else None
        if strides is None or np.any(strides != 1):
            out.append(f"STRIDED_SLICE strides are {None if strides is None else strides.tolist()}, not all 1")
        if opts is not None and (opts.ellipsisMask or opts.newAxisMask):
            out.append("STRIDED_SLICE uses an ellipsis or new-axis mask")
    if name in ("PACK", "SPLIT"):
        axis = getattr(opts, "axis", None) if name == "PACK" else (g.constant(ins[0]) if ins else None)
        if axis is not None and int(np.ravel(axis)[0]) == 0:
            out.append(f"{name} works along the batch dimension")
    return out


def stage_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Edge TPU readiness of one .tflite file.

    Args:
        path: the .tflite file.

    Returns:
        ``{"file", "ops", "op_counts", "full_int8", "static_shapes", "subgraphs", "unsupported",
        "first_cpu_op", "edgetpu_ops", "cpu_ops"}``: ``unsupported`` lists every operation that would not
        be mapped (``{"index", "op", "reasons"}``); ``first_cpu_op`` is the index of the first one (None when
        all map); from there on, ``cpu_ops`` operations run on the CPU.

    Raises:
        BundleError: the file is missing or not a TFLite flatbuffer.
        ConversionError: no package that can read .tflite files is installed.
    """
    p = Path(path)
    if not p.is_file():
        raise BundleError(f"{p}: no such .tflite file; pass a stage file of a bundle")
    g = _Graph(p)
    ops = g.sg.operators or []
    names = [g.op_name(op) for op in ops]
    unsupported = []
    for i, (op, name) in enumerate(zip(ops, names)):
        reasons = _op_problems(g, op, name)
        if reasons:
            unsupported.append({"index": i, "op": name, "reasons": sorted(set(reasons))})
    if len(g.model.subgraphs) > 1:
        unsupported.insert(0, {"index": 0, "op": names[0] if names else "", "reasons": [
            f"the file has {len(g.model.subgraphs)} subgraphs; the Edge TPU compiler maps only one"]})
    activations = [t for op in ops for t in _idx(op.inputs) + _idx(op.outputs) if not g.is_constant(t)]
    first = unsupported[0]["index"] if unsupported else None
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return {
        "file": p.name,
        "ops": len(ops),
        "op_counts": counts,
        "full_int8": all(g.ttype(t) in _INT8_TYPES for t in activations),
        "static_shapes": all(g.static(t) for t in set(activations)),
        "subgraphs": len(g.model.subgraphs),
        "unsupported": unsupported,
        "first_cpu_op": first,
        "edgetpu_ops": len(ops) if first is None else first,
        "cpu_ops": 0 if first is None else len(ops) - first,
    }


def edgetpu_report(stage_paths: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Edge TPU readiness of a bundle's stage files, for the manifest's ``edgetpu`` field.

    Args:
        stage_paths: the stage .tflite files, in stage order.

    Returns:
        ``{"source", "ready", "stages": [stage_report(...), ...]}``; ``ready`` is True when every operation
        of every stage would be mapped to the Edge TPU.

    Raises:
        BundleError: a file is missing or not a TFLite flatbuffer.
        ConversionError: no package that can read .tflite files is installed.
    """
    if not stage_paths:
        raise BundleError("edgetpu_report got no stage files; pass the bundle's stage_<i>.tflite paths")
    stages = [stage_report(p) for p in stage_paths]
    for st in stages:
        if st["unsupported"]:
            first = st["unsupported"][0]
            log.info("%s: %d of %d ops would run on the CPU, from op %d (%s: %s)", st["file"], st["cpu_ops"],
                     st["ops"], first["index"], first["op"], "; ".join(first["reasons"]))
    return {"source": SOURCE, "ready": all(not st["unsupported"] for st in stages), "stages": stages}


def find_compiler(compiler: str = "edgetpu_compiler") -> str | None:
    """Full path of the Edge TPU compiler (a name on PATH or a path), or None when it is not installed."""
    return shutil.which(compiler)


_COUNT_RE = re.compile(r"Number of operations that will run on (Edge TPU|CPU):\s*(\d+)")
_INPUT_RE = re.compile(r"Input model:\s*(\S+)")


def _parse_compiler_log(text: str) -> dict[str, dict[str, int]]:
    """Per input model: operations the compiler put on the Edge TPU and on the CPU."""
    per_model: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = _INPUT_RE.search(line)
        if m:
            current = Path(m.group(1)).name
            per_model.setdefault(current, {})
            continue
        m = _COUNT_RE.search(line)
        if m and current is not None:
            per_model[current]["edgetpu_ops" if m.group(1) == "Edge TPU" else "cpu_ops"] = int(m.group(2))
    return per_model


def compile_for_edgetpu(bundle_dir: str | os.PathLike[str], compiler: str = "edgetpu_compiler", *,
                        out_dir: str | os.PathLike[str] | None = None, bundle_out: str | os.PathLike[str] | None = None,
                        timeout_s: float = 600.0) -> dict[str, Any]:
    """Compile all stages of a bundle for the Edge TPU in one compiler call (shared parameter cache).

    Runs ``COMPILER -s -o OUT stage_0.tflite stage_1.tflite ...``; the compiler writes
    ``stage_<i>_edgetpu.tflite`` and a log per stage into OUT (default ``<bundle>/edgetpu``).

    Args:
        bundle_dir: a bundle directory (with manifest.json).
        compiler: the compiler's name on PATH or its path.
        out_dir: where the compiled files go.
        bundle_out: also write an Edge TPU bundle here: a copy of the bundle whose stage files are the
            compiled ones (manifest hashes updated, this report in its ``edgetpu`` field), for
            ``Runner(bundle_out, edgetpu=True)`` / ``edgeexit run --edgetpu``. The monolithic model stays as is.
        timeout_s: give up after this many seconds.

    Returns:
        ``{"compiler", "version", "command", "out_dir", "files", "per_stage", "log", "readiness"}``:
        ``per_stage`` maps each stage file to the compiler's Edge TPU / CPU operation counts, ``readiness``
        is :func:`edgetpu_report` of the uncompiled stages.

    Raises:
        ConversionError: the bundle has int16 activations or float32 layers (the Edge TPU has neither), the
            compiler is not installed, fails or times out, or wrote no output file.
        BundleError: the bundle cannot be read.
    """
    root = Path(bundle_dir)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{root}: no {MANIFEST_FILE}; pass a bundle directory made by `edgeexit convert`")
    manifest = Manifest.from_json(manifest_path.read_text())
    if manifest.activations != "int8":
        raise ConversionError(f"{root}: the bundle has {manifest.activations} activations and the Edge TPU runs int8 "
                              "only; convert it with --precision int8 (the default) to compile it for the Edge TPU")
    mixed = [u for u, e in (manifest.precision.get("units") or {}).items() if e.get("kind") != "int8"]
    if mixed:
        raise ConversionError(f"{root}: {', '.join(mixed)} compute partly in float32 (convert --precision auto) and the "
                              "Edge TPU runs int8 only; convert with --precision int8 to compile for the Edge TPU")
    stages = [root / s.file for s in manifest.stages]
    exe = find_compiler(compiler)
    if exe is None:
        raise ConversionError(f"Edge TPU compiler '{compiler}' not found on PATH; {COMPILER_HINT}")
    out = Path(out_dir) if out_dir is not None else root / "edgetpu"
    out.mkdir(parents=True, exist_ok=True)
    readiness = edgetpu_report(stages)
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    version_lines = ((version.stdout or "") + (version.stderr or "")).strip().splitlines()
    cmd = [exe, "-s", "-o", str(out)] + [str(p) for p in stages]
    log.info("compiling %d stages for the Edge TPU: %s", len(stages), " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ConversionError(f"{exe} did not finish within {timeout_s:.0f} s; pass a larger timeout") from None
    text = (proc.stdout or "") + (proc.stderr or "")
    (out / "edgetpu_compiler.log").write_text(text)
    if proc.returncode != 0:
        last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "no output")
        raise ConversionError(f"{exe} failed with exit code {proc.returncode} ({last.strip():.160}); see "
                              f"{out / 'edgetpu_compiler.log'}")
    files = [out / f"{p.stem}_edgetpu.tflite" for p in stages]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConversionError(f"{exe} reported success but wrote no {', '.join(missing)} in {out}; see "
                              f"{out / 'edgetpu_compiler.log'}")
    result = {
        "compiler": exe,
        "version": version_lines[0] if version_lines else "unknown",
        "command": cmd,
        "out_dir": os.path.relpath(out, root) if out.is_relative_to(root) else str(out),
        "files": [os.path.relpath(f, root) if f.is_relative_to(root) else str(f) for f in files],
        "per_stage": _parse_compiler_log(text),
        "log": "edgetpu_compiler.log",
        "readiness": readiness,
    }
    if bundle_out is not None:
        _write_edgetpu_bundle(root, manifest, files, Path(bundle_out), result)
    return result


def _write_edgetpu_bundle(root: Path, manifest: Manifest, compiled: Sequence[Path], target: Path,
                          report: dict[str, Any]) -> None:
    """Copy the bundle to ``target`` with the compiled stage files in place of the CPU ones."""
    if target.exists():
        raise ConversionError(f"{target} already exists; remove it or choose another Edge TPU bundle directory")
    shutil.copytree(root, target, ignore=shutil.ignore_patterns("edgetpu"))
    stages = []
    for spec, src in zip(manifest.stages, compiled):
        data = src.read_bytes()
        (target / spec.file).write_bytes(data)
        stages.append(dataclasses.replace(spec, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)))
    edgetpu = {key: value for key, value in report.items() if key not in ("out_dir", "files")}
    write_manifest_atomic(target, manifest.replace(stages=tuple(stages), edgetpu={**edgetpu, "compiled": True}))
    log.info("Edge TPU bundle written to %s", target)

