"""Loading a bundle: every check happens here, once, before the first inference.

:func:`load_bundle` checks, in order: the signature over manifest.json when a trusted key is required
(:mod:`~edgeexit.runtime.signing`); the manifest (fields, types, ranges, format version); that every file it
names is a regular file inside the bundle directory (no absolute paths, no ``..``, no symlink leaving it,
no FIFO or device), every file's size and sha256; every .tflite file's structure
(:func:`~edgeexit.runtime.tflite.read_model`), before any interpreter sees it; that the files' input and
output tensors equal the manifest's (shape, dtype, and exactly the file's quantization: the Runner
dequantizes with the manifest's copy); that the manifest's costs are the files' (MACs and parameter bytes
per stage, ``full_macs``, the monolithic model's); that the preprocessing fits the input tensor (size,
colour channels, and pixels 0..255 reaching enough distinct int8 levels); that every stage with a
confidence output scores with softmax; and that every hand-off fits: stage i's ``features`` shape equals
stage i+1's input shape. Where a hand-off's quantization differs, a :class:`Requantization` is planned.
Every failure is a :class:`~edgeexit.errors.BundleError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import BundleError, UsageError, printable
from .atomic import STALE_TEMP_S, locked_directory, remove_temps, temp_files, write_file_atomic
from .files import describe_os_error, read_regular
from .interpreter import Backend, create_interpreter, resolve_backend
from .manifest import (ACTIVATION_DTYPES, MANIFEST_FILE, MAX_MANIFEST_BYTES, QUANTIZED_DTYPES, Manifest,
                       Quantization, StageSpec, TensorSpec, quant_equal)
from .preprocess import check_preprocessing
from .rules import rule_from_spec
from .tflite import MAX_FILE_BYTES, Model, Tensor, graph_costs, read_model

log = logging.getLogger(__name__)

#: The files of a bundle that are rewritten in place (tune, bench --store-energy, sign), under the bundle's lock.
_WRITTEN_FILES = (MANIFEST_FILE, "manifest.sig")

@dataclass(frozen=True)
class Requantization:
    """Re-encode an integer hand-off (int8 or int16) from one quantization to another: q' = round(s/s' (q - z)) + z',
    clipped to the destination dtype's range."""

    src: Quantization
    dst: Quantization

    def apply(self, q: np.ndarray, out: np.ndarray) -> None:
        """Requantize ``q`` (int8/uint8/int16, any shape) into ``out`` (same shape, destination dtype)."""
        info = np.iinfo(out.dtype)
        real = (q.astype(np.float32) - self.src.zero_point) * np.float32(self.src.scale / self.dst.scale)
        np.copyto(out, np.clip(np.rint(real) + self.dst.zero_point, info.min, info.max).astype(out.dtype))


@dataclass(frozen=True)
class StageTensors:
    """Where a stage's tensors live in its interpreter."""

    input_index: int
    output_index: Mapping[str, int]  # "features" / "logits" / "confidence" -> tensor index


@dataclass(frozen=True)
class Bundle:
    """A validated bundle: its manifest, the absolute paths of its files and the hand-off plan."""

    path: Path
    manifest: Manifest
    stage_files: tuple[Path, ...]
    monolithic_file: Path | None
    handoffs: tuple[Requantization | None, ...]  # one per boundary i -> i+1; None = pass the int8 bytes through
    backend: str                                  # interpreter backend the tensors were checked with
    manifest_bytes: bytes = b""                   # manifest.json exactly as read (and, if signed_by, verified)
    signed_by: str | None = None                  # key id of the trusted key whose signature was verified

    @property
    def num_exits(self) -> int:
        return self.manifest.num_exits


def _safe_file(root: Path, name: str, what: str) -> Path:
    """``root/name`` resolved, if it stays inside ``root``; BundleError otherwise (no file access yet)."""
    if not name or os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
        raise BundleError(f"manifest: {what} file {name!r} is not a plain relative path inside the bundle; "
                          "the manifest was edited or is not trustworthy: re-create the bundle")
    try:
        real = Path(os.path.realpath(root / name))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{name}: cannot resolve it ({describe_os_error(exc)}); re-copy the bundle") from None
    if real != root and root not in real.parents:
        raise BundleError(f"{name}: resolves to {printable(real)}, outside the bundle directory {printable(root)} (symlink?); "
                          "copy the real file into the bundle")
    if not os.path.lexists(real):
        raise BundleError(f"{name}: missing from the bundle {printable(root)}; re-copy the whole bundle directory")
    return real


def _check_file(root: Path, name: str, sha256: str, size: int, what: str) -> tuple[Path, bytes]:
    """The file's resolved path and bytes, checked against the manifest's size and sha256."""
    path = _safe_file(root, name, what)
    data = read_regular(path, MAX_FILE_BYTES, name)
    if len(data) != size:
        raise BundleError(f"{name}: {len(data)} bytes, the manifest says {size} (truncated or replaced); "
                          "re-copy the bundle")
    if hashlib.sha256(data).hexdigest() != sha256.lower():
        raise BundleError(f"{name}: sha256 mismatch (file was modified or corrupted); re-copy the bundle")
    return path, data


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _quant_exact(a: Quantization | None, b: Quantization | None) -> bool:
    """A file's quantization and the manifest's copy are the same float32 scale and zero point."""
    if a is None or b is None:
        return a is None and b is None
    return a.zero_point == b.zero_point and np.float32(a.scale) == np.float32(b.scale)


def tensor_from_detail(detail: Mapping[str, Any], name: str | None = None) -> TensorSpec:
    """A manifest TensorSpec from an interpreter tensor detail (per-tensor quantization; None if float)."""
    scale, zero_point = detail["quantization"]
    q = Quantization(float(scale), int(zero_point)) if scale else None
    return TensorSpec(name=name or str(detail["name"]), shape=tuple(int(v) for v in detail["shape"]),
                      dtype=np.dtype(detail["dtype"]).name, quantization=q)


def _same_tensor(actual: TensorSpec, expected: TensorSpec, file: str, what: str) -> None:
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise BundleError(f"{file}: {what} is {actual.dtype}{list(actual.shape)} but the manifest says "
                          f"{expected.dtype}{list(expected.shape)}; the file and manifest do not belong together: "
                          "re-create the bundle")
    if not _quant_exact(actual.quantization, expected.quantization):
        raise BundleError(f"{file}: {what} quantization is {actual.quantization} but the manifest says "
                          f"{expected.quantization} (the Runner dequantizes with the manifest's copy, which must be "
                          "the file's exactly); the manifest was edited: re-create the bundle")


def _match_io(spec: StageSpec, inputs: Sequence[Any], outputs: Mapping[str, Any],
              as_spec: Callable[[Any], TensorSpec]) -> None:
    """A stage's one graph input and its named outputs (interpreter details or file tensors, read by
    ``as_spec``) are the manifest's; BundleError naming the difference otherwise."""
    if len(inputs) != 1:
        raise BundleError(f"{spec.file}: has {len(inputs)} inputs, expected 1; re-create the bundle")
    _same_tensor(as_spec(inputs[0]), spec.input, spec.file, "input")
    for key, expected in spec.outputs.items():
        actual = outputs.get(expected.name)
        if actual is None:
            raise BundleError(f"{spec.file}: has no output tensor named {expected.name!r} ('{key}'); it has "
                              f"{sorted(outputs)}; re-create the bundle")
        _same_tensor(as_spec(actual), expected, spec.file, f"output '{key}'")


def check_stage_tensors(interp: Any, spec: StageSpec) -> StageTensors:
    """Compare a stage interpreter's tensors with the manifest and find their indices.

    Raises:
        BundleError: a missing output, or a shape / dtype / quantization that differs from the manifest.
    """
    inputs = interp.get_input_details()
    by_name = {str(d["name"]): d for d in interp.get_output_details()}
    _match_io(spec, inputs, by_name, tensor_from_detail)
    index = {key: int(by_name[expected.name]["index"]) for key, expected in spec.outputs.items()}
    return StageTensors(input_index=int(inputs[0]["index"]), output_index=index)


def plan_handoffs(manifest: Manifest) -> tuple[Requantization | None, ...]:
    """Check every hand-off's shape and dtype; plan a requantization where the quantization differs."""
    plan: list[Requantization | None] = []
    for prev, nxt in zip(manifest.stages[:-1], manifest.stages[1:]):
        feats = prev.outputs.get("features")
        if feats is None:
            raise BundleError(f"manifest: stage {prev.index} ({prev.file}) has no 'features' output to hand to "
                              f"stage {nxt.index}; re-create the bundle")
        if feats.shape != nxt.input.shape:
            raise BundleError(f"hand-off {prev.index}->{nxt.index}: {prev.file} features {list(feats.shape)} do not "
                              f"fit {nxt.file} input {list(nxt.input.shape)}; re-create the bundle")
        if feats.dtype != nxt.input.dtype or feats.dtype not in QUANTIZED_DTYPES:
            raise BundleError(f"hand-off {prev.index}->{nxt.index}: features are {feats.dtype}, next input is "
                              f"{nxt.input.dtype}; expected the same integer type (int8 or int16) on both sides: "
                              "re-create the bundle")
        if quant_equal(feats.quantization, nxt.input.quantization):
            plan.append(None)
        elif feats.quantization is None or nxt.input.quantization is None:
            raise BundleError(f"hand-off {prev.index}->{nxt.index}: one side has no quantization parameters; "
                              "re-create the bundle")
        else:
            log.warning("hand-off %d->%d: quantization %s != %s; requantizing at run time (slower)", prev.index,
                        nxt.index, feats.quantization, nxt.input.quantization)
            plan.append(Requantization(feats.quantization, nxt.input.quantization))
    return tuple(plan)


def _read_manifest(path: str | os.PathLike[str]) -> tuple[Path, bytes]:
    """(bundle dir, the bytes of its manifest.json)."""
    where = printable(os.fspath(path), 200)
    try:
        root = Path(os.path.realpath(os.fspath(path)))
        is_dir = root.is_dir()
    except (OSError, ValueError) as exc:
        raise BundleError(f"{where}: not a usable bundle path ({describe_os_error(exc)}); pass the directory "
                          "that holds manifest.json") from None
    if not is_dir:
        raise BundleError(f"{where}: not a bundle directory (it does not exist or is a file); pass the "
                          "directory that holds manifest.json")
    mfile = root / MANIFEST_FILE
    if not os.path.lexists(mfile):
        raise BundleError(f"{where}: no {MANIFEST_FILE}; is this an edgeexit bundle directory?")
    return root, read_regular(mfile, MAX_MANIFEST_BYTES, MANIFEST_FILE)


def _parse_manifest(data: bytes) -> Manifest:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{MANIFEST_FILE}: not UTF-8 text; the bundle is corrupt: re-copy it") from None
    return Manifest.from_json(text)


def read_manifest(path: str | os.PathLike[str]) -> tuple[Path, Manifest]:
    """Read and parse ``path/manifest.json`` (no file checks, no signature check). Returns (bundle dir, manifest)."""
    root, data = _read_manifest(path)
    return root, _parse_manifest(data)


def load_bundle(path: str | os.PathLike[str], *, backend: str | Backend = "auto", check_tensors: bool = True,
                trusted_key: Any = None) -> Bundle:
    """Load and validate a bundle directory.

    Args:
        path: the bundle directory (holds manifest.json and the .tflite files).
        backend: interpreter backend used to check the tensors ("auto" = first installed).
        check_tensors: also create an interpreter per stage file and compare its tensors with the manifest.
            The :class:`~edgeexit.runtime.runner.Runner` passes False and checks its own interpreters instead.
            The files' structure, tensors and costs are checked either way (without an interpreter), and the
            monolithic model (which the Runner loads only on demand) with an interpreter.
        trusted_key: require ``manifest.sig`` to be a valid signature by this Ed25519 public key (a PEM
            file's path or a loaded key); None = the key named by ``$EDGEEXIT_TRUSTED_KEY`` if set (set but
            empty is a UsageError), else none.

    Returns:
        The validated :class:`Bundle`.

    Raises:
        BundleError: anything wrong with the manifest, its signature or the files (one-line message).
        InterpreterError: no interpreter is installed, or one cannot load a file.
        UsageError: ``path`` is not a path, an unreadable trusted key, ``$EDGEEXIT_TRUSTED_KEY`` set but empty, or
            signing support (cryptography) not installed.
    """
    from .signing import TRUSTED_KEY_ENV

    if not isinstance(path, (str, bytes, os.PathLike)):
        raise UsageError(f"a bundle is a directory path (str or pathlib.Path) or a Bundle from load_bundle(), got "
                         f"{type(path).__name__}")
    env_key = os.environ.get(TRUSTED_KEY_ENV)
    if trusted_key is None and env_key is not None:
        if not env_key.strip():  # set but empty: a mistake (an unset variable in a script), never "no check"
            raise UsageError(f"${TRUSTED_KEY_ENV} is set but empty; set it to the trusted public key file "
                             f"(PEM), or unset it to load bundles without requiring a signature")
        trusted_key = env_key
    _clean_abandoned_temps(path)
    return _load_bundle(path, backend=backend, check_tensors=check_tensors, trusted_key=trusted_key)


def _load_bundle(path: str | os.PathLike[str], *, backend: str | Backend, check_tensors: bool,
                 trusted_key: Any) -> Bundle:
    root, data = _read_manifest(path)
    signed_by = None
    if trusted_key is not None:  # before anything reads the manifest's contents
        from .signing import SIGNATURE_FILE, verify_manifest

        sig_path = root / SIGNATURE_FILE
        sig = read_regular(sig_path, 4096, SIGNATURE_FILE) if os.path.lexists(sig_path) else None
        signed_by = verify_manifest(data, sig, trusted_key)
    manifest = _parse_manifest(data)
    _check_manifest(manifest)
    files = [_check_file(root, s.file, s.sha256, s.size_bytes, f"stage {s.index}") for s in manifest.stages]
    stage_files = tuple(p for p, _ in files)
    models = [read_model(d, s.file) for (_, d), s in zip(files, manifest.stages)]
    for spec, model in zip(manifest.stages, models):
        _check_stage_file(model, spec)
    mono = manifest.monolithic
    mono_file = None
    if mono is not None:
        mono_file, mono_data = _check_file(root, mono.file, mono.sha256, mono.size_bytes, "monolithic")
        _check_monolithic_file(read_model(mono_data, mono.file), manifest)
    _check_costs(manifest, models)
    check_preprocessing(manifest.preprocessing, manifest.input)
    handoffs = plan_handoffs(manifest)
    resolved = backend if isinstance(backend, Backend) else resolve_backend(backend)
    if check_tensors:
        for spec, file in zip(manifest.stages, stage_files):
            check_stage_tensors(create_interpreter(file, resolved, sha256=spec.sha256), spec)
    if mono is not None and mono_file is not None:  # the Runner creates it only when asked: check it here
        check_model_tensors(create_interpreter(mono_file, resolved, sha256=mono.sha256), mono.input, mono.output,
                            mono.file)
    log.info("bundle %s: %d stages checked%s", root, manifest.num_exits,
             f", signed by {signed_by}" if signed_by else "")
    return Bundle(path=root, manifest=manifest, stage_files=stage_files, monolithic_file=mono_file,
                  handoffs=handoffs, backend=resolved.name, manifest_bytes=data, signed_by=signed_by)


def _check_manifest(manifest: Manifest) -> None:
    """What the manifest must satisfy on its own (the fields' types and ranges are checked by Manifest)."""
    for i, s in enumerate(manifest.stages):
        if s.index != i:
            raise BundleError(f"manifest: stages[{i}].index is {s.index}, expected {i}; re-create the bundle")
    first = manifest.stages[0].input
    if (first.shape, first.dtype) != (manifest.input.shape, manifest.input.dtype) or not _quant_exact(
            first.quantization, manifest.input.quantization):
        raise BundleError("manifest: 'input.tensor' differs from stage 0's input; re-create the bundle")
    rule = manifest.exit_rule
    if rule.thresholds and len(rule.thresholds) != manifest.num_exits - 1:
        raise BundleError(f"manifest: exit_rule has {len(rule.thresholds)} thresholds, expected "
                          f"{manifest.num_exits - 1} (one per exit except the last); re-tune or re-create the bundle")
    if rule.exit is not None and not 0 <= rule.exit < manifest.num_exits:
        raise BundleError(f"manifest: exit_rule.exit is {rule.exit}; the bundle has exits 0..{manifest.num_exits - 1}")
    try:  # the rule's own checks (threshold ranges, a confidence output where the rule needs one)
        rule_from_spec(rule).prepare(manifest.num_exits, [s.scores for s in manifest.stages],
                                     ["confidence" in s.outputs for s in manifest.stages])
    except UsageError as exc:
        raise BundleError(f"manifest: exit_rule: {exc}") from None
    for s in manifest.stages:
        if s.outputs["logits"].shape[-1] != manifest.num_classes:
            raise BundleError(f"{s.file}: logits have {s.outputs['logits'].shape[-1]} classes, the manifest has "
                              f"{manifest.num_classes} labels; re-create the bundle")
        if "confidence" in s.outputs and s.scores != "softmax":
            raise BundleError(f"manifest: stage {s.index} has a confidence output (an EENet-style exit, softmax "
                              f"scores) but says scores {s.scores!r}; the manifest was edited: re-create the bundle")
    _check_activations(manifest)
    names = [s.file for s in manifest.stages] + ([manifest.monolithic.file] if manifest.monolithic else [])
    if len(set(names)) != len(names):
        raise BundleError(f"manifest: a file is named twice in {names}; re-create the bundle")


def _check_activations(manifest: Manifest) -> None:
    """Every stage's input and outputs, and the monolithic model's, are of the bundle's activation type: a bundle
    never mixes int8 and int16 files (nor hands int16 features to an int8 stage)."""
    allowed = ACTIVATION_DTYPES[manifest.activations]
    # other types (float32, int32) are refused later, with their own messages
    units = [(s.file, [s.input, *s.outputs.values()]) for s in manifest.stages]
    if manifest.monolithic is not None:
        units.append((manifest.monolithic.file, [manifest.monolithic.input, manifest.monolithic.output]))
    for file, tensors in units:
        for t in tensors:
            if t.dtype in QUANTIZED_DTYPES and t.dtype not in allowed:
                raise BundleError(f"{file}: tensor {t.name!r} is {t.dtype} but the bundle's activations are "
                                  f"{manifest.activations}; a bundle must not mix int8 and int16 files: re-create it "
                                  f"with `edgeexit convert --activations {manifest.activations}`")


def _file_tensor(t: Tensor) -> TensorSpec:
    q = None
    if t.quant is not None:
        if len(t.quant.scales) != 1:
            raise BundleError(f"tensor {t.name!r} is quantized per channel; a stage's inputs and outputs must be "
                              "quantized per tensor: re-create the bundle")
        q = Quantization(t.quant.scales[0], t.quant.zero_points[0])
    return TensorSpec(name=t.name, shape=t.shape, dtype=t.dtype, quantization=q)


def _check_stage_file(model: Model, spec: StageSpec) -> None:
    """The file's graph inputs and outputs are the manifest's (compared before any interpreter sees the file)."""
    _match_io(spec, [model.tensors[i] for i in model.inputs],
              {model.tensors[t].name: model.tensors[t] for t in model.outputs}, _file_tensor)


def _check_monolithic_file(model: Model, manifest: Manifest) -> None:
    mono = manifest.monolithic
    assert mono is not None
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise BundleError(f"{mono.file}: has {len(model.inputs)} inputs and {len(model.outputs)} outputs, expected "
                          "1 and 1; re-create the bundle")
    _same_tensor(_file_tensor(model.tensors[model.inputs[0]]), mono.input, mono.file, "input")
    _same_tensor(_file_tensor(model.tensors[model.outputs[0]]), mono.output, mono.file, "output")
    if (mono.input.shape, mono.input.dtype) != (manifest.input.shape, manifest.input.dtype):
        raise BundleError(f"{mono.file}: input {list(mono.input.shape)} differs from the bundle's input; re-create "
                          "the bundle")
    if mono.output.shape[-1] != manifest.num_classes:
        raise BundleError(f"{mono.file}: {mono.output.shape[-1]} classes, the manifest has {manifest.num_classes} "
                          "labels; re-create the bundle")
    if not model.has_custom_ops:
        g = graph_costs(model, None)
        if (mono.macs, mono.param_bytes) != (g.macs, g.param_bytes):
            raise BundleError(f"manifest: monolithic macs / param_bytes {mono.macs} / {mono.param_bytes} are not the "
                              f"file's {g.macs} / {g.param_bytes}; the manifest was edited: re-create the bundle")


def _check_costs(manifest: Manifest, models: list[Model]) -> None:
    """Every stage's MACs and parameter bytes, and ``full_macs``, are the ones counted on the files."""
    if any(m.has_custom_ops for m in models):
        return  # compiled graphs (Edge TPU) hide their ops: nothing to count
    last = None
    for spec, model in zip(manifest.stages, models):
        g = graph_costs(model, "features" if "features" in spec.outputs else None)
        counted = (g.segment_macs, g.head_macs, g.segment_param_bytes, g.head_param_bytes)
        c = spec.costs
        if (c.segment_macs, c.head_macs, c.segment_param_bytes, c.head_param_bytes) != counted:
            raise BundleError(f"manifest: stage {spec.index} costs (segment/head MACs, segment/head bytes) "
                              f"{[c.segment_macs, c.head_macs, c.segment_param_bytes, c.head_param_bytes]} are not "
                              f"the file's {list(counted)}; the manifest was edited: re-create the bundle")
        last = g.head_macs, g.head_output_macs.get(spec.outputs["logits"].name, g.head_macs)
    segments = sum(s.costs.segment_macs for s in manifest.stages)
    # every segment + the whole final head; bundles written before that definition counted only the final
    # head's logits part (its confidence output excluded), which is accepted as well
    allowed = {segments + last[0], segments + last[1]} if last is not None else {segments}
    if manifest.full_macs not in allowed:
        raise BundleError(f"manifest: full_macs is {manifest.full_macs}, the files count {segments + last[0]} (every "
                          "segment plus the final head); the manifest was edited: re-create the bundle")


def check_model_tensors(interp: Any, input_spec: TensorSpec, output_spec: TensorSpec, file: str) -> tuple[int, int]:
    """Check a single-input single-output model (the monolithic baseline); returns (input, output) indices."""
    inputs, outputs = interp.get_input_details(), interp.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise BundleError(f"{file}: has {len(inputs)} inputs and {len(outputs)} outputs, expected 1 and 1; "
                          "re-create the bundle")
    _same_tensor(tensor_from_detail(inputs[0]), input_spec, file, "input")
    _same_tensor(tensor_from_detail(outputs[0]), output_spec, file, "output")
    return int(inputs[0]["index"]), int(outputs[0]["index"])


def write_manifest_atomic(bundle_dir: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Replace ``bundle_dir/manifest.json`` atomically (:func:`edgeexit.runtime.atomic.write_file_atomic`).

    A power cut leaves either the old or the new manifest, never a half-written one. A bundle's signature
    (``manifest.sig``) covers the old manifest only: sign the bundle again afterwards.

    Returns:
        The manifest's path.

    Raises:
        BundleError: the directory does not exist or cannot be written.
    """
    return replace_file_atomic(bundle_dir, MANIFEST_FILE, manifest.to_json().encode("utf-8"))


def replace_file_atomic(bundle_dir: str | os.PathLike[str], name: str, data: bytes) -> Path:
    """Replace ``bundle_dir/name`` with ``data`` atomically (:func:`edgeexit.runtime.atomic.write_file_atomic`),
    holding the bundle directory's lock (:func:`~edgeexit.runtime.atomic.locked_directory`): writers of one bundle
    take turns, and the temporary files that killed writers left are removed first, whatever their age."""
    root = Path(os.fspath(bundle_dir))
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory; cannot write {name}")
    target = root / name
    try:
        with locked_directory(root) as held:
            for written in _WRITTEN_FILES:
                remove_temps(root / written, older_than_s=0.0 if held else STALE_TEMP_S)
            write_file_atomic(target, data, stale_after_s=None)
    except OSError as exc:
        raise BundleError(f"{target}: cannot write ({exc.strerror}); check permissions and free space") from None
    return target


def _clean_abandoned_temps(path: str | bytes | os.PathLike[str]) -> None:
    """Remove the temporary files of manifest / signature writers that were killed (see
    :func:`replace_file_atomic`), when no writer holds the bundle's lock now. Never fails a load."""
    try:
        root = Path(os.fsdecode(path))
        if not root.is_dir() or not any(temp_files(root / n) for n in _WRITTEN_FILES):
            return
        with locked_directory(root, blocking=False) as held:
            if held:
                for written in _WRITTEN_FILES:
                    remove_temps(root / written)
    except (OSError, ValueError) as exc:  # a read-only copy, odd names: the load reports what matters
        log.debug("bundle %r: temporary files left as they are (%s)", path, exc)


__all__ = ["Bundle", "Requantization", "StageTensors", "load_bundle", "read_manifest", "write_manifest_atomic",
           "replace_file_atomic", "check_stage_tensors", "check_model_tensors", "plan_handoffs"]
