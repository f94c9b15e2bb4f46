"""Speed of ``edgeexit train`` in 1 process vs 2 processes under torchrun (gloo, CPU) on this machine.

The same command (MNIST subset, eenet-small, global batch 128, seeded) is run

* 1 process, 1 thread;  * 1 process, as many threads as cores;  * 2 processes of 1 thread (``torchrun``),

``--repeats`` times each, interleaved. Reported: the training loop's own time (``train_seconds`` of the
``--json`` metrics: epochs + validation, no start-up or data loading) and the whole command's wall time
(interpreter and torch import, data loading, process-group start-up, test evaluation). On a shared machine
the numbers move with other users' load; the load average before each run is recorded next to it.

    python benchmarks/ddp_speed.py [--train-limit 6000 --epochs 2 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgeexit.workstation.cli.train import machine_info  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "ddp_speed.json"


def run_once(nproc: int, threads: int, args: list[str], workdir: Path) -> dict[str, float]:
    out, metrics = workdir / f"m{nproc}_{threads}.pt", workdir / f"m{nproc}_{threads}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    launcher = ["-m", "edgeexit"] if nproc == 1 else \
        ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "edgeexit"]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *launcher, "-q", "train", *args, "--output", str(out), "--force",
                           "--json", str(metrics)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: {nproc}-process run failed:\n{proc.stderr[-2000:]}")
    m = json.loads(metrics.read_text())
    return {"train_seconds": m["train_seconds"], "wall_seconds": wall, "load_average_1m_before": load,
            "test_early_exit_accuracy": m["test"]["early_exit_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-limit", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", type=Path, default=RESULT)
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    args = ["--model", "eenet-small", "--dataset", "mnist", "--train-limit", str(a.train_limit), "--epochs",
            str(a.epochs), "--batch-size", str(a.batch_size), "--seed", "0"]
    configs = [(1, 1), (1, cores), (2, 1)]
    runs: dict[str, list[dict[str, float]]] = {f"{n}proc_{t}thread": [] for n, t in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.repeats):
            for n, t in configs:
                runs[f"{n}proc_{t}thread"].append(run_once(n, t, args, Path(tmp)))
    summary = {k: {"train_seconds_median": statistics.median(r["train_seconds"] for r in v),
                   "wall_seconds_median": statistics.median(r["wall_seconds"] for r in v)} for k, v in runs.items()}
    base = summary["1proc_1thread"]["train_seconds_median"]
    for v in summary.values():
        v["train_speedup_vs_1proc_1thread"] = base / v["train_seconds_median"]
    result = {"command": "edgeexit train " + " ".join(args), "repeats": a.repeats, "machine": machine_info(),
              "note": "shared machine (other users' jobs run on the same cores): timings are noisy; see each run's "
                      "load average. 2 processes = torch.distributed.run --standalone --nproc-per-node 2, gloo, "
                      "1 thread each, global batch unchanged (per-process batch = batch / 2).",
              "summary": summary, "runs": runs}
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in summary.items():
        print(f"{k:>14}: training {v['train_seconds_median']:.2f} s (x{v['train_speedup_vs_1proc_1thread']:.2f}), "
              f"whole command {v['wall_seconds_median']:.2f} s")
    print(f"written: {a.output}")


if __name__ == "__main__":
    main()
