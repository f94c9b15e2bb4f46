"""Workstation side (torch, TensorFlow, onnx2tf): models, training, post-training, own networks, conversion; never
imported by the device side.

The public API is exported here and imported on first use (PEP 562), so ``import edgeexit.workstation`` loads no
torch until a name is used::

    from edgeexit.workstation import convert, stage_network

    staged = stage_network(my_net, input_shape=(1, 28, 28), mean=0.5, std=0.5)
    report = convert(staged, calib_images, "runs/my-bundle", verify_images=x_test, verify_labels=y_test)
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> "module:attribute", imported when the name is first read.
_EXPORTS = {
    # models: build, save and load
    "create_model": "edgeexit.workstation.catalog.registry:create",
    "StagedModel": "edgeexit.workstation.models.staged:StagedModel",
    "save_checkpoint": "edgeexit.workstation.catalog.checkpoint:save_checkpoint",
    "load_checkpoint": "edgeexit.workstation.catalog.checkpoint:load_checkpoint",
    # training (EENets) and its configuration
    "train": "edgeexit.workstation.training.train:train",
    "evaluate": "edgeexit.workstation.training.train:evaluate",
    "TrainConfig": "edgeexit.workstation.training.train:TrainConfig",
    "TrainResult": "edgeexit.workstation.training.train:TrainResult",
    # post-training on a frozen backbone (the post-train command): PTEENet branches, class-based exits
    "attach_branches": "edgeexit.workstation.posttrain.pteenet:attach_branches",
    "train_branches": "edgeexit.workstation.posttrain.pteenet:train_branches",
    "attach_class_exits": "edgeexit.workstation.posttrain.classexit:attach_class_exits",
    "train_class_exits": "edgeexit.workstation.posttrain.classexit:train_class_exits",
    # networks of users' own
    "stage_network": "edgeexit.workstation.own.user_network:stage_network",
    "stage_onnx": "edgeexit.workstation.own.onnx_network:stage_onnx",
    # conversion to an int8 bundle, its verification tolerances and report
    "convert": "edgeexit.workstation.conversion.pipeline:convert",
    "ConversionReport": "edgeexit.workstation.conversion.pipeline:ConversionReport",
    "VerificationWarning": "edgeexit.workstation.conversion.pipeline:VerificationWarning",
    "Tolerances": "edgeexit.workstation.conversion.verify:Tolerances",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import an exported name's module on first use (later reads find it in the module's namespace)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attr = _EXPORTS[name].partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
