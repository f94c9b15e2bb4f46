"""Accuracy vs average cost of the MNIST default for several lambdas (EENet cost weight).

Trains one eenet-small per lambda (same seed, data and schedule) and writes
benchmarks/results/lambda_sweep.json and .csv (one row per lambda: final accuracy, early-exit accuracy
and average cost at T=0.5, share of inputs per exit, training time), plus the machine it ran on.

    python benchmarks/lambda_sweep.py [--lambdas 0.05,0.15,0.5,1.0] [--epochs 2] [--train-limit N]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeexit.workstation.training.train import TrainConfig  # noqa: E402
from edgeexit.workstation.cli.train import (SWEEP_FIELDS, machine_info, parse_lambdas, run_training, sweep_rows,  # noqa: E402
                                  sweep_table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lambdas", default="0.05,0.15,0.5,1.0")
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "lambda_sweep.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    runs = []
    start = time.perf_counter()
    for lam in parse_lambdas(args.lambdas):
        cfg = TrainConfig(epochs=args.epochs, lam=lam, seed=args.seed)
        runs.append((lam, run_training("eenet-small", "mnist", cfg, train_limit=args.train_limit)))
    rows = sweep_rows(runs)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "epochs": args.epochs, "train_limit": args.train_limit,
                               "threshold": 0.5, "seconds": time.perf_counter() - start, "rows": rows,
                               "machine": machine_info()}, indent=2))
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SWEEP_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (" ".join(f"{v:.4f}" for v in r[k]) if isinstance(r[k], list) else r[k])
                             for k in SWEEP_FIELDS})
    print(sweep_table(rows, 0.5))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
