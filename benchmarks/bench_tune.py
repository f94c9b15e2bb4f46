"""Benchmark threshold tuning.

1. Search speed: the front search over a synthetic 10,000-input, 4-exit trace (int8-like logits, confidence
   logits that track correctness), median over repetitions, per rule -> benchmarks/results/tune_search.json.
2. Held-out MNIST comparison (when runs/mnist-bundle exists): tune on one half of the MNIST test set,
   evaluate on the other half: tuned per-exit thresholds vs one global threshold 0.5 for every exit
   (accuracy and average MACs of both) -> benchmarks/results/tune_mnist.json.

    .venv/bin/python benchmarks/bench_tune.py [--repeats 5] [--bundle runs/mnist-bundle]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from edgeexit.runtime.rules import RULES
from edgeexit.runtime.trace import Trace  # noqa: E402
from edgeexit.tuning.evaluate import ExitCosts, evaluate_rule, exit_costs
from edgeexit.tuning.results import Target
from edgeexit.tuning.search import search_front
from edgeexit.tuning.store import rule_spec  # noqa: E402
from edgeexit.runtime.manifest import ExitRuleSpec  # noqa: E402
from verified import add_option, require_verified  # noqa: E402
from synthetic import synthetic_trace  # noqa: E402 (the tests' synthetic trace, numpy only)

RESULTS = REPO / "benchmarks" / "results"
log = logging.getLogger("bench_tune")


def machine() -> dict:
    return {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
            "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
            "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def bench_search(repeats: int) -> dict:
    trace = synthetic_trace(n=10_000)
    costs = ExitCosts(macs_fraction=np.array([0.2, 0.45, 0.7, 1.05]),
                      latency_ms=np.cumsum([0.1, 0.12, 0.15, 0.2]), energy_mj=None)
    out = {}
    for rule in ("confidence", "max_softmax", "entropy", "class_exclusion"):
        search_front(trace, costs, rule, Target(max_drop_pp=0.5))  # warm-up
        times, result = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = search_front(trace, costs, rule, Target(max_drop_pp=0.5))
            times.append(time.perf_counter() - t0)
        out[rule] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                     "repeats": repeats, "evaluated": result.evaluated, "front_points": len(result.front),
                     "final_accuracy": result.final_accuracy, "chosen_accuracy": result.chosen.accuracy,
                     "chosen_avg_macs_fraction": result.chosen.avg_macs_fraction}
        log.info("%s: median %.3f s over %d runs, front %d points", rule, out[rule]["median_s"], repeats,
                 len(result.front))
    return {"what": "front search (greedy walks + coordinate descent) over a synthetic trace, target: 0.5 pp drop",
            "n": trace.num_inputs, "exits": trace.num_exits, "classes": 10, "rules": out, "machine": machine()}


def bench_mnist(bundle: Path, rule: str, seed: int = 0) -> dict:
    from edgeexit.runtime.bundle import load_bundle
    from edgeexit.datasets import load_dataset
    from edgeexit.runtime.runner import Runner

    loaded = load_bundle(bundle)
    manifest = loaded.manifest
    data = load_dataset("mnist", split="test")
    runner = Runner(loaded, rule=ExitRuleSpec("final", ()), power_sensor=None)
    t0 = time.perf_counter()
    trace = runner.trace(data.images, data.labels)
    trace_s = time.perf_counter() - t0
    perm = np.random.default_rng(seed).permutation(len(data))
    halves = {"tune": np.sort(perm[: len(data) // 2]), "eval": np.sort(perm[len(data) // 2:])}

    def part(idx: np.ndarray) -> Trace:
        return trace.select(range(trace.num_exits), idx)

    tune_part, eval_part = part(halves["tune"]), part(halves["eval"])
    costs = exit_costs(manifest)
    result = search_front(tune_part, costs, rule, Target(max_drop_pp=0.5, minimize="macs"))
    e = manifest.num_exits
    tuned = evaluate_rule(eval_part, rule_spec(result.chosen), costs)
    global_05 = evaluate_rule(eval_part, ExitRuleSpec(rule, (0.5,) * (e - 1)), costs)
    final = evaluate_rule(eval_part, ExitRuleSpec("final", ()), costs)
    tuned_on_tune = result.chosen
    return {"bundle": str(bundle), "rule": rule, "split_seed": seed, "n_tune": int(halves["tune"].size),
            "n_eval": int(halves["eval"].size), "trace_s": trace_s, "search_s": result.search_s,
            "target": "max 0.5 pp below the final exit (on the tuning half)",
            "tuned_thresholds": list(result.chosen.thresholds),
            "tuning_half": {"tuned": tuned_on_tune.to_dict(), "final_accuracy": result.final_accuracy},
            "eval_half": {"tuned": tuned.to_dict(), "global_0.5": global_05.to_dict(), "final": final.to_dict()},
            "original_rule": {"kind": manifest.exit_rule.kind, "thresholds": list(manifest.exit_rule.thresholds)},
            "machine": machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bundle", type=Path, default=REPO / "runs" / "mnist-bundle")
    parser.add_argument("--rule", default=None, help="rule for the MNIST comparison (default: the bundle's own)")
    add_option(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    search = bench_search(args.repeats)
    (RESULTS / "tune_search.json").write_text(json.dumps(search, indent=2) + "\n")
    log.info("wrote %s", RESULTS / "tune_search.json")
    if (args.bundle / "manifest.json").is_file():
        from edgeexit.runtime.bundle import read_manifest
        verification = require_verified(args.bundle, args.allow_unverified)
        kind = args.rule or read_manifest(args.bundle)[1].exit_rule.kind
        kind = kind if kind in RULES and kind not in ("final", "fixed") else "max_softmax"
        mnist = {**bench_mnist(args.bundle, kind), "verification": verification}
        (RESULTS / "tune_mnist.json").write_text(json.dumps(mnist, indent=2) + "\n")
        log.info("wrote %s", RESULTS / "tune_mnist.json")
    else:
        log.info("no bundle at %s: skipped the MNIST comparison", args.bundle)


if __name__ == "__main__":
    main()
