"""Creating interpreters leaves the process's stderr alone: another thread's writes arrive, whole and in order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.runtime  # numpy, Pillow, click and a TFLite interpreter only (device/legacy runs)

SCRIPT = r"""
import os, sys, threading, time
from edgeexit.runtime.interpreter import create_interpreter, resolve_backend
backend = resolve_backend(sys.argv[2])
paths = sorted(os.path.join(sys.argv[1], f) for f in os.listdir(sys.argv[1]) if f.endswith(".tflite"))
stop = threading.Event()
written = []
def ticker():
    i = 0
    while not stop.is_set() or i < 50:
        os.write(2, f"tick {i}\n".encode())
        written.append(i)
        i += 1
        time.sleep(0.0005)
t = threading.Thread(target=ticker)
t.start()
for _ in range(10):
    for p in paths:
        create_interpreter(p, backend)
stop.set()
t.join()
print(len(written))
"""


def test_interpreter_creation_keeps_other_threads_stderr(bundle_dir):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(bundle_dir), "auto"], capture_output=True, text=True,
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = int(proc.stdout.strip().splitlines()[-1])
    # ai-edge-litert writes its one XNNPACK line in pieces, so the other thread's writes may land between them:
    # take those pieces out, then every line the other thread wrote must be there, unchanged and in order
    # (none captured, delayed or re-logged)
    rest = proc.stderr
    for piece in ("INFO: ", "Created TensorFlow Lite XNNPACK delegate for CPU."):
        rest = rest.replace(piece, "", 1)
    assert [line for line in rest.splitlines() if line] == [f"tick {i}" for i in range(written)]
