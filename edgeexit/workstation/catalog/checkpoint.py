"""Checkpoints that rebuild their own model.

Format (``torch.save`` of a plain dict, loaded with ``weights_only=True``)::

    {"format": "edgeexit-checkpoint", "version": 1, "spec": ModelSpec.to_dict(),
     "state_dict": {...}, "metrics": {...}, "costs": ModelCosts.to_dict()}

Written atomically (:func:`edgeexit.runtime.atomic.write_file_atomic`: temporary file beside it, fsync, rename).

The weights of a network of one's own are read by :mod:`edgeexit.workstation.models.weights`.
"""

from __future__ import annotations

import os
import re
import types
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from edgeexit.errors import CheckpointError, UsageError, clip
from edgeexit.runtime.atomic import write_file_atomic

from ..models.costs import model_costs
from ..models.staged import ModelSpec, StagedModel

FORMAT_NAME = "edgeexit-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(model: StagedModel, path: str | os.PathLike, metrics: dict[str, Any] | None = None,
                    force: bool = False) -> Path:
    """Write ``model`` (spec + weights + metrics + costs) to ``path`` atomically.

    Raises:
        UsageError: ``path`` exists and ``force`` is False.
    """
    path = Path(path)
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; pass --force (force=True) to overwrite it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "spec": model.spec.to_dict(),
               "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
               "metrics": metrics or {}, "costs": model_costs(model).to_dict()}
    return write_file_atomic(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a checkpoint's dict without building the model.

    Raises:
        CheckpointError: missing file, not a checkpoint, corrupt, or a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `edgeexit train --output {path}`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's unpickler raises any of a dozen types on junk bytes
        raise CheckpointError(f"{path} is not a readable checkpoint (torch.load failed: {type(exc).__name__}); it is "
                              "corrupt or not a file written by `edgeexit train`") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an edgeexit checkpoint (no format '{FORMAT_NAME}'); "
                              "give a file written by `edgeexit train`")
    version = payload.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; this edgeexit reads version "
                              f"{FORMAT_VERSION}: upgrade edgeexit or re-train")
    for key in ("spec", "state_dict"):
        if not isinstance(payload.get(key), dict):
            raise CheckpointError(f"{path} lacks '{key}'; the checkpoint is incomplete, re-train it")
    return payload


def load_checkpoint(path: str | os.PathLike) -> StagedModel:
    """Rebuild the model a checkpoint describes and load its weights (eval mode, CPU).

    Raises:
        CheckpointError: see :func:`read_checkpoint`, plus an unknown builder or weights that do not fit.
    """
    from .registry import build  # registry imports every builder

    payload = read_checkpoint(path)
    try:
        spec = ModelSpec.from_dict(payload["spec"])
        model = build(spec)
    except (TypeError, KeyError, ValueError) as exc:  # UsageError is a ValueError
        raise CheckpointError(f"{path}: its model spec cannot be rebuilt ({exc}); the checkpoint is from another "
                              "version or was edited") from None
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = clip("; ".join(line.strip() for line in first[1:3]), 200)
        raise CheckpointError(f"{path}: weights do not fit the architecture '{spec.builder}' ({detail}); "
                              "the checkpoint was edited or comes from a different model") from None
    model.eval()
    return model
