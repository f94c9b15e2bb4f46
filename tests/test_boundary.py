"""The device runtime never loads the workstation stack (torch, TensorFlow, ONNX, edgeexit.workstation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FORBIDDEN = ("torch", "tensorflow", "onnx", "onnx2tf", "onnxruntime", "edgeexit.workstation")

SCRIPT = r"""
import json, sys
import numpy as np
import edgeexit
runner = edgeexit.Runner(sys.argv[1], backend="auto", power_sensor=None)  # the first interpreter installed
h, w = runner.manifest.preprocessing.size
result = runner(np.zeros((h, w, runner.manifest.preprocessing.channels), np.uint8))
runner.trace([np.zeros((h, w, runner.manifest.preprocessing.channels), np.uint8)])
loaded = sorted({m.split(".")[0] for m in sys.modules} | {"edgeexit.workstation" for m in sys.modules if m.startswith("edgeexit.workstation")})
print(json.dumps({"loaded": loaded, "exit": result.exit_index}))
"""


def test_runner_loads_no_workstation_module(bundle_dir):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(bundle_dir)], capture_output=True, text=True,
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    leaked = sorted(set(report["loaded"]) & set(FORBIDDEN))
    assert leaked == [], f"import edgeexit + Runner loaded {leaked}"


def test_import_edgeexit_alone_loads_no_interpreter_or_pillow():
    root = Path(__file__).resolve().parents[1]
    code = ("import sys, edgeexit; print(sorted({m.split('.')[0] for m in sys.modules}"
            " | {'edgeexit.workstation' for m in sys.modules if m.startswith('edgeexit.workstation')}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(eval(proc.stdout))  # a printed list of module names
    assert not loaded & {*FORBIDDEN, "ai_edge_litert", "tflite_runtime", "PIL", "click"}
