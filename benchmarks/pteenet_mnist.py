"""PTEENet end to end: train a backbone, freeze it, post-train early-exit branches, convert, run int8.

For each dataset (MNIST, Fashion-MNIST):

1. train a small torchvision-layout ResNet-18 (``converters.zoo``, 3x3 stem, width 8, 1 channel) as a plain
   classifier (or reuse the one cached under runs/);
2. freeze it, attach branches after ``layer1`` and ``layer2`` (default: EENet "spatial" heads with 16 units;
   PTEENet's pooled "conv1" branches read 8-16 pooled numbers of these early maps and stayed at 20-30%
   accuracy), train only the branches (two-stage: v0 warm-up, then EENet loss v2, lambda 0.05) and check
   the backbone is bit-identical;
3. convert to an int8 bundle, trace validation and test images with the device Runner;
4. report accuracy and average MACs (every head paid for) against the backbone alone (the bundle's final exit
   = the frozen network, same int8 graphs): the confidence rule at T = 0.5, at the cheapest uniform T within
   0.5 pp of the backbone on validation, and with per-exit thresholds searched by
   ``edgeexit.tune.search_front`` on test[:5000] (max drop 0.25 / 0.5 / 1 pp) and reported on test[5000:].

Usage::

    python benchmarks/pteenet_mnist.py [--datasets mnist,fashion-mnist] [--epochs 2] [--train-limit N]
        [--branch spatial|conv1|conv2|conv3|pool|bnpool] [--hidden 16] [--exits layer1,layer2] [--width 8]
        [--lam 0.05] [--warmup 1] [--branch-epochs 2] [--out pteenet_mnist.json]

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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters import zoo  # noqa: E402
from converters.convert import convert  # noqa: E402
from converters.pteenet import attach_branches, backbone_digest, train_branches  # noqa: E402
from converters.split import split_module, staged_from_split  # noqa: E402
from converters.staged import ModelSpec, StagedModel  # noqa: E402
from converters.train import TrainConfig, train  # noqa: E402
from edgeexit.datasets import ImageSet, load_dataset  # noqa: E402
from edgeexit.manifest import ExitRuleSpec  # noqa: E402
from edgeexit.runner import Runner  # noqa: E402
from edgeexit.rules import Trace  # noqa: E402
from edgeexit.tune import Target, evaluate_rule, exit_costs, search_front  # noqa: E402
from converters.heads import EENetHead  # noqa: E402

log = logging.getLogger("pteenet_mnist")
RUNS = ROOT / "runs" / "pteenet"
RESULTS = ROOT / "benchmarks" / "results"
MEAN, STD = [0.5], [0.5]
VAL_SIZE = 1000
TUNE_SIZE = 5000  # thresholds are searched on test[:TUNE_SIZE] and reported on test[TUNE_SIZE:]


def backbone_desc(width: int) -> dict[str, Any]:
    """The zoo description of the backbone (torchvision-layout ResNet-18, 3x3 stem, 1 channel)."""
    return {"arch": "resnet18", "options": {"num_classes": 10, "in_channels": 1, "small_input": True,
                                            "base_width": width}}


BACKBONE = backbone_desc(8)


def split_train_val(data: ImageSet, limit: int | None) -> tuple[ImageSet, ImageSet]:
    """The last VAL_SIZE training images are the validation set (never the test set)."""
    n = len(data.labels)
    tr = slice(0, min(n - VAL_SIZE, limit) if limit else n - VAL_SIZE)
    va = slice(n - VAL_SIZE, n)
    return (ImageSet(data.images[tr], data.labels[tr], data.classes, data.name + "[train]"),
            ImageSet(data.images[va], data.labels[va], data.classes, data.name + "[val]"))


def plain_backbone_model(backbone: torch.nn.Module, labels: list[str], desc: dict[str, Any]) -> StagedModel:
    """The backbone as a one-exit StagedModel (segment = features, head = its classifier) for training."""
    spec = ModelSpec(builder="zoo", kwargs=desc, input_shape=(1, 28, 28), labels=labels, mean=MEAN, std=STD)
    model = staged_from_split(split_module(backbone, [], "layer4"), [], spec)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trained_backbone(dataset: str, train_set: ImageSet, val_set: ImageSet, epochs: int,
                     desc: dict[str, Any] = BACKBONE) -> torch.nn.Module:
    """Train (or load from runs/) the plain backbone; returns it in eval mode."""
    path = RUNS / f"{dataset}-resnet18w{desc['options']['base_width']}.pth"
    backbone = zoo.build_backbone(desc["arch"], **desc["options"])
    if path.is_file():
        zoo.load_weights(backbone, path)
        log.info("%s: reusing backbone %s", dataset, path)
        return backbone.eval()
    torch.manual_seed(0)
    model = plain_backbone_model(backbone, list(train_set.classes), desc)
    result = train(model, train_set, val_set, TrainConfig(loss="v0", epochs=epochs, batch_size=128, lr=3e-3,
                                                          augment_shift=2), progress=False)
    log.info("%s: backbone trained in %.0f s, val accuracy %.4f", dataset, result.seconds,
             result.val_summary.final_accuracy)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbone.state_dict(), path)  # torchvision-style weights file
    return backbone.eval()


def int8_points(runner: Runner, trace_val: Any, trace_test: Any) -> dict[str, Any]:
    """Confidence rule at T=0.5 and at the cheapest uniform T within 0.5 pp of the backbone (on validation)."""
    costs = exit_costs(runner.manifest)
    early = runner.manifest.num_exits - 1
    backbone_val = float(np.mean(trace_val.logits[-1].argmax(1) == trace_val.labels))
    chosen_t, best_cost = 1.0, None
    for t in np.round(np.arange(0.05, 1.0, 0.05), 2):
        p = evaluate_rule(trace_val, ExitRuleSpec("confidence", (float(t),) * early), costs)
        if p.accuracy >= backbone_val - 0.005 and (best_cost is None or p.avg_macs_fraction < best_cost):
            chosen_t, best_cost = float(t), p.avg_macs_fraction
    out = {}
    for name, t in (("T=0.5", 0.5), (f"T={chosen_t:g} (val-tuned)", chosen_t)):
        p = evaluate_rule(trace_test, ExitRuleSpec("confidence", (t,) * early), costs)
        out[name] = {"accuracy": p.accuracy, "avg_macs": p.avg_macs_fraction * runner.manifest.full_macs,
                     "avg_macs_fraction_of_backbone": p.avg_macs_fraction, "exit_fractions": list(p.exit_fractions)}
    return out


def spatial_heads(model: StagedModel, hidden: int) -> None:
    """Replace every branch by an EENet "spatial" head (full-size conv -> BN/ReLU -> confidence + classifier).

    The conv branches pool their feature map globally before classifying; on the low-level maps of a width-8
    ResNet that leaves 8-16 numbers per image and the branches stayed near 20-30% accuracy. The spatial head
    keeps every position (a linear map of the whole feature map to ``hidden`` units) for a few % of the MACs.
    """
    x = torch.zeros(1, *model.spec.input_shape)
    with torch.no_grad():
        for stage in model.stages[:-1]:
            x = stage.segment(x)
            c, h, w = (int(v) for v in x.shape[1:])
            stage.head = EENetHead(c, len(model.spec.labels), kind="spatial", spatial_size=(h, w), hidden=hidden)
    model.spec.kwargs["branch"] = "spatial"
    model.spec.kwargs["hidden"] = hidden
    model.spec.extra["branch"] = "spatial"


def tuned_points(runner: Runner, tune_trace: Trace, eval_trace: Trace, drops: list[float]) -> dict[str, Any]:
    """Per-exit confidence thresholds searched on ``tune_trace`` (search_front), evaluated on ``eval_trace``."""
    costs = exit_costs(runner.manifest)
    out: dict[str, Any] = {}
    for drop in drops:
        result = search_front(tune_trace, costs, "confidence", Target(max_drop_pp=drop))
        p = evaluate_rule(eval_trace, result.chosen.rule_spec(), costs)
        out[f"max_drop_pp={drop:g}"] = {"thresholds": list(result.chosen.thresholds),
                                        "tune": result.chosen.to_dict(), "tune_backbone_accuracy": result.final_accuracy,
                                        "heldout": p.to_dict()}
    return out


def run_dataset(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """Everything for one dataset; returns the result record."""
    torch.manual_seed(0)
    desc = backbone_desc(args.width)
    exits = args.exits.split(",")
    full_train = load_dataset(dataset, "train")
    test = load_dataset(dataset, "test", limit=args.test_limit)
    train_set, val_set = split_train_val(full_train, args.train_limit)
    labels = list(full_train.classes)
    t0 = time.perf_counter()
    backbone = trained_backbone(dataset, train_set, val_set, args.epochs, desc)
    spatial = args.branch == "spatial"
    model = attach_branches(backbone, (1, 28, 28), labels, exits_after=exits,
                            branch="pool" if spatial else args.branch, features_end="layer4", mean=MEAN, std=STD,
                            backbone_desc=desc)
    if spatial:
        spatial_heads(model, args.hidden)
    digest = backbone_digest(model)
    config = TrainConfig(loss="two-stage", warmup_epochs=args.warmup, lam=args.lam,
                         epochs=args.warmup + args.branch_epochs, batch_size=128, lr=3e-3, augment_shift=2)
    # two-stage: the branches first learn to classify (v0), then when to exit (v2);
    # v2 alone from random branches left every confidence near 0 (nothing exited)
    result = train_branches(model, train_set, val_set, config, progress=False)
    model = result.model
    log.info("float validation:\n%s", result.val_summary.table())
    train_s = time.perf_counter() - t0
    out_dir = RUNS / f"{dataset}-bundle"
    rng = np.random.default_rng(0)
    calib = train_set.images[rng.choice(len(train_set.labels), 256, replace=False)]
    report = convert(model, calib, out_dir, verify_images=val_set.images[:500], verify_labels=val_set.labels[:500],
                     monolithic=False, force=True, name=f"pteenet-{dataset}")
    runner = Runner(out_dir, power_sensor=None)
    trace_val = runner.trace(list(val_set.images), val_set.labels)
    trace_test = runner.trace(list(test.images), test.labels)
    n_tune = min(TUNE_SIZE, len(test.labels) // 2)
    trace_tune = runner.trace(list(test.images[:n_tune]), test.labels[:n_tune])
    trace_held = runner.trace(list(test.images[n_tune:]), test.labels[n_tune:])
    backbone_acc = float(np.mean(trace_test.logits[-1].argmax(1) == test.labels))
    held_backbone = float(np.mean(trace_held.logits[-1].argmax(1) == test.labels[n_tune:]))
    points = int8_points(runner, trace_val, trace_test)
    drops = [0.25, 0.5, 1.0]
    tuned = tuned_points(runner, trace_tune, trace_held, drops)
    # the same search on the other splits: the two test halves differ in difficulty (backbone 96.9% / 98.8%)
    cross = {f"tune test[{n_tune}:] -> test[:{n_tune}]": tuned_points(runner, trace_held, trace_tune, drops),
             "tune val -> test": tuned_points(runner, trace_val, trace_test, drops)}
    record = {
        "dataset": dataset, "backbone": desc, "exits_after": exits, "branch": args.branch,
        "hidden": args.hidden if spatial else None, "loss": "two-stage (v0 warm-up, then v2)", "lambda": args.lam,
        "warmup_epochs": args.warmup, "branch_epochs": args.branch_epochs, "backbone_epochs": args.epochs,
        "train_images": len(train_set.labels), "val_images": len(val_set.labels), "test_images": len(test.labels),
        "backbone_sha256_before": digest, "backbone_sha256_after": backbone_digest(model),
        "backbone_unchanged": digest == backbone_digest(model),
        "float_val": result.val_summary.to_dict() if result.val_summary else None,
        "int8_backbone_alone": {"accuracy": backbone_acc, "macs": runner.manifest.full_macs},
        "int8_exit_accuracy": [float(np.mean(l.argmax(1) == test.labels)) for l in trace_test.logits],
        "int8_early_exit": points,
        "tuned": {"tune_data": f"{dataset}/test[:{n_tune}]", "heldout_data": f"{dataset}/test[{n_tune}:]",
                  "heldout_backbone_accuracy": held_backbone, "points": tuned,
                  "other_splits": cross},
        "bundle_cumulative_macs": list(runner.manifest.cumulative_macs()),
        "bundle_cumulative_macs_fraction": [m / runner.manifest.full_macs
                                            for m in runner.manifest.cumulative_macs()],
        "verification_passed": None if report.verification is None else report.verification.passed,
        "train_seconds": round(train_s, 1), "convert_seconds": round(report.seconds, 1),
    }
    log.info("%s: backbone int8 %.4f at %d MACs; %s", dataset, backbone_acc, runner.manifest.full_macs,
             json.dumps(points))
    log.info("%s: held-out backbone %.4f; tuned %s", dataset, held_backbone,
             json.dumps({k: v["heldout"] for k, v in tuned.items()}))
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="mnist,fashion-mnist")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-limit", type=int, default=12000, help="use only the first N training images")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--width", type=int, default=8, help="backbone base width")
    ap.add_argument("--exits", default="layer1,layer2", help="comma-separated submodules to branch after")
    ap.add_argument("--branch", default="spatial", help="spatial, conv1, conv2, conv3, pool or bnpool")
    ap.add_argument("--hidden", type=int, default=16, help="units of the spatial branch")
    ap.add_argument("--warmup", type=int, default=1, help="v0 warm-up epochs of the branches")
    ap.add_argument("--branch-epochs", type=int, default=2, help="v2 epochs of the branches after the warm-up")
    ap.add_argument("--lam", type=float, default=0.05, help="lambda of the EENet cost term")
    ap.add_argument("--out", default="pteenet_mnist.json", help="results file name under benchmarks/results/")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    records = [run_dataset(d, args) for d in args.datasets.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / args.out
    out.write_text(json.dumps({"command": " ".join(sys.argv), "torch": torch.__version__, "results": records},
                              indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
