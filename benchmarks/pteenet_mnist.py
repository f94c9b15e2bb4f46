"""PTEENet end to end: train a backbone, freeze it, post-train early-exit branches, convert, run int8.

For each dataset (MNIST, Fashion-MNIST):

1. train a small torchvision-layout ResNet-18 (``edgeexit.workstation.models.zoo``, 3x3 stem, width 8, 1 channel) as a plain
   classifier (or reuse the one cached under runs/);
2. freeze it, attach branches after ``layer1`` and ``layer2`` (default: EENet "spatial" heads with 16 units;
   PTEENet's pooled "conv1" branches read 8-16 pooled numbers of these early maps and stayed at 20-30%
   accuracy), train only the branches (two-stage: v0 warm-up, then EENet loss v2, lambda 0.05) and check
   the backbone is bit-identical;
3. convert to an int8 bundle, trace validation and test images with the device Runner;
4. report accuracy and average MACs (every head paid for) against the backbone alone (the bundle's final exit
   = the frozen network, same int8 graphs), all on the held-out half test[5000:] (and, swapped, on
   test[:5000] with the other half for tuning):

   * the confidence rule at the global T = 0.5 (the authors' rule);
   * per-exit thresholds searched by ``edgeexit.tuning.tune.search_front`` on the tuning half with the target "no
     worse than T = 0.5 on the tuning half, fewest MACs" (``Target(min_accuracy=<T=0.5 accuracy>)``);
   * per-exit thresholds searched for at most 0.25 / 0.5 / 1 pp below the backbone on the tuning half.

Usage::

    python benchmarks/pteenet_mnist.py [--datasets mnist,fashion-mnist] [--epochs 2] [--train-limit N]
        [--branch spatial|conv1|conv2|conv3|pool|bnpool] [--hidden 16] [--exits layer1,layer2] [--width 8]
        [--lam 0.05] [--warmup 1] [--branch-epochs 2] [--reuse] [--out pteenet_mnist.json]

``--reuse`` skips training and conversion when runs/pteenet/<dataset>-bundle was built with the same settings.
Writes ``benchmarks/results/<--out>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import MEAN, RUNS, STD  # noqa: E402
from verified import add_option, require_verified  # noqa: E402

from edgeexit.workstation.conversion.pipeline import convert  # noqa: E402
from edgeexit.workstation.posttrain.pteenet import attach_branches, backbone_digest, train_branches  # noqa: E402
from edgeexit.workstation.training.train import TrainConfig  # noqa: E402
from edgeexit.runtime.manifest import ExitRuleSpec  # noqa: E402
from edgeexit.runtime.trace import Trace  # noqa: E402
from edgeexit.runtime.runner import Runner  # noqa: E402
from edgeexit.tuning.evaluate import ExitCosts, evaluate_rule, exit_costs
from edgeexit.tuning.results import Target
from edgeexit.tuning.search import search_front
from edgeexit.tuning.store import rule_spec  # noqa: E402

log = logging.getLogger("pteenet_mnist")
DROPS_PP = (0.25, 0.5, 1.0)


def compare_on_halves(tune: Trace, held: Trace, costs: ExitCosts, full_macs: int) -> dict[str, Any]:
    """T = 0.5 against per-exit thresholds tuned on ``tune`` ("no worse than T = 0.5 there, fewest MACs"),
    both reported on ``held``; plus thresholds tuned for a maximum drop below the backbone."""
    early = tune.num_exits - 1
    global_rule = ExitRuleSpec("confidence", (0.5,) * early)
    t05_tune = evaluate_rule(tune, global_rule, costs)
    search = search_front(tune, costs, "confidence", Target(min_accuracy=t05_tune.accuracy))
    chosen = search.chosen
    out: dict[str, Any] = {
        "heldout_backbone_accuracy": common.exit_accuracies(held)[-1],
        "T=0.5": {"tune": common.point_record(t05_tune, full_macs),
                  "heldout": common.point_record(evaluate_rule(held, global_rule, costs), full_macs)},
        "no_worse_than_T=0.5": {
            "target": f"accuracy >= {t05_tune.accuracy:.6f} (T=0.5 on the tuning half), fewest MACs",
            "thresholds": [round(float(t), 6) for t in chosen.thresholds],
            "cheaper_than_T=0.5_on_tune": chosen.avg_macs_fraction < t05_tune.avg_macs_fraction,
            "tune": common.point_record(chosen, full_macs),
            "heldout": common.point_record(evaluate_rule(held, rule_spec(chosen), costs), full_macs)},
    }
    for drop in DROPS_PP:
        result = search_front(tune, costs, "confidence", Target(max_drop_pp=drop))
        out[f"max_drop_pp={drop:g}"] = {
            "thresholds": [round(float(t), 6) for t in result.chosen.thresholds],
            "tune": common.point_record(result.chosen, full_macs),
            "heldout": common.point_record(evaluate_rule(held, rule_spec(result.chosen), costs), full_macs)}
    return out


def train_and_convert(dataset: str, splits: common.Splits, args: argparse.Namespace, bundle: Path) -> dict[str, Any]:
    """Backbone (cached), branches (two-stage), int8 bundle; returns the training part of the record."""
    torch.manual_seed(0)
    desc = common.backbone_desc(args.width)
    t0 = time.perf_counter()
    backbone = common.trained_backbone(dataset, splits, args.epochs, desc)
    spatial = args.branch == "spatial"
    model = attach_branches(backbone, common.INPUT_SHAPE, splits.labels, exits_after=args.exits.split(","),
                            branch=args.branch, hidden=args.hidden if spatial else None, features_end="layer4",
                            mean=MEAN, std=STD, backbone_desc=desc)
    digest = backbone_digest(model)
    config = TrainConfig(loss="two-stage", warmup_epochs=args.warmup, lam=args.lam,
                         epochs=args.warmup + args.branch_epochs, batch_size=128, lr=3e-3, augment_shift=2)
    # two-stage: the branches first learn to classify (v0), then when to exit (v2);
    # v2 alone from random branches left every confidence near 0 (nothing exited)
    result = train_branches(model, splits.train, splits.val, config)
    model = result.model
    log.info("float validation:\n%s", result.val_summary.table())
    train_s = time.perf_counter() - t0
    report = convert(model, common.calibration_images(splits.train), bundle, verify_images=splits.val.images[:500],
                     verify_labels=splits.val.labels[:500], monolithic=False, force=True, name=f"pteenet-{dataset}")
    return {"backbone_sha256_before": digest, "backbone_sha256_after": backbone_digest(model),
            "backbone_unchanged": digest == backbone_digest(model),
            "float_val": result.val_summary.to_dict() if result.val_summary else None,
            "train_seconds": round(train_s, 1), "convert_seconds": round(report.seconds, 1)}


def run_dataset(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """Everything for one dataset; returns the result record."""
    splits = common.load_splits(dataset, args.train_limit, args.test_limit)
    spatial = args.branch == "spatial"
    config = {k: getattr(args, k) for k in ("epochs", "train_limit", "width", "exits", "branch", "warmup",
                                            "branch_epochs", "lam")}
    config["hidden"] = args.hidden if spatial else None
    bundle = RUNS / f"{dataset}-bundle"
    trained = common.built_or_reused(bundle, config, args.reuse,
                                     lambda: train_and_convert(dataset, splits, args, bundle))
    verification = require_verified(bundle, args.allow_unverified)
    t0 = time.perf_counter()
    runner = Runner(bundle, power_sensor=None)
    costs = exit_costs(runner.manifest)
    full_macs = runner.manifest.full_macs
    trace_test = common.trace_set(runner, splits.test)
    n_tune, trace_tune, trace_held = common.traced_halves(runner, splits.test)
    early = runner.manifest.num_exits - 1
    record = {
        "dataset": dataset, "backbone": common.backbone_desc(args.width), "exits_after": args.exits.split(","),
        "branch": args.branch, "hidden": config["hidden"], "loss": "two-stage (v0 warm-up, then v2)",
        "lambda": args.lam, "warmup_epochs": args.warmup, "branch_epochs": args.branch_epochs,
        "backbone_epochs": args.epochs, **splits.sizes(), **trained, "verification": verification,
        "int8_backbone_alone": {"accuracy": common.exit_accuracies(trace_test)[-1], "macs": full_macs},
        "int8_exit_accuracy": common.exit_accuracies(trace_test),
        "test_T=0.5": common.point_record(evaluate_rule(trace_test, ExitRuleSpec("confidence", (0.5,) * early),
                                                        costs), full_macs),
        "halves": {
            f"tune test[:{n_tune}] -> held-out test[{n_tune}:]": compare_on_halves(trace_tune, trace_held, costs,
                                                                                  full_macs),
            f"tune test[{n_tune}:] -> held-out test[:{n_tune}]": compare_on_halves(trace_held, trace_tune, costs,
                                                                                  full_macs)},
        "bundle_cumulative_macs": list(runner.manifest.cumulative_macs()),
        "bundle_cumulative_macs_fraction": [round(m / full_macs, 6) for m in runner.manifest.cumulative_macs()],
        "trace_and_tune_seconds": round(time.perf_counter() - t0, 1),
    }
    main_half = record["halves"][f"tune test[:{n_tune}] -> held-out test[{n_tune}:]"]
    log.info("%s: held-out backbone %.4f; T=0.5 %s; no worse than T=0.5 %s", dataset,
             main_half["heldout_backbone_accuracy"], json.dumps(main_half["T=0.5"]["heldout"]),
             json.dumps(main_half["no_worse_than_T=0.5"]["heldout"]))
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="mnist,fashion-mnist")
    ap.add_argument("--epochs", type=int, default=2, help="backbone training epochs (when not cached)")
    ap.add_argument("--train-limit", type=int, default=12000, help="use only the first N training images")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--width", type=int, default=8, help="backbone base width")
    ap.add_argument("--exits", default="layer1,layer2", help="comma-separated submodules to branch after")
    ap.add_argument("--branch", default="spatial", help="spatial, conv1, conv2, conv3, pool or bnpool")
    ap.add_argument("--hidden", type=int, default=16, help="width of the spatial branch")
    ap.add_argument("--warmup", type=int, default=1, help="v0 warm-up epochs of the branches")
    ap.add_argument("--branch-epochs", type=int, default=2, help="v2 epochs of the branches after the warm-up")
    ap.add_argument("--lam", type=float, default=0.05, help="lambda of the EENet cost term")
    ap.add_argument("--reuse", action="store_true", help="reuse a bundle built with the same settings")
    ap.add_argument("--out", default="pteenet_mnist.json", help="results file name under benchmarks/results/")
    add_option(ap)
    args = ap.parse_args()
    common.setup()
    print(common.write_results(args.out, [run_dataset(d, args) for d in args.datasets.split(",")]))


if __name__ == "__main__":
    main()
