"""Loading a bundle: every check happens here, once, before the first inference.

:func:`load_bundle` checks, in order: the manifest (fields, types, format version), that every file it
names is a regular file inside the bundle directory (no absolute paths, no ``..``, no symlink leaving it),
every file's size and sha256, that every stage file's tensors (as the interpreter reports them) equal the
manifest's, and that every hand-off fits: stage i's ``features`` shape equals stage i+1's input shape.
Where a hand-off's quantization differs, a :class:`Requantization` is planned for that boundary.
Every failure is a :class:`~edgeexit.errors.BundleError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import BundleError
from .atomic import write_file_atomic
from .interpreter import Backend, create_interpreter, resolve_backend
from .manifest import MANIFEST_FILE, Manifest, Quantization, StageSpec, TensorSpec, quant_equal

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Requantization:
    """Re-encode an int8 hand-off from one quantization to another: q' = round(s/s' (q - z)) + z'."""

    src: Quantization
    dst: Quantization

    def apply(self, q: np.ndarray, out: np.ndarray) -> None:
        """Requantize ``q`` (int8/uint8, any shape) into ``out`` (same shape, destination dtype)."""
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

    @property
    def num_exits(self) -> int:
        return self.manifest.num_exits


def _safe_file(root: Path, name: str, what: str) -> Path:
    """``root/name`` if it is a regular file inside ``root``; BundleError otherwise."""
    if not name or os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
        raise BundleError(f"manifest: {what} file {name!r} is not a plain relative path inside the bundle; "
                          "the manifest was edited or is not trustworthy: re-create the bundle")
    path = root / name
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise BundleError(f"{name}: resolves to {real}, outside the bundle directory {root} (symlink?); copy the "
                          "real file into the bundle")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise BundleError(f"{name}: missing from the bundle {root}; re-copy the whole bundle directory") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{name}: is not a regular file; re-copy the bundle")
    return real


def _check_file(root: Path, name: str, sha256: str, size: int, what: str) -> Path:
    path = _safe_file(root, name, what)
    actual_size = path.stat().st_size
    if actual_size != size:
        raise BundleError(f"{name}: {actual_size} bytes, the manifest says {size} (truncated or replaced); "
                          "re-copy the bundle")
    if sha256_file(path) != sha256.lower():
        raise BundleError(f"{name}: sha256 mismatch (file was modified or corrupted); re-copy the bundle")
    return path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    if not quant_equal(actual.quantization, expected.quantization):
        raise BundleError(f"{file}: {what} quantization is {actual.quantization} but the manifest says "
                          f"{expected.quantization}; re-create the bundle")


def check_stage_tensors(interp: Any, spec: StageSpec) -> StageTensors:
    """Compare a stage interpreter's tensors with the manifest and find their indices.

    Raises:
        BundleError: a missing output, or a shape / dtype / quantization that differs from the manifest.
    """
    inputs = interp.get_input_details()
    if len(inputs) != 1:
        raise BundleError(f"{spec.file}: has {len(inputs)} inputs, expected 1; re-create the bundle")
    _same_tensor(tensor_from_detail(inputs[0]), spec.input, spec.file, "input")
    by_name = {str(d["name"]): d for d in interp.get_output_details()}
    index = {}
    for key, expected in spec.outputs.items():
        detail = by_name.get(expected.name)
        if detail is None:
            raise BundleError(f"{spec.file}: has no output tensor named {expected.name!r} ('{key}'); it has "
                              f"{sorted(by_name)}; re-create the bundle")
        _same_tensor(tensor_from_detail(detail), expected, spec.file, f"output '{key}'")
        index[key] = int(detail["index"])
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
        if feats.dtype != nxt.input.dtype or feats.dtype not in ("int8", "uint8"):
            raise BundleError(f"hand-off {prev.index}->{nxt.index}: features are {feats.dtype}, next input is "
                              f"{nxt.input.dtype}; expected int8 on both sides: re-create the bundle")
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


def read_manifest(path: str | os.PathLike[str]) -> tuple[Path, Manifest]:
    """Read and parse ``path/manifest.json`` (no file checks). Returns (bundle dir, manifest)."""
    root = Path(os.path.realpath(os.fspath(path)))
    if not root.is_dir():
        raise BundleError(f"{os.fspath(path)}: not a bundle directory (it does not exist or is a file); pass the "
                          "directory that holds manifest.json")
    mfile = root / MANIFEST_FILE
    try:
        text = mfile.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(f"{os.fspath(path)}: no {MANIFEST_FILE}; is this an edgeexit bundle directory?") from None
    except UnicodeDecodeError:
        raise BundleError(f"{MANIFEST_FILE}: not UTF-8 text; the bundle is corrupt: re-copy it") from None
    return root, Manifest.from_json(text)


def load_bundle(path: str | os.PathLike[str], *, backend: str | Backend = "auto",
                check_tensors: bool = True) -> Bundle:
    """Load and validate a bundle directory.

    Args:
        path: the bundle directory (holds manifest.json and the .tflite files).
        backend: interpreter backend used to check the tensors ("auto" = first installed).
        check_tensors: create an interpreter per file and compare its tensors with the manifest. The
            :class:`~edgeexit.runtime.runner.Runner` passes False and checks its own interpreters instead.

    Returns:
        The validated :class:`Bundle`.

    Raises:
        BundleError: anything wrong with the manifest or the files (one-line message).
        InterpreterError: no interpreter is installed, or one cannot load a file.
    """
    root, manifest = read_manifest(path)
    for i, s in enumerate(manifest.stages):
        if s.index != i:
            raise BundleError(f"manifest: stages[{i}].index is {s.index}, expected {i}; re-create the bundle")
    first = manifest.stages[0].input
    if (first.shape, first.dtype) != (manifest.input.shape, manifest.input.dtype) or not quant_equal(
            first.quantization, manifest.input.quantization):
        raise BundleError("manifest: 'input.tensor' differs from stage 0's input; re-create the bundle")
    if manifest.exit_rule.thresholds and len(manifest.exit_rule.thresholds) != manifest.num_exits - 1:
        raise BundleError(f"manifest: exit_rule has {len(manifest.exit_rule.thresholds)} thresholds, expected "
                          f"{manifest.num_exits - 1} (one per exit except the last); re-tune or re-create the bundle")
    for s in manifest.stages:
        if s.outputs["logits"].shape[-1] != manifest.num_classes:
            raise BundleError(f"{s.file}: logits have {s.outputs['logits'].shape[-1]} classes, the manifest has "
                              f"{manifest.num_classes} labels; re-create the bundle")
    stage_files = tuple(_check_file(root, s.file, s.sha256, s.size_bytes, f"stage {s.index}") for s in manifest.stages)
    mono = manifest.monolithic
    mono_file = None if mono is None else _check_file(root, mono.file, mono.sha256, mono.size_bytes, "monolithic")
    handoffs = plan_handoffs(manifest)
    resolved = backend if isinstance(backend, Backend) else resolve_backend(backend)
    if check_tensors:
        for spec, file in zip(manifest.stages, stage_files):
            check_stage_tensors(create_interpreter(file, resolved), spec)
        if mono is not None and mono_file is not None:
            check_model_tensors(create_interpreter(mono_file, resolved), mono.input, mono.output, mono.file)
    log.info("bundle %s: %d stages checked", root, manifest.num_exits)
    return Bundle(path=root, manifest=manifest, stage_files=stage_files, monolithic_file=mono_file,
                  handoffs=handoffs, backend=resolved.name)


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

    A power cut leaves either the old or the new manifest, never a half-written one.

    Returns:
        The manifest's path.

    Raises:
        BundleError: the directory does not exist or cannot be written.
    """
    root = Path(os.fspath(bundle_dir))
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory; cannot write {MANIFEST_FILE}")
    target = root / MANIFEST_FILE
    data = manifest.to_json().encode("utf-8")
    try:
        write_file_atomic(target, data)
    except OSError as exc:
        raise BundleError(f"{target}: cannot write ({exc.strerror}); check permissions and free space") from None
    return target


__all__ = ["Bundle", "Requantization", "StageTensors", "load_bundle", "read_manifest", "write_manifest_atomic",
           "check_stage_tensors", "check_model_tensors", "plan_handoffs"]
