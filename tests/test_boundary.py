"""The device runtime never loads the workstation stack (torch, TensorFlow, ONNX, edgeexit.workstation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.runtime  # numpy, Pillow, click and a TFLite interpreter only (device/legacy runs)

FORBIDDEN = ("torch", "tensorflow", "onnx", "onnx2tf", "onnxruntime", "scipy", "matplotlib", "edgeexit.workstation")


def _forbidden(loaded: list[str], forbidden=FORBIDDEN) -> list[str]:
    """The modules of ``loaded`` (full names, as in sys.modules) that are a forbidden package or inside one."""
    return sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden))

SCRIPT = r"""
import json, sys
import numpy as np
import edgeexit
runner = edgeexit.Runner(sys.argv[1], backend="auto", power_sensor=None)  # the first interpreter installed
h, w = runner.manifest.preprocessing.size
result = runner(np.zeros((h, w, runner.manifest.preprocessing.channels), np.uint8))
runner.trace([np.zeros((h, w, runner.manifest.preprocessing.channels), np.uint8)])
print(json.dumps({"loaded": sorted(sys.modules), "exit": result.exit_index}))
"""


def test_runner_loads_no_workstation_module(bundle_dir):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(bundle_dir)], capture_output=True, text=True,
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "edgeexit.runtime.runner" in report["loaded"]  # full module names, not just top-level packages
    assert _forbidden(report["loaded"]) == [], "import edgeexit + Runner loaded these"


def test_import_edgeexit_alone_loads_no_interpreter_or_pillow():
    root = Path(__file__).resolve().parents[1]
    code = "import sys, edgeexit; print(sorted(sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = eval(proc.stdout)  # a printed list of module names
    assert _forbidden(loaded, (*FORBIDDEN, "ai_edge_litert", "tflite_runtime", "PIL", "click")) == []
