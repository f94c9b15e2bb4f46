"""Train the realistic backbones as plain classifiers, each by a recorded recipe; resumable.

One command per backbone and dataset::

    python benchmarks/zoo_train.py --dataset fashion-mnist --net resnet20
    python benchmarks/zoo_train.py --dataset fashion-mnist --net all      # every recipe, one after the other

A run stopped at any point continues from its last finished epoch when the same command is given again (the
training state lives in ``runs/zoo/<dataset>-<net>.state``) and ends with the same weights as an uninterrupted
run. The trained network is written as an edgeexit checkpoint ``runs/zoo/<dataset>-<net>.pt`` (rebuilds
itself; ``edgeexit post-train --backbone runs/zoo/...pt`` takes it), and the recipe, the per-epoch history,
the test accuracy and the training throughput go to ``benchmarks/results/zoo/train_<dataset>_<net>.json``.

The recipes (:data:`RECIPES`): widths chosen so that every network trains in about 30 minutes or less on a
2-core x86-64 machine (float32, channels-last, 2 threads); AdamW with a one-cycle schedule, random shifts of
up to 2 pixels, the last 1,000 training images for validation (best epoch kept), the test set untouched.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import INPUT_SHAPE, MEAN, RESULTS, ROOT, STD  # noqa: E402

from edgeexit.runtime.atomic import write_file_atomic  # noqa: E402
from edgeexit.workstation.posttrain.pteenet import attach_branches  # noqa: E402
from edgeexit.workstation.models import zoo  # noqa: E402
from edgeexit.workstation.catalog.registry import create  # noqa: E402
from edgeexit.workstation.models.staged import StagedModel  # noqa: E402
from edgeexit.workstation.catalog.checkpoint import save_checkpoint  # noqa: E402
from edgeexit.workstation.training.train import TrainConfig, evaluate, train  # noqa: E402

log = logging.getLogger("zoo_train")
RUNS = ROOT / "runs" / "zoo"


@dataclass(frozen=True)
class Recipe:
    """How one backbone is built and trained."""

    arch: str                      # zoo architecture, or "resnet20"/"resnet56" (edgeexit's CIFAR-style ResNets)
    options: dict[str, Any]        # builder options (widths)
    epochs: int
    lr: float = 3e-3
    batch_size: int = 128
    augment_shift: int = 2
    weight_decay: float = 5e-4
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self, seed: int = 0) -> TrainConfig:
        return TrainConfig(loss="v0", epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay, augment_shift=self.augment_shift, seed=seed)


RECIPES: dict[str, Recipe] = {
    "resnet20": Recipe("resnet20", {"base_width": 16}, epochs=15,
                       note="CIFAR-style ResNet-20 at its original width (16-32-64)"),
    "resnet56": Recipe("resnet56", {"base_width": 16}, epochs=8, note="CIFAR-style ResNet-56, original width"),
    "resnet18": Recipe("resnet18", {"small_input": True, "base_width": 16}, epochs=12,
                       note="torchvision-layout ResNet-18, 3x3 stride-1 stem, width 16 (1/4 of ImageNet's 64)"),
    "vgg11_bn": Recipe("vgg11_bn", {"width_div": 4, "hidden": 256, "small_input": True}, epochs=15,
                       note="VGG-11 with BatchNorm, channels / 4 (16..128), no fifth max-pool, 256-unit classifier"),
    "densenet121": Recipe("densenet121", {"small_input": True, "growth_rate": 8, "num_init_features": 16},
                          epochs=8, note="DenseNet-121 (6-12-24-16 layers), growth rate 8 (1/4 of 32)"),
    "mobilenet_v2": Recipe("mobilenet_v2", {"width_mult": 0.5, "small_input": True}, epochs=15,
                           note="MobileNetV2, width multiplier 0.5, stride-1 stem"),
}


def build_model(name: str, labels: list[str]) -> StagedModel:
    """The untrained backbone of recipe ``name`` as a one-exit StagedModel (a checkpoint that rebuilds itself)."""
    r = RECIPES[name]
    if r.arch in ("resnet20", "resnet56"):
        return create(r.arch, num_classes=len(labels), exits=1, input_shape=INPUT_SHAPE, labels=labels, mean=MEAN,
                      std=STD, **r.options)
    desc = {"arch": r.arch, "options": {"num_classes": len(labels), "in_channels": INPUT_SHAPE[0], **r.options}}
    backbone = zoo.build_backbone(desc["arch"], **desc["options"])
    model = attach_branches(backbone, INPUT_SHAPE, labels, exits_after=[], features_end=zoo.FEATURES_END[r.arch],
                            mean=MEAN, std=STD, backbone_desc=desc)  # a PTEENet spec without branches: rebuilds itself
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def run(name: str, dataset: str, seed: int = 0, epochs: int | None = None) -> dict[str, Any]:
    recipe = RECIPES[name]
    if epochs is not None:
        recipe = replace(recipe, epochs=epochs)
    splits = common.load_splits(dataset, None)
    torch.manual_seed(seed)
    model = build_model(name, splits.labels)
    RUNS.mkdir(parents=True, exist_ok=True)
    stem = f"{dataset}-{name}"
    cfg = recipe.config(seed)
    started = time.perf_counter()
    result = train(model, splits.train, splits.val, cfg, state_path=RUNS / f"{stem}.state")
    this_run = time.perf_counter() - started
    test = evaluate(result.model, splits.test)
    save_checkpoint(result.model, RUNS / f"{stem}.pt", {"test": test.to_dict(), "history": result.history},
                    force=True)
    epoch_seconds = [b["seconds"] - a["seconds"] for a, b in zip([{"seconds": 0.0}] + result.history,
                                                                   result.history)]
    record = {"net": name, "dataset": dataset, "recipe": asdict(recipe), "train_config": asdict(cfg),
              "macs": result.costs.full_macs, "params": sum(p.numel() for p in result.model.parameters()),
              "train_images": len(splits.train.labels), "val_images": len(splits.val.labels),
              "test_images": len(splits.test.labels), "best_epoch": result.best_epoch,
              "test_accuracy": round(test.final_accuracy, 6), "train_seconds": round(result.seconds, 1),
              "seconds_this_run": round(this_run, 1),
              "images_per_second": round(len(splits.train.labels) * len(result.history) / result.seconds, 1),
              "epoch_seconds": [round(s, 1) for s in epoch_seconds], "history": result.history,
              "checkpoint": str((RUNS / f"{stem}.pt").relative_to(ROOT)), "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "command": " ".join(sys.argv)}
    out = RESULTS / "zoo" / f"train_{dataset}_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out, json.dumps(record, indent=2) + "\n")
    log.info("%s on %s: test accuracy %.2f %% after %d epochs, %.0f s (best epoch %d) -> %s", name, dataset,
             100 * test.final_accuracy, len(result.history), result.seconds, result.best_epoch, out)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--net", required=True, help=f"one of {', '.join(RECIPES)}, a comma list, or all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (recorded in the result)")
    args = ap.parse_args()
    common.setup(args.threads)
    names = list(RECIPES) if args.net == "all" else args.net.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"error: unknown --net {', '.join(unknown)}; expected {', '.join(RECIPES)} or all")
    for name in names:
        run(name, args.dataset, args.seed, args.epochs)


if __name__ == "__main__":
    main()
