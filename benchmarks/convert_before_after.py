"""Conversion wall time on two versions of edgeexit, and whether they write the same bundle.

For each source tree, in its own process (so each pays TensorFlow's start once, as a user does): the MNIST
default (a checkpoint, e.g. the demo's ``mnist.pt``, through ``edgeexit convert CKPT --calib mnist``) and a seeded,
untrained 3-exit EENet ResNet-20 (64 random calibration images, 200 random verification images, as
``bench_convert.py``). The trees run alternately, ``--rounds`` times. Then every .tflite file the two trees wrote
is compared tensor by tensor with the interpreter: quantization parameters, weights, and every named tensor after
one invoke on the same input; internal tensor names are compared without the numeric suffixes TensorFlow's name
counters add (``model_3/...`` vs ``model_1/...``), which are the only allowed difference.

Usage::

    git worktree add /tmp/edgeexit-old 91befb6
    python benchmarks/convert_before_after.py --before /tmp/edgeexit-old --after . --checkpoint runs/demo/mnist.pt
        [--rounds 1] [--out benchmarks/results/convert_before_after.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeexit.bench.envinfo import machine_stamp  # noqa: E402

RESNET = r"""
import sys
import numpy as np, torch
from edgeexit.workstation.conversion.pipeline import convert
try:
    from edgeexit.workstation.catalog.registry import create
except ImportError:
    from edgeexit.workstation.models.registry import create
torch.manual_seed(0)
model = create("eenet-resnet20", num_classes=10, exits=3).eval()
rng = np.random.default_rng(0)
calib = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
verify = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
convert(model, calib, sys.argv[1], verify_images=verify, force=True)
"""

SAME = r"""
import json, re, sys, pathlib
import numpy as np
from edgeexit.runtime.interpreter import create_interpreter, resolve_backend

def named(path):
    it = create_interpreter(path, resolve_backend("auto"))
    d = it.get_input_details()[0]
    x = np.random.default_rng(1).integers(-100, 100, d["shape"]).astype(d["dtype"])
    it.set_tensor(d["index"], x)
    it.invoke()
    out = []
    for t in it.get_tensor_details():
        if not t["name"]:
            continue  # unnamed: the kernels' scratch buffers
        q = t["quantization_parameters"]
        try:
            value = it.get_tensor(t["index"]).tobytes()
        except ValueError:  # a tensor the plan gave no memory to
            value = None
        out.append((re.sub(r"_\d+", "", t["name"]), str(t["dtype"]), list(map(int, t["shape"])),
                    q["scales"].tolist(), q["zero_points"].tolist(), value))
    return out

a, b = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
files = sorted(p.name for p in a.glob("*.tflite"))
result = {"files": files, "same": files == sorted(p.name for p in b.glob("*.tflite")) and all(
    named(str(a / f)) == named(str(b / f)) for f in files)}
result["byte_identical"] = [f for f in files if (a / f).read_bytes() == (b / f).read_bytes()]
print(json.dumps(result))
"""


def run_timed(cmd: list[str], tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"convert_before_after: {' '.join(cmd[:3])}... failed in {tree}:\n{proc.stderr[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="source tree of the older version")
    ap.add_argument("--after", default=str(ROOT), help="source tree of the newer version (default: this one)")
    ap.add_argument("--checkpoint", required=True, help="the MNIST default checkpoint (scripts/demo.sh writes one)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert_before_after.json"))
    args = ap.parse_args()
    py = sys.executable
    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    ckpt = str(Path(args.checkpoint).resolve())
    walls: dict[str, dict[str, list[float]]] = {k: {"mnist_default": [], "eenet_resnet20_3exits": []} for k in trees}
    with tempfile.TemporaryDirectory(prefix="convert-ab-") as tmp:
        out = {k: {n: Path(tmp) / k / n for n in walls[k]} for k in trees}
        for k in trees:
            (Path(tmp) / k).mkdir()
        for r in range(args.rounds):
            for k, tree in trees.items():
                walls[k]["mnist_default"].append(run_timed(
                    [py, "-m", "edgeexit", "-q", "convert", ckpt, "--calib", "mnist", "--out",
                     str(out[k]["mnist_default"]), "--force"], tree))
                walls[k]["eenet_resnet20_3exits"].append(run_timed(
                    [py, "-c", RESNET, str(out[k]["eenet_resnet20_3exits"])], tree))
                print(f"round {r + 1} {k}: " + ", ".join(f"{n} {v[-1]:.1f} s" for n, v in walls[k].items()),
                      file=sys.stderr)
        same = {}
        for n in walls["after"]:
            proc = subprocess.run([py, "-c", SAME, str(out["before"][n]), str(out["after"][n])], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONPATH": str(trees["after"])}, check=True)
            same[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    med = {k: {n: statistics.median(v) for n, v in per.items()} for k, per in walls.items()}
    result = {
        "benchmark": "convert_before_after", "machine": machine_stamp(), "rounds": args.rounds,
        "trees": {k: str(v) for k, v in trees.items()},
        "commits": {k: subprocess.run(["git", "-C", str(v), "rev-parse", "--short", "HEAD"], capture_output=True,
                                      text=True).stdout.strip() for k, v in trees.items()},
        "wall_s": walls, "median_wall_s": med,
        "speedup": {n: med["before"][n] / med["after"][n] for n in med["after"]},
        "same_files": same,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"median_wall_s": med, "speedup": result["speedup"],
                      "same": {n: s["same"] for n, s in same.items()}}, indent=1))


if __name__ == "__main__":
    main()
