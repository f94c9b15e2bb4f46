"""Does a tuned promise hold on data the tuner never saw? Guaranteed (Learn then Test) vs point-estimate tuning.

The labelled test set is traced once through the bundle with the device Runner (every stage, every image). Then,
for each of ``--splits`` random splits into a tuning half and a held-out half, and each ``--max-drop`` target:

* ``point``: ``edgeexit tune --risk 1`` (the cheapest point whose drop on the tuning half is within the target);
* ``guaranteed``: ``edgeexit tune --risk R`` (front searched on one part of the tuning half, points tested on the
  other in fixed sequence; see edgeexit/tuning/guarantee.py);

and the chosen point is evaluated on the held-out half: a *miss* is a held-out accuracy drop (final exit minus the
point, on the same held-out images) above the target. Costs are MACs (exact; no timing noise), so the figures are
reproducible. Nothing is written into the bundle.

Usage::

    python benchmarks/tune_guarantee.py BUNDLE [--data mnist] [--splits 200] [--max-drop 0.2 0.5] [--risk 0.05]
        [--rule max_softmax] [--out benchmarks/results/tune_guarantee_<name>.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeexit.datasets import load_dataset  # noqa: E402
from edgeexit.bench.envinfo import collect_environment, int8_features  # noqa: E402
from edgeexit.errors import TuningError  # noqa: E402
from edgeexit.runtime.bundle import load_bundle  # noqa: E402
from edgeexit.runtime.manifest import ExitRuleSpec  # noqa: E402
from edgeexit.runtime.runner import Runner  # noqa: E402
from edgeexit.tuning.evaluate import evaluate_rule, exit_costs  # noqa: E402
from edgeexit.tuning.results import Target  # noqa: E402
from edgeexit.tuning.search import search_front, search_guaranteed  # noqa: E402


def held_out_drop_pp(trace, point) -> tuple[float, float]:
    """(final-exit accuracy minus the point's accuracy in pp, the point's MACs fraction) on ``trace``."""
    final = float((np.asarray(trace.logits[-1]).argmax(axis=-1) == trace.labels).mean())
    p = evaluate_rule(trace, ExitRuleSpec(point.rule, tuple(point.thresholds)), COSTS)
    return 100.0 * (final - p.accuracy), p.avg_macs_fraction


def summary(rows: list[dict], target: float) -> dict:
    drops = np.array([r["held_out_drop_pp"] for r in rows if r["chosen"]])
    macs = np.array([r["held_out_macs"] for r in rows if r["chosen"]])
    misses = int(np.sum(drops > target + 1e-9))
    n = len(drops)
    return {"splits": len(rows), "chosen": n, "refused": len(rows) - n, "misses": misses,
            "miss_rate": misses / n if n else None,
            "held_out_drop_pp": {"median": float(np.median(drops)), "p95": float(np.percentile(drops, 95)),
                                 "max": float(drops.max())} if n else None,
            "held_out_macs_fraction_mean": float(macs.mean()) if n else None,
            "held_out_macs_fraction_median": float(np.median(macs)) if n else None,
            "no_early_exit_points": int(np.sum(macs > 0.99)),
            "definition_no_early_exit_points": "splits whose chosen point runs nearly every input to the final exit "
                                               "(MACs > 99 %): nothing cheaper could be shown to meet the target"}


def main() -> None:
    global COSTS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--data", default="mnist", help="dataset spec; its test split is split at random (default mnist)")
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument("--max-drop", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--risk", type=float, default=0.05)
    ap.add_argument("--rule", default="max_softmax")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--summarize", action="store_true",
                    help="only recompute the summaries of the result file --out from its per-split rows")
    args = ap.parse_args()
    if args.summarize:
        path = Path(args.out)
        out = json.loads(path.read_text())
        out["results"] = {t: {mode: summary(rows, float(t)) for mode, rows in modes.items()}
                          for t, modes in out["splits"].items()}
        path.write_text(json.dumps(out, indent=1) + "\n")
        return

    manifest = load_bundle(args.bundle).manifest
    COSTS = exit_costs(manifest)
    data = load_dataset(args.data, "test")
    runner = Runner(args.bundle, power_sensor=None, rule=ExitRuleSpec("final", ()))
    t0 = time.perf_counter()
    trace = runner.trace(list(data.images), data.labels)
    print(f"traced {trace.num_inputs} images in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    n = trace.num_inputs
    everything = range(trace.num_exits)
    rng = np.random.default_rng(args.seed)
    runs: dict[str, dict[str, list]] = {str(t): {"point": [], "guaranteed": []} for t in args.max_drop}
    t0 = time.perf_counter()
    for s in range(args.splits):
        perm = rng.permutation(n)
        tune_rows, held_rows = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
        tune_trace, held = trace.select(everything, tune_rows), trace.select(everything, held_rows)
        for t in args.max_drop:
            target = Target(max_drop_pp=t, minimize="macs")
            for mode in ("point", "guaranteed"):
                try:
                    result = (search_front(tune_trace, COSTS, args.rule, target) if mode == "point" else
                              search_guaranteed(tune_trace, COSTS, args.rule, target, risk=args.risk))
                except TuningError as exc:
                    runs[str(t)][mode].append({"split": s, "chosen": False, "error": str(exc)})
                    continue
                drop, macs = held_out_drop_pp(held, result.chosen)
                runs[str(t)][mode].append({"split": s, "chosen": True, "thresholds": list(result.chosen.thresholds),
                                           "tune_accuracy": result.chosen.accuracy,
                                           "tune_macs": result.chosen.avg_macs_fraction,
                                           "held_out_drop_pp": drop, "held_out_macs": macs})
        if (s + 1) % 20 == 0:
            print(f"{s + 1}/{args.splits} splits, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    out = {"benchmark": "tune_guarantee", "bundle": str(args.bundle), "model": manifest.name,
           "data": f"{args.data} test ({n} images), {args.splits} random halves (seed {args.seed})",
           "rule": args.rule, "risk": args.risk, "cost": "MACs",
           "definition": "miss = held-out accuracy drop (final exit minus chosen point, same held-out images) > "
                         "target; point = tune --risk 1; guaranteed = tune --risk RISK",
           "command": "python benchmarks/" + " ".join([Path(__file__).name, *sys.argv[1:]]),
           "environment": {**collect_environment(num_threads=1), "int8_features": list(int8_features())}, "seconds": round(time.perf_counter() - t0, 1),
           "results": {t: {mode: summary(rows, float(t)) for mode, rows in modes.items()} for t, modes in runs.items()},
           "splits": runs}
    path = Path(args.out or ROOT / f"benchmarks/results/tune_guarantee_{manifest.name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    for t, modes in out["results"].items():
        for mode, r in modes.items():
            print(f"max-drop {t} pp {mode:10s}: miss rate {r['miss_rate']} ({r['misses']}/{r['chosen']}, "
                  f"{r['refused']} refused), held-out MACs mean {r['held_out_macs_fraction_mean']} median "
                  f"{r['held_out_macs_fraction_median']}, {r['no_early_exit_points']} without early exit, "
                  f"drop {r['held_out_drop_pp']}")
    print(f"wrote {path}", file=sys.stderr)


COSTS = None

if __name__ == "__main__":
    main()
