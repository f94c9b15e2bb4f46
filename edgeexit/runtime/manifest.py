"""The bundle manifest: a typed, versioned description of a converted early-exit network.

A bundle is a directory::

    bundle/
      manifest.json        # this module's Manifest, as JSON
      stage_0.tflite       # backbone segment 0 + exit head 0   (int8 in, int8 out)
      stage_1.tflite       # backbone segment 1 + exit head 1   (input = stage 0's "features")
      ...
      monolithic.tflite    # optional: the same network without early exits, one int8 model

Every stage file has up to three outputs, found by name:

* ``features``   -- the hand-off to the next stage, NHWC int8 (absent on the last stage);
* ``logits``     -- the exit's class scores before softmax/sigmoid, [1, K] int8;
* ``confidence`` -- the exit's confidence logit before the sigmoid, [1, 1] int8 (EENet-style exits only).

``Manifest.from_dict`` checks every field and type; :mod:`edgeexit.runtime.bundle` checks the files against it.
Only the standard library is used here, so the manifest can be read anywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import BundleError
from .points import OperatingPoints

FORMAT_NAME = "edgeexit-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"

#: Exit rules a bundle may name; see :mod:`edgeexit.runtime.rules`.
EXIT_RULES = ("confidence", "max_softmax", "entropy", "class_exclusion", "final", "fixed")
#: What an input answers when no early exit stops it (``exit_rule.fallback``; see :mod:`edgeexit.runtime.rules`).
FALLBACKS = ("final", "most_confident")
#: The rules that take a fallback other than "final" (they score every exit).
FALLBACK_RULES = ("confidence", "max_softmax", "entropy")
#: How an exit's logits become class scores: softmax (EENet, PTEENet, final exits) or per-class sigmoid
#: (class-based early exit, *Early Classification for Dynamic Inference of Neural Networks*).
SCORE_KINDS = ("softmax", "sigmoid")
DTYPES = ("int8", "uint8", "int16", "float32", "int32")
#: A bundle's activation type (``Manifest.activations``): every stage's input and outputs, and the monolithic
#: model's, are of this type. int16 = TFLite "16x8" (int8 weights, int16 activations); manifests written before
#: the field existed are int8.
ACTIVATIONS = ("int8", "int16")
#: The tensor dtypes each activation type allows.
ACTIVATION_DTYPES = {"int8": ("int8", "uint8"), "int16": ("int16",)}
_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}
#: The quantized (integer activation) tensor types a bundle's inputs, hand-offs and outputs may have.
QUANTIZED_DTYPES = tuple(_INT_RANGES)

# Bounds on what a manifest may hold: far above any real bundle, low enough that no field can make the
# device allocate, recurse or print without limit.
MAX_MANIFEST_BYTES = 16 << 20
MAX_DEPTH = 32            # nesting of JSON objects / lists
MAX_STAGES = 64
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 256
MAX_DIM = 1 << 24         # one tensor dimension
MAX_RANK = 8
MAX_IMAGE_SIDE = 8192     # preprocessing height / width
MAX_COST = 1 << 62        # MACs, bytes
PIXEL_SCALE_RANGE = (1e-6, 1.0)  # pixel_scale: 0..255 pixels become at most 0..255, at least 0..2.55e-4
MAX_FILE_NAME_BYTES = 255


def _need(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, Mapping):
        raise BundleError(f"manifest: {where} must be an object, got {type(d).__name__}; re-create the bundle "
                          "with `edgeexit convert`")
    if key not in d:
        raise BundleError(f"manifest: missing field '{where}.{key}'; the manifest is incomplete or from another "
                          "tool: re-create the bundle with `edgeexit convert`")
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BundleError(f"manifest: field '{where}.{key}' must be {names}, got {type(value).__name__} "
                          f"({_short(value)}); re-create the bundle with `edgeexit convert`")
    if isinstance(value, int) and not isinstance(value, bool) and not -MAX_COST <= value <= MAX_COST:
        raise BundleError(f"manifest: field '{where}.{key}' is {_short(value)}, out of any sensible range")
    return value


def _short(value: Any) -> str:
    """A bounded, one-line, escaped rendering of a manifest value for messages."""
    if isinstance(value, (list, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10 ** 18:
        return f"an integer of {len(str(abs(value)))} digits"
    return ascii(value)[:60]


def _opt(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    if d.get(key) is None:
        return default
    return _need(d, key, kind, where)


def _ints(seq: Any, where: str) -> tuple[int, ...]:
    if not isinstance(seq, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and
                                                     -MAX_COST <= v <= MAX_COST for v in seq):
        raise BundleError(f"manifest: '{where}' must be a list of integers, got {_short(seq)}")
    return tuple(seq)


def _floats(seq: Any, where: str) -> tuple[float, ...]:
    if not isinstance(seq, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in seq):
        raise BundleError(f"manifest: '{where}' must be a list of finite numbers, got {_short(seq)}")
    return tuple(float(v) for v in seq)


#: Entries of ``operating_points`` that are not points: the tuned front and the measured exit costs.
NOT_POINTS = ("front", "exit_costs")


def _file_name(d: Mapping[str, Any], where: str) -> str:
    """A bundle file name: a short relative path of printable characters (checked again against the disk)."""
    name = _need(d, "file", str, where)
    parts = name.split("/")
    if (not name or not name.isprintable() or "\\" in name or name.startswith("/") or len(parts) > 8
            or any(p in ("", ".", "..") or len(p.encode("utf-8", "replace")) > MAX_FILE_NAME_BYTES for p in parts)):
        raise BundleError(f"manifest: '{where}.file' is {_short(name)}; expected a plain relative path inside "
                          "the bundle (printable, at most 255 bytes per part); the manifest was edited: re-create "
                          "the bundle")
    return name


def _sha256(d: Mapping[str, Any], where: str) -> str:
    value = _need(d, "sha256", str, where)
    if len(value) != 64 or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise BundleError(f"manifest: '{where}.sha256' is {_short(value)}; expected 64 hex digits")
    return value.lower()


def _size(d: Mapping[str, Any], where: str) -> int:
    value = _need(d, "size_bytes", int, where)
    if value < 1:
        raise BundleError(f"manifest: '{where}.size_bytes' is {value}; expected a positive byte count")
    return value


def _cost(d: Mapping[str, Any], key: str, where: str) -> int:
    value = _need(d, key, int, where)
    if value < 0:
        raise BundleError(f"manifest: '{where}.{key}' is {value}; a cost cannot be negative: re-create the bundle")
    return value


def _check_tree(data: Any) -> None:
    """No deeper nesting than MAX_DEPTH and no string that cannot be written as UTF-8 (lone surrogates)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BundleError(f"manifest: nested deeper than {MAX_DEPTH} levels; the manifest was edited or is not "
                              "an edgeexit manifest: re-create the bundle")
        if isinstance(node, str):
            _utf8(node, "a string")
        elif isinstance(node, dict):
            for k, v in node.items():
                _utf8(k, "a field name")
                stack.append((v, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BundleError(f"manifest: {what} holds a lone surrogate ({_short(text)}), which is not text; "
                          "re-create the bundle") from None


def _no_constant(name: str) -> Any:
    raise BundleError(f"manifest.json holds {name}, which JSON does not allow; re-create the bundle")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BundleError(f"manifest.json holds the number {text[:40]}, too large for a float; re-create the bundle")
    return value


@dataclass(frozen=True)
class Quantization:
    """Affine int8 quantization: ``real = scale * (q - zero_point)``."""

    scale: float
    zero_point: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "Quantization":
        scale = _need(d, "scale", float, where)
        if not (math.isfinite(scale) and 0 < scale < 3.4e38):
            raise BundleError(f"manifest: '{where}.scale' must be a positive float32 number, got {scale}")
        return cls(scale=scale, zero_point=_need(d, "zero_point", int, where))



#: Two scales are "equal" when they agree to float32 precision (the converter writes float64 values of
#: float32 scales, and two graphs can round the same scale differently in the last bit).
SCALE_RTOL = 1e-6


def quant_equal(a: Quantization | None, b: Quantization | None) -> bool:
    """Same zero point and the same scale up to float32 rounding (:data:`SCALE_RTOL`); two None are equal."""
    if a is None or b is None:
        return a is None and b is None
    return a.zero_point == b.zero_point and math.isclose(a.scale, b.scale, rel_tol=SCALE_RTOL)

@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of a stage file, as the interpreter reports it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    quantization: Quantization | None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "TensorSpec":
        dtype = _need(d, "dtype", str, where)
        if dtype not in DTYPES:
            raise BundleError(f"manifest: '{where}.dtype' is {dtype!r}; expected one of {', '.join(DTYPES)}")
        q = d.get("quantization")
        shape = _ints(_need(d, "shape", list, where), f"{where}.shape")
        if len(shape) > MAX_RANK or not all(1 <= v <= MAX_DIM for v in shape):
            raise BundleError(f"manifest: '{where}.shape' is {_short(list(shape))}; expected at most {MAX_RANK} "
                              f"dimensions from 1 to {MAX_DIM}")
        quant = None if q is None else Quantization.from_dict(q, f"{where}.quantization")
        if quant is not None and dtype in _INT_RANGES:
            lo, hi = _INT_RANGES[dtype]
            if not lo <= quant.zero_point <= hi:
                raise BundleError(f"manifest: '{where}.quantization.zero_point' {quant.zero_point} is outside the "
                                  f"{dtype} range")
        return cls(name=_need(d, "name", str, where), shape=shape, dtype=dtype, quantization=quant)


@dataclass(frozen=True)
class Preprocessing:
    """How a raw image becomes the first stage's input.

    ``x = (pixel * pixel_scale - mean) / std`` per channel, after converting to ``color_mode`` ("L" or "RGB")
    and resizing to ``size`` = (height, width); then quantized with the input tensor's quantization.
    """

    size: tuple[int, int]
    color_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_scale: float = 1.0 / 255.0

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "input.preprocessing") -> "Preprocessing":
        size = _ints(_need(d, "size", list, where), f"{where}.size")
        mode = _need(d, "color_mode", str, where)
        if len(size) != 2 or not all(1 <= v <= MAX_IMAGE_SIDE for v in size):
            raise BundleError(f"manifest: '{where}.size' must be [height, width] from 1 to {MAX_IMAGE_SIDE}, got "
                              f"{_short(list(size))}")
        if mode not in ("L", "RGB"):
            raise BundleError(f"manifest: '{where}.color_mode' must be 'L' or 'RGB', got {mode!r}")
        mean = _floats(_need(d, "mean", list, where), f"{where}.mean")
        std = _floats(_need(d, "std", list, where), f"{where}.std")
        channels = 1 if mode == "L" else 3
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise BundleError(f"manifest: '{where}' needs {channels} mean and {channels} positive std values for "
                              f"color mode {mode}, got mean={list(mean)} std={list(std)}")
        pixel_scale = _opt(d, "pixel_scale", float, where, 1.0 / 255.0)
        lo, hi = PIXEL_SCALE_RANGE
        if not lo <= pixel_scale <= hi:
            raise BundleError(f"manifest: '{where}.pixel_scale' is {pixel_scale!r}; expected {lo:g} to {hi:g} (1/255 "
                              "maps 0..255 pixels to 0..1)")
        return cls(size=(size[0], size[1]), color_mode=mode, mean=mean, std=std, pixel_scale=pixel_scale)


@dataclass(frozen=True)
class StageCosts:
    """Costs of one stage, counted on the converted .tflite graph and cross-checked against torch.

    MACs count multiply-accumulates of CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED (and other matmul-like
    ops); element-wise ops, pooling and activations are not MACs and are not counted.
    """

    segment_macs: int
    head_macs: int
    segment_param_bytes: int
    head_param_bytes: int
    torch_segment_macs: int | None = None
    torch_head_macs: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "StageCosts":
        vals = {k: _need(d, k, int, where) for k in ("segment_macs", "head_macs", "segment_param_bytes",
                                                      "head_param_bytes")}
        if min(vals.values()) < 0:
            raise BundleError(f"manifest: '{where}' has a negative cost: {vals}")
        return cls(**vals, torch_segment_macs=_opt(d, "torch_segment_macs", int, where),
                   torch_head_macs=_opt(d, "torch_head_macs", int, where))


@dataclass(frozen=True)
class StageSpec:
    """One stage file: a backbone segment followed by its exit head."""

    index: int
    file: str
    sha256: str
    size_bytes: int
    input: TensorSpec
    outputs: Mapping[str, TensorSpec]  # "features" (not on the last stage), "logits", optional "confidence"
    scores: str  # "softmax" or "sigmoid": how the exit's logits become class scores
    costs: StageCosts

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "StageSpec":
        outs = _need(d, "outputs", dict, where)
        outputs = {k: TensorSpec.from_dict(v, f"{where}.outputs.{k}") for k, v in outs.items()}
        unknown = set(outputs) - {"features", "logits", "confidence"}
        if "logits" not in outputs or unknown:
            raise BundleError(f"manifest: '{where}.outputs' must name 'logits' and may name 'features' and "
                              f"'confidence'; got {sorted(outputs)}")
        scores = _need(d, "scores", str, where)
        if scores not in SCORE_KINDS:
            raise BundleError(f"manifest: '{where}.scores' is {scores!r}; expected one of {SCORE_KINDS}")
        return cls(index=_need(d, "index", int, where), file=_file_name(d, where),
                   sha256=_sha256(d, where), size_bytes=_size(d, where),
                   input=TensorSpec.from_dict(_need(d, "input", dict, where), f"{where}.input"),
                   outputs=outputs, scores=scores, costs=StageCosts.from_dict(_need(d, "costs", dict, where),
                                                                           f"{where}.costs"))


@dataclass(frozen=True)
class ModelFile:
    """A single-file model in the bundle (the monolithic int8 baseline)."""

    file: str
    sha256: str
    size_bytes: int
    input: TensorSpec
    output: TensorSpec
    macs: int
    param_bytes: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "ModelFile":
        return cls(file=_file_name(d, where), sha256=_sha256(d, where), size_bytes=_size(d, where),
                   input=TensorSpec.from_dict(_need(d, "input", dict, where), f"{where}.input"),
                   output=TensorSpec.from_dict(_need(d, "output", dict, where), f"{where}.output"),
                   macs=_cost(d, "macs", where), param_bytes=_cost(d, "param_bytes", where))


@dataclass(frozen=True)
class ExitRuleSpec:
    """The exit rule a bundle runs with by default, and its per-exit parameters.

    ``thresholds`` has one value per exit except the last (which always exits). Their meaning depends on
    ``kind``: confidence ``c_i > T_i``; max_softmax ``max p_i >= T_i``; entropy ``H(p_i) < T_i`` (nats);
    class_exclusion: ``beta_i`` of the candidate-set rule; final/fixed: unused (``fixed`` uses ``exit``).
    ``fallback``: what an input answers when no early exit stops it, "final" (the last exit) or
    "most_confident" (confidence, max_softmax and entropy only); written only when it is not "final", so a
    manifest without it reads as before.
    """

    kind: str
    thresholds: tuple[float, ...]
    exit: int | None = None
    fallback: str = "final"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "exit_rule") -> "ExitRuleSpec":
        kind = _need(d, "kind", str, where)
        if kind not in EXIT_RULES:
            raise BundleError(f"manifest: '{where}.kind' is {kind!r}; expected one of {', '.join(EXIT_RULES)}")
        fallback = _opt(d, "fallback", str, where, "final")
        if fallback not in FALLBACKS:
            raise BundleError(f"manifest: '{where}.fallback' is {_short(fallback)}; expected one of "
                              f"{', '.join(FALLBACKS)}: fix or remove the field")
        if fallback != "final" and kind not in FALLBACK_RULES:
            raise BundleError(f"manifest: '{where}.fallback' is {fallback!r} but rule {kind!r} takes 'final' only "
                              f"(most_confident works with {', '.join(FALLBACK_RULES)}): fix or remove the field")
        return cls(kind=kind, thresholds=_floats(_need(d, "thresholds", list, where), f"{where}.thresholds"),
                   exit=_opt(d, "exit", int, where), fallback=fallback)

    def to_dict(self) -> dict[str, Any]:
        """JSON form; ``fallback`` only when it is not "final" (older readers then read the rule as before)."""
        d: dict[str, Any] = {"kind": self.kind, "thresholds": list(self.thresholds), "exit": self.exit}
        if self.fallback != "final":
            d["fallback"] = self.fallback
        return d


@dataclass(frozen=True)
class Manifest:
    """Everything the device needs to know about a bundle, validated on load."""

    format_version: int
    producer: str
    name: str
    input: TensorSpec
    preprocessing: Preprocessing
    labels: tuple[str, ...]
    stages: tuple[StageSpec, ...]
    exit_rule: ExitRuleSpec
    monolithic: ModelFile | None = None
    full_macs: int = 0  # the network without early exits: every stage's segment + the whole final head (graphs)
    operating_points: OperatingPoints = field(default_factory=OperatingPoints)  # threshold tuning's results
    verification: Mapping[str, Any] = field(default_factory=dict)  # conversion report (torch vs int8)
    training: Mapping[str, Any] = field(default_factory=dict)  # method, loss, lambda, dataset, accuracy...
    edgetpu: Mapping[str, Any] = field(default_factory=dict)  # Edge TPU readiness / compilation report
    energy: Mapping[str, Any] = field(default_factory=dict)  # {"measured": {board: per-exit mJ}} (bench --store-energy)
    activations: str = "int8"  # "int8" or "int16" (16x8: int8 weights, int16 activations); see ACTIVATIONS
    #: mixed precision (convert --precision auto): {"mode": "auto", "units": {"stage_1": {"kind": "mixed",
    #: "float_layers": [tensor names]}, ...}}; empty for all-integer bundles (and then not written)
    precision: Mapping[str, Any] = field(default_factory=dict)
    #: the JSON object this manifest was read from: :meth:`to_dict` writes back the fields this version does not
    #: know (a newer producer's), so that rewriting a manifest (tune, bench --store-energy) never drops them
    source: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def point_rule(self, name: str) -> ExitRuleSpec | None:
        """The exit rule stored as operating point ``name`` (a rule dict, or a point with ``exit_rule``); None
        when there is no such entry or it is not a point (the stored ``front`` list, the ``exit_costs`` table).

        Raises:
            BundleError: the entry is malformed.
        """
        if name in NOT_POINTS:
            return None
        entry = self.operating_points.named.get(name)
        if entry is not None:
            return ExitRuleSpec.from_dict(entry.rule, f"operating_points.{name}")
        raw = self.operating_points.unreadable.get(name)
        if isinstance(raw, Mapping):  # raises the BundleError that says what is wrong with it
            ExitRuleSpec.from_dict(raw.get("exit_rule", raw), f"operating_points.{name}")
            raise BundleError(f"manifest: 'operating_points.{name}' is malformed; re-run `edgeexit tune` on the bundle")
        return None

    def verification_verdict(self) -> dict[str, Any]:
        """What the conversion's int8-vs-float check concluded, for result files and the benchmarks' refusal:
        ``status`` "passed", "failed" or "not verified" (skipped, or no report), ``samples``, the names of the
        ``failed_tolerances`` and their ``failures`` (one line each)."""
        v = self.verification
        passed = v.get("passed") if isinstance(v, Mapping) else None
        status = "passed" if passed is True else "failed" if passed is False else "not verified"
        failures = v.get("failures") if status == "failed" else None
        names = v.get("failed_tolerances") if status == "failed" else None
        return {"status": status, "samples": v.get("samples") if status != "not verified" else None,
                "failed_tolerances": [str(x) for x in names] if isinstance(names, list) else [],
                "failures": [str(x) for x in failures] if isinstance(failures, list) else []}

    def unverified_reason(self) -> str | None:
        """None for a bundle whose int8 files passed the conversion's check against float; else why not (a
        clause for a one-line message)."""
        verdict = self.verification_verdict()
        if verdict["status"] == "passed":
            return None
        if verdict["status"] == "failed":
            missed = ", ".join(verdict["failed_tolerances"]) or "; ".join(verdict["failures"][:3]) or "?"
            return f"its int8 verification failed at conversion ({missed})"
        return "it was converted without an int8 verification (no verification images)"

    def cumulative_macs(self) -> tuple[int, ...]:
        """MACs paid by an input that leaves at exit i: every segment up to i and every head up to i."""
        total, out = 0, []
        for s in self.stages:
            total += s.costs.segment_macs + s.costs.head_macs
            out.append(total)
        return tuple(out)

    def kappa(self) -> tuple[float, ...]:
        """The EENets authors' cost of exit i: trunk up to i plus head i only, as a fraction of ``full_macs``."""
        trunk, out = 0, []
        for s in self.stages:
            trunk += s.costs.segment_macs
            out.append((trunk + s.costs.head_macs) / max(self.full_macs, 1))
        return tuple(out)

    # ---- (de)serialisation -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
        if not isinstance(d, Mapping) or d.get("format") != FORMAT_NAME:
            raise BundleError(f"manifest: not an edgeexit bundle manifest (field 'format' is "
                              f"{d.get('format') if isinstance(d, Mapping) else None!r}, expected {FORMAT_NAME!r})")
        version = _need(d, "format_version", int, "manifest")
        if version > FORMAT_VERSION:
            raise BundleError(f"bundle format version {version} is newer than this edgeexit supports "
                              f"({FORMAT_VERSION}); upgrade edgeexit on this device (pip install -U edgeexit)")
        if version < 1:
            raise BundleError(f"bundle format version {version} is not valid; re-create the bundle")
        inp = _need(d, "input", dict, "manifest")
        stage_list = _need(d, "stages", list, "manifest")
        if len(stage_list) > MAX_STAGES:
            raise BundleError(f"manifest: {len(stage_list)} stages; at most {MAX_STAGES} are accepted")
        stages = tuple(StageSpec.from_dict(s, f"stages[{i}]") for i, s in enumerate(stage_list))
        labels = _need(d, "labels", list, "manifest")
        if not stages:
            raise BundleError("manifest: 'stages' is empty; a bundle needs at least one stage")
        if not labels or not all(isinstance(x, str) for x in labels):
            raise BundleError("manifest: 'labels' must be a non-empty list of strings")
        if len(labels) > MAX_LABELS or len(stages) > MAX_STAGES:
            raise BundleError(f"manifest: {len(labels)} labels and {len(stages)} stages; at most {MAX_LABELS} and "
                              f"{MAX_STAGES} are accepted")
        for i, label in enumerate(labels):
            if not label or len(label) > MAX_LABEL_CHARS or not label.isprintable():
                raise BundleError(f"manifest: label {i} is {_short(label)}; labels must be 1 to {MAX_LABEL_CHARS} "
                                  "printable characters (no newlines or control characters): re-create the bundle")
        mono = d.get("monolithic")
        return cls(format_version=version, producer=_need(d, "producer", str, "manifest"),
                   name=_need(d, "name", str, "manifest"),
                   input=TensorSpec.from_dict(_need(inp, "tensor", dict, "input"), "input.tensor"),
                   preprocessing=Preprocessing.from_dict(_need(inp, "preprocessing", dict, "input")),
                   labels=tuple(labels), stages=stages,
                   exit_rule=ExitRuleSpec.from_dict(_need(d, "exit_rule", dict, "manifest")),
                   monolithic=None if mono is None else ModelFile.from_dict(mono, "monolithic"),
                   full_macs=_cost(d, "full_macs", "manifest"),
                   operating_points=OperatingPoints.from_dict(_opt(d, "operating_points", dict, "manifest", {})),
                   verification=_opt(d, "verification", dict, "manifest", {}),
                   training=_opt(d, "training", dict, "manifest", {}),
                   edgetpu=_opt(d, "edgetpu", dict, "manifest", {}),
                   energy=_opt(d, "energy", dict, "manifest", {}),
                   activations=_activations(d), precision=_precision(d), source=d)

    def to_dict(self) -> dict[str, Any]:
        def plain(obj: Any) -> Any:
            if dataclasses.is_dataclass(obj):
                return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "source"}
            if isinstance(obj, Mapping):
                return {k: plain(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return [plain(v) for v in obj]
            return obj

        d = plain(self)
        d["exit_rule"] = self.exit_rule.to_dict()
        d["operating_points"] = self.operating_points.to_dict()
        if not d["precision"]:
            del d["precision"]  # all-integer bundles read as before
        out: dict[str, Any] = {"format": FORMAT_NAME, "format_version": d.pop("format_version")}
        out["producer"] = d.pop("producer")
        out["name"] = d.pop("name")
        out["input"] = {"tensor": d.pop("input"), "preprocessing": d.pop("preprocessing")}
        out.update(d)
        if self.source is not None:
            _keep_unknown(out, self.source, top=True)
            if self.exit_rule.fallback == "final":   # a known field: never carried over from the old rule
                out["exit_rule"].pop("fallback", None)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            data = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and int fields past 4300 digits
            raise BundleError(f"manifest.json is not valid JSON ({' '.join(str(exc).split())[:100]}); the bundle is "
                              "corrupt: re-copy or re-create it") from None
        except RecursionError:
            raise BundleError(f"manifest: nested deeper than {MAX_DEPTH} levels; the manifest was edited or is not "
                              "an edgeexit manifest: re-create the bundle") from None
        _check_tree(data)
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "Manifest":
        return dataclasses.replace(self, **changes)


#: Top-level fields whose values are free-form objects, written whole from the Manifest (never merged key by key).
_FREE_FORM = ("operating_points", "verification", "training", "edgetpu", "energy")


def _keep_unknown(new: dict[str, Any], old: Mapping[str, Any], top: bool = False) -> None:
    """Copy into ``new`` (a manifest's JSON form) the fields of ``old`` (the JSON it was read from) that this
    version does not know, at every level this module models: the top level, ``input``, stages (the same file
    only), tensors, costs, the monolithic model and the exit rule (the same kind only)."""
    for key, value in old.items():
        if key not in new:
            new[key] = copy.deepcopy(value)
        elif top and key in _FREE_FORM:
            continue
        elif key == "stages" and isinstance(new[key], list) and isinstance(value, list):
            for n, o in zip(new[key], value):
                if isinstance(n, dict) and isinstance(o, Mapping) and all(n.get(k) == o.get(k) for k in ("file", "sha256")):
                    _keep_unknown(n, o)
        elif isinstance(new[key], dict) and isinstance(value, Mapping):
            if key == "exit_rule" and new[key].get("kind") != value.get("kind"):
                continue
            _keep_unknown(new[key], value)


def _activations(d: Mapping[str, Any]) -> str:
    value = _opt(d, "activations", str, "manifest", "int8")
    if value not in ACTIVATIONS:
        raise BundleError(f"manifest: 'activations' is {_short(value)}; expected one of {', '.join(ACTIVATIONS)}: "
                          "re-create the bundle with `edgeexit convert`")
    return value


#: How a unit of a mixed-precision bundle computes (``precision.units.<unit>.kind``).
PRECISION_KINDS = ("int8", "mixed", "float32")


def _precision(d: Mapping[str, Any]) -> dict[str, Any]:
    """The ``precision`` section: {"mode": "auto", "units": {unit: {"kind", "float_layers"}}} or absent."""
    value = _opt(d, "precision", dict, "manifest", {})
    if not value:
        return {}
    units = _need(value, "units", dict, "precision")
    for unit, entry in units.items():
        where = f"precision.units.{str(unit)[:40]}"
        if not isinstance(entry, dict):
            raise BundleError(f"manifest: '{where}' must be an object; re-create the bundle with `edgeexit convert`")
        kind = _need(entry, "kind", str, where)
        layers = _need(entry, "float_layers", list, where)
        if kind not in PRECISION_KINDS:
            raise BundleError(f"manifest: '{where}.kind' is {_short(kind)}; expected one of "
                              f"{', '.join(PRECISION_KINDS)}: re-create the bundle with `edgeexit convert`")
        if not all(isinstance(x, str) for x in layers):
            raise BundleError(f"manifest: '{where}.float_layers' must be tensor names (strings): re-create the "
                              "bundle with `edgeexit convert`")
    return dict(value)


def tensor_spec(name: str, shape: Sequence[int], dtype: str, scale: float | None = None,
                zero_point: int | None = None) -> TensorSpec:
    """Convenience constructor used by the converter and tests."""
    q = None if scale is None else Quantization(float(scale), int(zero_point or 0))
    return TensorSpec(name=name, shape=tuple(int(s) for s in shape), dtype=dtype, quantization=q)
