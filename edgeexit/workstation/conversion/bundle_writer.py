"""Step 5 of the conversion pipeline: describe the converted files in a Manifest and write the bundle atomically.

The bundle is assembled in a sibling temporary directory (:func:`edgeexit.runtime.atomic.staging_dir`) and
swapped into place only when it is complete (:func:`edgeexit.runtime.atomic.publish_dir`), so an interrupted or
failed conversion leaves nothing at the target, and an existing bundle (``force``) stays whole until the swap.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgeexit.errors import UsageError
from edgeexit.runtime.atomic import publish_dir
from edgeexit.runtime.bundle import sha256_file, tensor_from_detail
from edgeexit.runtime.manifest import (FORMAT_VERSION, MANIFEST_FILE, ExitRuleSpec, Manifest, ModelFile, Preprocessing,
                               Quantization, StageCosts, StageSpec, TensorSpec)

log = logging.getLogger(__name__)

PRODUCER = "edgeexit 0.1.0"


def stage_tensors(interpreter: Any, path: Path) -> tuple[TensorSpec, dict[str, TensorSpec]]:
    """The single input and the named outputs (features/logits/confidence) of a stage interpreter."""
    from edgeexit.errors import ConversionError

    inputs = interpreter.get_input_details()
    if len(inputs) != 1:
        raise ConversionError(f"{path.name}: converted graph has {len(inputs)} inputs, expected 1")
    outputs = {str(d["name"]): tensor_from_detail(d) for d in interpreter.get_output_details()}
    unknown = set(outputs) - {"features", "logits", "confidence"}
    if "logits" not in outputs or unknown:
        raise ConversionError(f"{path.name}: converted graph has outputs {sorted(outputs)}, expected features, logits "
                              "and optionally confidence; the output names were not kept by the converter")
    ordered = {k: outputs[k] for k in ("features", "logits", "confidence") if k in outputs}
    return tensor_from_detail(inputs[0]), ordered


def model_file(path: Path, interpreter: Any, macs: int, param_bytes: int) -> ModelFile:
    """The manifest entry of a single-file model (the monolithic baseline)."""
    inp = tensor_from_detail(interpreter.get_input_details()[0])
    out = tensor_from_detail(interpreter.get_output_details()[0])
    return ModelFile(file=path.name, sha256=sha256_file(path), size_bytes=path.stat().st_size, input=inp,
                     output=out, macs=macs, param_bytes=param_bytes)


def stage_spec(index: int, path: Path, interpreter: Any, scores: str, costs: StageCosts) -> StageSpec:
    """The manifest entry of one stage file."""
    inp, outputs = stage_tensors(interpreter, path)
    return StageSpec(index=index, file=path.name, sha256=sha256_file(path), size_bytes=path.stat().st_size,
                     input=inp, outputs=outputs, scores=scores, costs=costs)


def build_manifest(name: str, stages: Sequence[StageSpec], preprocessing: Preprocessing, labels: Sequence[str],
                   exit_rule: ExitRuleSpec, full_macs: int, monolithic: ModelFile | None,
                   verification: Mapping[str, Any], training: Mapping[str, Any],
                   activations: str = "int8", precision: Mapping[str, Any] | None = None) -> Manifest:
    """Assemble the Manifest and check it survives a JSON round trip."""
    manifest = Manifest(format_version=FORMAT_VERSION, producer=PRODUCER, name=name, input=stages[0].input,
                        preprocessing=preprocessing, labels=tuple(labels), stages=tuple(stages),
                        exit_rule=exit_rule, monolithic=monolithic, full_macs=int(full_macs),
                        verification=dict(verification), training=dict(training), activations=activations,
                        precision=dict(precision or {}))
    Manifest.from_json(manifest.to_json())  # validates every field the way the device will
    return manifest


def check_target(out_dir: Path, force: bool) -> None:
    """UsageError if ``out_dir`` exists and ``force`` is not set, or is not a directory we may replace."""
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise UsageError(f"output {out_dir} already exists; pass --force (force=True) to replace it, or choose "
                             "another --out")
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise UsageError(f"output {out_dir} exists and is not a directory; remove it or choose another --out")
    if not out_dir.parent.is_dir():
        raise UsageError(f"output's parent directory {out_dir.parent} does not exist; create it first")


def write_manifest(staged: Path, manifest: Manifest) -> Path:
    """Write manifest.json into the staging directory (:func:`publish` flushes every file to disk)."""
    path = staged / MANIFEST_FILE
    path.write_text(manifest.to_json(), encoding="utf-8")
    return path


def publish(staged: Path, out_dir: Path, force: bool) -> Path:
    """Swap a complete staging directory in at ``out_dir`` (replacing an existing bundle only when ``force``).

    Returns:
        ``out_dir``.
    """
    check_target(out_dir, force)
    publish_dir(staged, out_dir)
    log.info("bundle written to %s", out_dir)
    return out_dir
