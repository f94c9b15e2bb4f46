"""Train the MNIST default (eenet-small, two-stage EENet loss) and record time and per-exit results.

Writes the checkpoint (default runs/mnist-default.pt) and benchmarks/results/train_mnist.json with the
wall time, the machine (CPU, cores, load average), the per-exit table at T=0.5 and the early-exit
accuracy/cost at a few other thresholds.

    python benchmarks/train_mnist.py [--epochs 2] [--lambda 0.5] [--output runs/mnist-default.pt]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeexit.workstation.catalog.checkpoint import save_checkpoint  # noqa: E402
from edgeexit.workstation.training.train import TrainConfig, collect_outputs, summarize  # noqa: E402
from edgeexit.workstation.training.data import to_tensors  # noqa: E402
from edgeexit.workstation.cli.train import machine_info, run_training  # noqa: E402
from edgeexit.datasets import load_dataset  # noqa: E402

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--lambda", dest="lam", type=float, default=TrainConfig.lam)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=str(ROOT / "runs" / "mnist-default.pt"))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "train_mnist.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    load_before = os.getloadavg()
    config = TrainConfig(epochs=args.epochs, lam=args.lam, seed=args.seed)
    start = time.perf_counter()
    run = run_training("eenet-small", "mnist", config)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    model = run.result.model
    test = load_dataset("mnist", "test")
    x, y = to_tensors(test, model.spec)
    trace = collect_outputs(model, x, y)
    sweep = [{"threshold": t, **{k: v for k, v in summarize(trace, run.result.costs, t).to_dict().items()
                                 if k in ("early_exit_accuracy", "avg_cost", "exit_share", "final_accuracy")}}
             for t in THRESHOLDS]
    save_checkpoint(model, args.output, {"test": run.test.to_dict(), "test_set": run.test_name,
                                         "history": run.result.history, "train_seconds": run.result.seconds},
                    force=True)
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "checkpoint": args.output,
              "wall_seconds_incl_data": wall, "train_seconds": run.result.seconds, "best_epoch": run.result.best_epoch,
              "config": vars(config), "costs": run.result.costs.to_dict(), "history": run.result.history,
              "test": run.test.to_dict(), "test_table": run.test.table(), "thresholds": sweep,
              "machine": {**machine_info(), "load_average_1m_before": load_before[0],
                          "load_average_1m_after": load_after[0]}}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2))
    print(run.test.table())
    print(f"train {run.result.seconds:.0f} s (wall incl. data {wall:.0f} s), load average {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f}; results: {args.results}; checkpoint: {args.output}")


if __name__ == "__main__":
    main()
