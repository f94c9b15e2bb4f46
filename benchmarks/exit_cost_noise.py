"""How much do the timed exit costs move between two tunes of the same bundle on the same machine?

``edgeexit tune`` estimates each candidate point's whole-call latency from exit costs it times on the device (the
latency of an input forced to leave at each exit, per rule kind). Those timings move from run to run; tune treats
latency differences below ``edgeexit.tuning.tune.COST_NOISE`` as noise (fewer MACs decide), so that two identical
tunes choose the same point. This script times the costs ``--runs`` times exactly as tune does (500 images, 3
repeats each) and reports, per rule kind and exit, the spread of the runs relative to their median.

Usage::

    python benchmarks/exit_cost_noise.py BUNDLE [--data mnist] [--runs 6] [--out benchmarks/results/exit_cost_noise.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeexit.datasets import load_dataset  # noqa: E402
from edgeexit.bench.envinfo import collect_environment, int8_features  # noqa: E402
from edgeexit.bench.timing import measure_exit_costs  # noqa: E402
from edgeexit.runtime.runner import Runner  # noqa: E402
from edgeexit.tuning.tune import COST_NOISE, DEFAULT_COST_IMAGES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--kinds", default="fixed,max_softmax,entropy,confidence,class_exclusion")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/exit_cost_noise.json"))
    args = ap.parse_args()
    images = list(load_dataset(args.data, "test").images[:DEFAULT_COST_IMAGES])
    runner = Runner(args.bundle, power_sensor=None)
    kinds = args.kinds.split(",")
    tables = [measure_exit_costs(runner, images, kinds, repeat=3) for _ in range(args.runs)]
    out = {}
    for kind in kinds:
        ms = np.array([t.latency_ms[kind] for t in tables])          # [runs, E]
        med = np.median(ms, axis=0)
        out[kind] = {"median_ms": med.round(6).tolist(),
                     "max_rel_deviation": (np.abs(ms - med) / med).max(axis=0).round(4).tolist(),
                     "rel_range": ((ms.max(axis=0) - ms.min(axis=0)) / med).round(4).tolist()}
    worst = max(max(v["rel_range"]) for v in out.values())
    result = {"benchmark": "exit_cost_noise", "bundle": args.bundle, "runs": args.runs,
              "images": len(images), "repeat": 3, "cost_noise_used_by_tune": COST_NOISE,
              "worst_rel_range": worst, "per_kind": out,
              "command": "python benchmarks/" + " ".join([Path(__file__).name, *sys.argv[1:]]),
              "environment": {**collect_environment(num_threads=1), "int8_features": list(int8_features())}}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for kind, v in out.items():
        print(f"{kind:16s} median ms {v['median_ms']}  range/median {v['rel_range']}")
    print(f"worst range/median {worst:.3f} (tune's COST_NOISE {COST_NOISE})")


if __name__ == "__main__":
    main()
