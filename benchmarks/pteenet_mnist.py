"""PTEENet end to end: train a backbone, freeze it, post-train early-exit branches, convert, run int8.

For each dataset (MNIST, Fashion-MNIST):

1. train a small torchvision-layout ResNet-18 (``converters.zoo``, 3x3 stem, width 8, 1 channel) as a plain
   classifier (or reuse the one cached under runs/);
2. freeze it, attach PTEENet branches (conv1) after ``layer1`` and ``layer2``, train only the branches
   (EENet loss v2, lambda 0.9) and check the backbone is bit-identical;
3. convert to an int8 bundle, trace validation and test images with the device Runner;
4. report accuracy and average MACs (every head paid for) of the confidence rule at T = 0.5 and at the
   cheapest uniform T whose validation accuracy is within 0.5 pp of the backbone, against the backbone alone
   (the bundle's final exit = the frozen network, same int8 graphs).

Usage::

    python benchmarks/pteenet_mnist.py [--datasets mnist,fashion-mnist] [--epochs 2] [--train-limit N]

Writes ``benchmarks/results/pteenet_mnist.json``.
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
from edgeexit.tune import evaluate_rule, exit_costs  # noqa: E402

log = logging.getLogger("pteenet_mnist")
RUNS = ROOT / "runs" / "pteenet"
RESULTS = ROOT / "benchmarks" / "results"
MEAN, STD = [0.5], [0.5]
BACKBONE = {"arch": "resnet18", "options": {"num_classes": 10, "in_channels": 1, "small_input": True, "base_width": 8}}
VAL_SIZE = 1000


def split_train_val(data: ImageSet, limit: int | None) -> tuple[ImageSet, ImageSet]:
    """The last VAL_SIZE training images are the validation set (never the test set)."""
    n = len(data.labels)
    tr = slice(0, min(n - VAL_SIZE, limit) if limit else n - VAL_SIZE)
    va = slice(n - VAL_SIZE, n)
    return (ImageSet(data.images[tr], data.labels[tr], data.classes, data.name + "[train]"),
            ImageSet(data.images[va], data.labels[va], data.classes, data.name + "[val]"))


def plain_backbone_model(backbone: torch.nn.Module, labels: list[str]) -> StagedModel:
    """The backbone as a one-exit StagedModel (segment = features, head = its classifier) for training."""
    spec = ModelSpec(builder="zoo", kwargs=BACKBONE, input_shape=(1, 28, 28), labels=labels, mean=MEAN, std=STD)
    model = staged_from_split(split_module(backbone, [], "layer4"), [], spec)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trained_backbone(dataset: str, train_set: ImageSet, val_set: ImageSet, epochs: int) -> torch.nn.Module:
    """Train (or load from runs/) the plain backbone; returns it in eval mode."""
    path = RUNS / f"{dataset}-resnet18w8.pth"
    backbone = zoo.build_backbone(BACKBONE["arch"], **BACKBONE["options"])
    if path.is_file():
        zoo.load_weights(backbone, path)
        log.info("%s: reusing backbone %s", dataset, path)
        return backbone.eval()
    torch.manual_seed(0)
    model = plain_backbone_model(backbone, list(train_set.classes))
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


def run_dataset(dataset: str, epochs: int, limit: int | None, test_limit: int | None) -> dict[str, Any]:
    """Everything for one dataset; returns the result record."""
    torch.manual_seed(0)
    full_train = load_dataset(dataset, "train")
    test = load_dataset(dataset, "test", limit=test_limit)
    train_set, val_set = split_train_val(full_train, limit)
    labels = list(full_train.classes)
    t0 = time.perf_counter()
    backbone = trained_backbone(dataset, train_set, val_set, epochs)
    model = attach_branches(backbone, (1, 28, 28), labels, exits_after=["layer1", "layer2"], branch="conv1",
                            features_end="layer4", mean=MEAN, std=STD, backbone_desc=BACKBONE)
    digest = backbone_digest(model)
    result = train_branches(model, train_set, val_set,
                            TrainConfig(loss="v2", lam=0.9, epochs=epochs, batch_size=128, lr=3e-3, augment_shift=2),
                            progress=False)
    model = result.model
    train_s = time.perf_counter() - t0
    out_dir = RUNS / f"{dataset}-bundle"
    rng = np.random.default_rng(0)
    calib = train_set.images[rng.choice(len(train_set.labels), 256, replace=False)]
    report = convert(model, calib, out_dir, verify_images=val_set.images[:500], verify_labels=val_set.labels[:500],
                     monolithic=False, force=True, name=f"pteenet-{dataset}")
    runner = Runner(out_dir, power_sensor=None)
    trace_val = runner.trace(list(val_set.images), val_set.labels)
    trace_test = runner.trace(list(test.images), test.labels)
    backbone_acc = float(np.mean(trace_test.logits[-1].argmax(1) == test.labels))
    points = int8_points(runner, trace_val, trace_test)
    record = {
        "dataset": dataset, "backbone": BACKBONE, "exits_after": ["layer1", "layer2"], "branch": "conv1",
        "loss": "v2", "lambda": 0.9, "epochs": epochs, "train_images": len(train_set.labels),
        "val_images": len(val_set.labels), "test_images": len(test.labels),
        "backbone_sha256_before": digest, "backbone_sha256_after": backbone_digest(model),
        "backbone_unchanged": digest == backbone_digest(model),
        "float_val": result.val_summary.to_dict() if result.val_summary else None,
        "int8_backbone_alone": {"accuracy": backbone_acc, "macs": runner.manifest.full_macs},
        "int8_exit_accuracy": [float(np.mean(l.argmax(1) == test.labels)) for l in trace_test.logits],
        "int8_early_exit": points,
        "bundle_cumulative_macs": list(runner.manifest.cumulative_macs()),
        "verification_passed": None if report.verification is None else report.verification.passed,
        "train_seconds": round(train_s, 1), "convert_seconds": round(report.seconds, 1),
    }
    log.info("%s: backbone int8 %.4f at %d MACs; %s", dataset, backbone_acc, runner.manifest.full_macs,
             json.dumps(points))
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="mnist,fashion-mnist")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-limit", type=int, default=12000, help="use only the first N training images")
    ap.add_argument("--test-limit", type=int, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    records = [run_dataset(d, args.epochs, args.train_limit, args.test_limit) for d in args.datasets.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "pteenet_mnist.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "torch": torch.__version__, "results": records},
                              indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
