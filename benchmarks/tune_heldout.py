"""Tuned thresholds vs a reference rule on data the tuning did not see, both ways round.

For a bundle and a labelled set split into two interleaved halves (``SPEC[0::2]`` and ``SPEC[1::2]``), tune
on one half with ``edgeexit tune``'s search (default target: no worse than the reference rule, fewest MACs,
every tunable rule), then evaluate the chosen point and the reference on the other half with the device
Runner's trace; then swap the halves. Nothing is written into the bundle.

Usage::

    python benchmarks/tune_heldout.py BUNDLE [--data mnist] [--reference original] [--rule any]
        [--margin PP] [--out benchmarks/results/tune_heldout_<name>.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeexit.energy.boards import cpu_model  # noqa: E402
from edgeexit.runtime.bundle import load_bundle  # noqa: E402
from edgeexit.datasets import load_dataset  # noqa: E402
from edgeexit.runtime.runner import Runner  # noqa: E402
from edgeexit.tuning.evaluate import evaluate_rule, exit_costs
from edgeexit.tuning.results import Target
from edgeexit.tuning.store import reference_rule, rule_spec
from edgeexit.tuning.tune import tune_bundle  # noqa: E402
from verified import add_option, require_verified  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--data", default="mnist", help="dataset spec; its test split is halved (default mnist)")
    ap.add_argument("--reference", default="original", help="rule to beat: 'current' or a stored operating point")
    ap.add_argument("--rule", default="any", help="rule kind to tune, or 'any'")
    ap.add_argument("--margin", type=float, default=None, help="pp over the reference (default: one standard error)")
    ap.add_argument("--out", default=None)
    add_option(ap)
    args = ap.parse_args()

    verification = require_verified(args.bundle, args.allow_unverified)
    manifest = load_bundle(args.bundle).manifest
    reference = reference_rule(manifest, args.reference)
    runner = Runner(args.bundle, power_sensor=None)
    halves = [f"{args.data}[0::2]", f"{args.data}[1::2]"]
    traces = {}
    for h in halves:
        data = load_dataset(h, "test")
        traces[h] = runner.trace(list(data.images), data.labels)
    runs = []
    for tune_on, held_out in (halves, halves[::-1]):
        result = tune_bundle(args.bundle, tune_on, Target(no_worse_than=args.reference), rule=args.rule,
                             margin_pp=args.margin, dry_run=True)
        trace = traces[held_out]
        costs = exit_costs(manifest, trace)
        ref_point = evaluate_rule(trace, reference, costs)
        tuned_point = evaluate_rule(trace, rule_spec(result.chosen), costs)
        runs.append({"tuned_on": tune_on, "held_out": held_out, "tuning": result.to_dict() | {"front": len(result.front)},
                     "held_out_reference": ref_point.to_dict(), "held_out_tuned": tuned_point.to_dict(),
                     "accuracy_change_pp": round(100 * (tuned_point.accuracy - ref_point.accuracy), 4),
                     "macs_ratio": round(tuned_point.avg_macs_fraction / ref_point.avg_macs_fraction, 4)})
        print(f"tuned on {tune_on} ({result.chosen.rule} {', '.join(f'{t:.4g}' for t in result.chosen.thresholds)}), "
              f"held out {held_out}: tuned {100 * tuned_point.accuracy:.2f}% at "
              f"{100 * tuned_point.avg_macs_fraction:.1f}% MACs vs {args.reference} "
              f"{100 * ref_point.accuracy:.2f}% at {100 * ref_point.avg_macs_fraction:.1f}%")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"tune_heldout_{manifest.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "bundle": manifest.name,
                               "verification": verification, "machine": cpu_model(),
                               "reference": {"name": args.reference, "kind": reference.kind, "thresholds": list(reference.thresholds)}, "runs": runs},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
