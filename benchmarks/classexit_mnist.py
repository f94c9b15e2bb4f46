"""Class-based early exit end to end on a frozen backbone: class exits, int8 bundle, beta search on int8.

For each dataset: reuse (or train) the plain ResNet-18 backbone shared with ``benchmarks/pteenet_mnist.py``
(``benchmarks/common.py``), freeze it, attach class exits after ``layer1`` and ``layer2`` (``--head pool``:
global pool + per-class sigmoid logits; ``--head spatial``: a whole-map convolution of ``--hidden`` channels
first), train them with the class-based loss (CE on the final classifier + weighted BCE on the exits,
pos_weight K-1), convert, search the betas on the int8 validation trace (the last 1000 training images, never
the test set) with the authors' procedure (0.1 pp tolerance, back off two steps), store them in the bundle,
and report on the test set and on its held-out half test[5000:]: accuracy and average MACs of class exclusion
against the full network (the bundle's final exit), with per-exit exclusion statistics.

Usage::

    python benchmarks/classexit_mnist.py [--datasets mnist,fashion-mnist] [--epochs 2] [--head pool|spatial]
        [--hidden 16] [--reuse] [--out classexit_mnist.json]

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

from edgeexit.workstation.posttrain.classexit import attach_class_exits, exclusion_stats, train_class_exits, tune_bundle_betas  # noqa: E402
from edgeexit.workstation.conversion.pipeline import convert  # noqa: E402
from edgeexit.workstation.posttrain.pteenet import backbone_digest  # noqa: E402
from edgeexit.runtime.manifest import ExitRuleSpec  # noqa: E402
from edgeexit.runtime.trace import Trace  # noqa: E402
from edgeexit.runtime.runner import Runner  # noqa: E402
from edgeexit.tuning.evaluate import ExitCosts, evaluate_rule, exit_costs  # noqa: E402

log = logging.getLogger("classexit_mnist")
EXITS_AFTER = ["layer1", "layer2"]


def train_and_convert(dataset: str, splits: common.Splits, args: argparse.Namespace, bundle: Path) -> dict[str, Any]:
    """Backbone (cached), class exits, int8 bundle, betas searched on the int8 validation trace."""
    torch.manual_seed(0)
    desc = common.backbone_desc(args.width)
    t0 = time.perf_counter()
    backbone = common.trained_backbone(dataset, splits, args.epochs, desc)
    model = attach_class_exits(backbone, common.INPUT_SHAPE, splits.labels, head=args.head,
                               hidden=args.hidden if args.head == "spatial" else None, exits_after=EXITS_AFTER,
                               features_end="layer4", mean=MEAN, std=STD, backbone_desc=desc)
    digest = backbone_digest(model)
    result = train_class_exits(model, splits.train, splits.val, epochs=args.epochs)
    model = result.model
    train_s = time.perf_counter() - t0
    report = convert(model, common.calibration_images(splits.train), bundle, verify_images=splits.val.images[:500],
                     verify_labels=splits.val.labels[:500], exit_rule="class_exclusion",
                     thresholds=[0.01] * (model.num_exits - 1), monolithic=False, force=True,
                     name=f"classexit-{dataset}")
    search, _ = tune_bundle_betas(bundle, splits.val.images, splits.val.labels, data_name=f"{dataset} validation")
    return {"backbone_unchanged": digest == backbone_digest(model), "betas_int8_val": list(search.betas),
            "val": search.to_dict(),
            "train_seconds": round(train_s, 1), "convert_seconds": round(report.seconds, 1)}


def exclusion_record(trace: Trace, betas: list[float], costs: ExitCosts, full_macs: int) -> dict[str, Any]:
    """The full network against class exclusion at ``betas`` on one labelled trace."""
    full = evaluate_rule(trace, ExitRuleSpec("final", ()), costs)
    point = evaluate_rule(trace, ExitRuleSpec("class_exclusion", tuple(betas)), costs)
    return {"full_network": common.point_record(full, full_macs),
            "class_exclusion": common.point_record(point, full_macs),
            "accuracy_change_pp": round(100 * (point.accuracy - full.accuracy), 4),
            "exclusion_stats": exclusion_stats(trace, betas).to_dict()}


def run_dataset(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """Everything for one dataset; returns the result record."""
    splits = common.load_splits(dataset, args.train_limit, args.test_limit)
    config = {k: getattr(args, k) for k in ("epochs", "train_limit", "width", "head")}
    config["hidden"] = args.hidden if args.head == "spatial" else None
    bundle = RUNS / f"{dataset}-classexit-bundle"
    trained = common.built_or_reused(bundle, config, args.reuse,
                                     lambda: train_and_convert(dataset, splits, args, bundle))
    verification = require_verified(bundle, args.allow_unverified)
    runner = Runner(bundle, power_sensor=None)  # the manifest holds the searched betas
    costs = exit_costs(runner.manifest)
    full_macs = runner.manifest.full_macs
    betas = list(runner.manifest.exit_rule.thresholds)
    trace = common.trace_set(runner, splits.test)
    n_tune = min(common.TUNE_SIZE, len(splits.test.labels) // 2)
    held = common.trace_set(runner, splits.test, n_tune)
    record = {
        "dataset": dataset, "backbone": common.backbone_desc(args.width), "exits_after": EXITS_AFTER,
        "head": args.head, "hidden": config["hidden"], "epochs": args.epochs, **splits.sizes(), **trained,
        "verification": verification, "test": exclusion_record(trace, betas, costs, full_macs),
        f"heldout test[{n_tune}:]": exclusion_record(held, betas, costs, full_macs),
        "int8_exit_accuracy": common.exit_accuracies(trace),
        "full_macs": full_macs,
        "bundle_cumulative_macs": list(runner.manifest.cumulative_macs()),
    }
    log.info("%s: betas %s; test %s", dataset, betas, json.dumps({k: record["test"][k] for k in
                                                                 ("full_network", "class_exclusion")}))
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="mnist,fashion-mnist")
    ap.add_argument("--epochs", type=int, default=2,
                    help="epochs of the class exits (and of the backbone if not cached)")
    ap.add_argument("--train-limit", type=int, default=12000, help="use only the first N training images")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--width", type=int, default=8, help="backbone base width")
    ap.add_argument("--head", default="spatial", choices=["pool", "spatial"], help="class exit kind")
    ap.add_argument("--hidden", type=int, default=16, help="width of the spatial class exit")
    ap.add_argument("--reuse", action="store_true", help="reuse a bundle built with the same settings")
    ap.add_argument("--out", default="classexit_mnist.json", help="results file name under benchmarks/results/")
    add_option(ap)
    args = ap.parse_args()
    common.setup()
    print(common.write_results(args.out, [run_dataset(d, args) for d in args.datasets.split(",")]))


if __name__ == "__main__":
    main()
