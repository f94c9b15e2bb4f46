"""``edgeexit.workstation`` exports its public API lazily: importing the package loads no torch, TensorFlow or
ONNX; each exported name, when read, is the object of the module that implements it."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")  # the exported names need the workstation stack
pytestmark = pytest.mark.workstation

HEAVY = ("torch", "tensorflow", "onnx", "onnx2tf", "onnxruntime")

SCRIPT = r"""
import json, sys
import edgeexit.workstation as ws
before = sorted(sys.modules)
convert = ws.convert
print(json.dumps({"before": before, "after": sorted(sys.modules), "all": ws.__all__,
                  "convert": [convert.__module__, convert.__qualname__], "dir": "stage_network" in dir(ws)}))
"""


def _heavy(loaded: list[str]) -> list[str]:
    return sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_importing_the_workstation_package_loads_no_torch_until_a_name_is_used():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=300)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert _heavy(data["before"]) == []
    assert [m for m in data["before"] if m.startswith("edgeexit.workstation.")] == []
    assert "torch" in data["after"] and "edgeexit.workstation.conversion.pipeline" in data["after"]
    assert data["convert"] == ["edgeexit.workstation.conversion.pipeline", "convert"]
    assert data["dir"] is True


def test_every_exported_name_is_the_implementing_object():
    import edgeexit.workstation as ws

    expected = {
        "convert": "edgeexit.workstation.conversion.pipeline",
        "ConversionReport": "edgeexit.workstation.conversion.pipeline",
        "VerificationWarning": "edgeexit.workstation.conversion.pipeline",
        "Tolerances": "edgeexit.workstation.conversion.verify",
        "stage_network": "edgeexit.workstation.own.user_network", "stage_onnx": "edgeexit.workstation.own.onnx_network",
        "train": "edgeexit.workstation.training.train", "evaluate": "edgeexit.workstation.training.train",
        "TrainConfig": "edgeexit.workstation.training.train", "TrainResult": "edgeexit.workstation.training.train",
        "attach_branches": "edgeexit.workstation.posttrain.pteenet",
        "train_branches": "edgeexit.workstation.posttrain.pteenet",
        "attach_class_exits": "edgeexit.workstation.posttrain.classexit",
        "train_class_exits": "edgeexit.workstation.posttrain.classexit",
        "create_model": "edgeexit.workstation.catalog.registry", "StagedModel": "edgeexit.workstation.models.staged",
        "save_checkpoint": "edgeexit.workstation.catalog.checkpoint",
        "load_checkpoint": "edgeexit.workstation.catalog.checkpoint",
    }
    assert ws.__all__ == sorted(expected)
    for name, module in expected.items():
        attr = "create" if name == "create_model" else name
        assert getattr(ws, name) is getattr(importlib.import_module(module), attr), name
    with pytest.raises(AttributeError, match="has no attribute 'stage_networks'"):
        ws.stage_networks  # noqa: B018
