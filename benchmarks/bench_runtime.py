"""Runtime benchmark: what a user waits for, early exit against the monolithic model, in one process.

Runs :func:`edgeexit.bench.bench.run_benchmark` (no sweep) ``--rounds`` times on a labelled set and keeps per
round, all from the same harness (the whole public call, image array in -> result out, preprocessing
included; see edgeexit/bench/timing.py):

* early exit (the bundle's rule, or ``--rule POINT``) vs the monolithic model: p50 / p90 / p99 / mean, ratios;
* forced to the last exit with the real rule (every decision made, never stopping) vs the monolithic model;
* the time outside the invokes of the stages that ran (whole call minus the bare invokes);
* estimated (from the exit costs) vs measured mean latency of every stored operating point;
* throughput (images/s) at batch 1, 8 and 32 against the monolithic model;

plus ``import edgeexit`` time and peak RSS in fresh processes. The summary takes the median over rounds.

Usage::

    python benchmarks/bench_runtime.py BUNDLE [--data 'mnist[1::2]'] [--limit 2000] [--rounds 5]
        [--out benchmarks/results/runtime_mnist.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeexit.bench.bench import BenchSettings, run_benchmark  # noqa: E402
from edgeexit.datasets import load_dataset  # noqa: E402
from verified import add_option, require_verified  # noqa: E402

IMPORT_PROBE = r"""
import json, resource, sys, time
t = time.perf_counter()
import edgeexit
dt = time.perf_counter() - t
out = {"import_s": dt, "import_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
if len(sys.argv) > 1:
    import numpy as np
    r = edgeexit.Runner(sys.argv[1], power_sensor=None)
    h, w = r.manifest.preprocessing.size
    for _ in range(1000):
        r(np.zeros((h, w, r.manifest.preprocessing.channels), np.uint8))
    out["runner_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def _round(result: dict) -> dict:
    o, m, f, ov = result["overall"], result["monolithic"], result["forced_last"], result["overhead"]
    keys = ("mean", "p50", "p90", "p99")
    out = {"early_exit_ms": {k: o["latency_ms"][k] for k in keys},
           "forced_last_ms": {k: f["latency_ms"][k] for k in keys},
           "accuracy": o["accuracy"], "mac_fraction": o["mac_fraction"],
           "exit_shares": [e["share"] for e in result["exits"]],
           "outside_invokes_us": ov["early_exit_outside_invokes_us"],
           "stage_invoke_us": [1e3 * v for v in ov["stage_invoke_ms"]],
           "points": [{k: p[k] for k in ("name", "rule", "measured_mean_ms", "estimated_mean_ms", "estimate_error")}
                      for p in result["points"]],
           "throughput": result["throughput"], "exit_costs": result["exit_costs"]}
    if m.get("available"):
        out.update({"monolithic_ms": {k: m["latency_ms"][k] for k in keys},
                    "speedup": {k: m["latency_ms"][k] / o["latency_ms"][k] for k in keys},
                    "forced_last_over_monolithic": {k: f["latency_ms"][k] / m["latency_ms"][k] for k in keys},
                    "monolithic_outside_invoke_us": ov.get("monolithic_outside_invoke_us"),
                    "monolithic_accuracy": m["accuracy"]})
    return out


def _median(rounds: list[dict], *path: str) -> float:
    vals = []
    for r in rounds:
        v = r
        for p in path:
            v = v[p]
        vals.append(v)
    return float(np.median(vals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--data", default="mnist[1::2]")
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rule", default=None, help="an operating point name (default: the bundle's rule)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "runtime.json"))
    add_option(ap)
    args = ap.parse_args()
    verification = require_verified(args.bundle, args.allow_unverified)

    # first, while this process is small: a child's peak RSS starts from its parent's at fork time
    probe = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    probe_runner = subprocess.run([sys.executable, "-c", IMPORT_PROBE, args.bundle], capture_output=True, text=True,
                                  cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    data = load_dataset(args.data, limit=args.limit)
    settings = BenchSettings(repeat=args.repeat, sweep=False, rule=args.rule, warmup=50)
    rounds, env = [], None
    for i in range(args.rounds):
        result = run_benchmark(args.bundle, data, settings, dataset_spec=args.data)
        env = result["environment"]
        rounds.append(_round(result))
        r = rounds[-1]
        print(f"round {i + 1}: early exit p50 {1e3 * r['early_exit_ms']['p50']:.1f} us, monolithic "
              f"{1e3 * r.get('monolithic_ms', {}).get('p50', float('nan')):.1f} us, speed-up "
              f"{r.get('speedup', {}).get('p50', float('nan')):.2f}x, forced last "
              f"{r.get('forced_last_over_monolithic', {}).get('p50', float('nan')):.3f}x, outside invokes "
              f"{r['outside_invokes_us']:.1f} us", file=sys.stderr)
    summary = {"early_exit_p50_ms": _median(rounds, "early_exit_ms", "p50"),
               "early_exit_p90_ms": _median(rounds, "early_exit_ms", "p90"),
               "early_exit_mean_ms": _median(rounds, "early_exit_ms", "mean"),
               "outside_invokes_us": _median(rounds, "outside_invokes_us")}
    if "speedup" in rounds[0]:
        summary.update({"monolithic_p50_ms": _median(rounds, "monolithic_ms", "p50"),
                        "monolithic_p90_ms": _median(rounds, "monolithic_ms", "p90"),
                        "monolithic_mean_ms": _median(rounds, "monolithic_ms", "mean"),
                        "speedup_p50": _median(rounds, "speedup", "p50"),
                        "speedup_p90": _median(rounds, "speedup", "p90"),
                        "speedup_mean": _median(rounds, "speedup", "mean"),
                        "forced_last_over_monolithic_p50": _median(rounds, "forced_last_over_monolithic", "p50"),
                        "forced_last_over_monolithic_mean": _median(rounds, "forced_last_over_monolithic", "mean"),
                        "monolithic_outside_invoke_us": _median(rounds, "monolithic_outside_invoke_us")})
        for b in range(len(rounds[0]["throughput"])):
            t = [r["throughput"][b] for r in rounds]
            summary[f"throughput_batch{t[0]['batch']}_ratio"] = float(np.median([x["ratio"] for x in t]))
            summary[f"throughput_batch{t[0]['batch']}_early_exit_ips"] = float(np.median([x["early_exit_ips"] for x in t]))
    summary["worst_estimate_error"] = max(max(abs(p["estimate_error"]) for p in r["points"]) for r in rounds)
    result = {"bundle": str(Path(args.bundle).resolve()), "verification": verification, "data": data.name,
              "images": len(data),
              "rounds": args.rounds, "repeat": args.repeat, "environment": env,
              "definition": "whole call (Runner.classify / Runner.run_monolithic timed from outside), image as a "
                            "uint8 array in -> result out, preprocessing included; per input the median over "
                            "repeats; summary = median over rounds",
              "summary": summary, "per_round": rounds,
              "import": json.loads(probe.stdout), "runner_process": json.loads(probe_runner.stdout),
              "targets": {"speedup_p50": 2.5, "outside_invokes_us": 3.0, "forced_last_over_monolithic": 1.15,
                          "estimate_error": 0.10}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
