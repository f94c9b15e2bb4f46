"""Class-based early exit end to end on a frozen backbone: class exits, int8 bundle, beta search on int8.

For each dataset: reuse (or train) the plain ResNet-18 backbone of ``benchmarks/pteenet_mnist.py``, freeze
it, attach class exits (global pool + per-class sigmoid logits) after ``layer1`` and ``layer2``, train them
with the class-based loss (CE on the final classifier + weighted BCE on the exits, pos_weight K-1), convert,
search the betas on the int8 validation trace with the authors' procedure (0.1 pp tolerance, back off two
steps), store them in the bundle, and report on the test set: accuracy and average MACs of class exclusion
against the full network (the bundle's final exit), with per-exit exclusion statistics.

Usage::

    python benchmarks/classexit_mnist.py [--datasets mnist,fashion-mnist] [--epochs 2] [--head pool|spatial]
        [--hidden 16] [--out classexit_mnist.json]

``--head spatial`` replaces the pooled class exits by class exits reading the whole feature map (full-size
conv, ``--hidden`` units). Writes ``benchmarks/results/<--out>``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pteenet_mnist import BACKBONE, MEAN, RESULTS, RUNS, STD, split_train_val, trained_backbone  # noqa: E402

from converters.heads import ClassHead  # noqa: E402
from converters.classexit import attach_class_exits, exclusion_stats, train_class_exits, tune_bundle_betas  # noqa: E402
from converters.convert import convert  # noqa: E402
from converters.pteenet import backbone_digest  # noqa: E402
from edgeexit.datasets import load_dataset  # noqa: E402
from edgeexit.manifest import ExitRuleSpec  # noqa: E402
from edgeexit.runner import Runner  # noqa: E402
from edgeexit.tune import evaluate_rule, exit_costs  # noqa: E402

log = logging.getLogger("classexit_mnist")


class SpatialClassHead(ClassHead):
    """Class exit reading the whole feature map: full-size conv -> BN/ReLU -> Linear(hidden, K) sigmoid logits.

    The pooled class head sees 8-16 globally averaged numbers of a width-8 ResNet's early maps; its per-class
    scores stayed too low for any input to reach a single remaining class. This head keeps every position.
    """

    def __init__(self, in_ch: int, num_classes: int, spatial_size: tuple[int, int], hidden: int):
        super().__init__(hidden, num_classes)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(in_ch, hidden, spatial_size, bias=False),
                                        torch.nn.BatchNorm2d(hidden), torch.nn.ReLU(inplace=True))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.classifier(self.body(features).flatten(1))}  # [N, K]


def spatial_class_heads(model: Any, hidden: int) -> None:
    """Replace every class exit of ``model`` by a :class:`SpatialClassHead` with ``hidden`` units."""
    x = torch.zeros(1, *model.spec.input_shape)
    with torch.no_grad():
        for stage in model.stages[:-1]:
            x = stage.segment(x)
            c, h, w = (int(v) for v in x.shape[1:])
            stage.head = SpatialClassHead(c, len(model.spec.labels), (h, w), hidden)
    model.spec.kwargs["head"] = "spatial class"
    model.spec.kwargs["hidden"] = hidden
    model.spec.extra["heads"] = "spatial class"


def run_dataset(dataset: str, epochs: int, limit: int | None, test_limit: int | None, head: str = "pool",
                hidden: int = 16) -> dict[str, Any]:
    """Everything for one dataset; returns the result record."""
    torch.manual_seed(0)
    full_train = load_dataset(dataset, "train")
    test = load_dataset(dataset, "test", limit=test_limit)
    train_set, val_set = split_train_val(full_train, limit)
    labels = list(full_train.classes)
    t0 = time.perf_counter()
    backbone = trained_backbone(dataset, train_set, val_set, epochs)
    model = attach_class_exits(backbone, (1, 28, 28), labels, exits_after=["layer1", "layer2"],
                               features_end="layer4", mean=MEAN, std=STD, backbone_desc=BACKBONE)
    if head == "spatial":
        spatial_class_heads(model, hidden)
    digest = backbone_digest(model)
    result = train_class_exits(model, train_set, val_set, epochs=epochs, progress=False)
    model = result.model
    train_s = time.perf_counter() - t0
    out_dir = RUNS / f"{dataset}-classexit-bundle"
    rng = np.random.default_rng(0)
    calib = train_set.images[rng.choice(len(train_set.labels), 256, replace=False)]
    report = convert(model, calib, out_dir, verify_images=val_set.images[:500], verify_labels=val_set.labels[:500],
                     exit_rule="class_exclusion", thresholds=[0.01] * (model.num_exits - 1), monolithic=False,
                     force=True, name=f"classexit-{dataset}")
    search, _ = tune_bundle_betas(out_dir, val_set.images, val_set.labels, data_name=f"{dataset} validation")
    runner = Runner(out_dir, power_sensor=None)  # reloads the manifest with the searched betas
    trace = runner.trace(list(test.images), test.labels)
    costs = exit_costs(runner.manifest)
    full_acc = float(np.mean(trace.logits[-1].argmax(1) == test.labels))
    point = evaluate_rule(trace, runner.manifest.exit_rule, costs)
    no_exclusion = evaluate_rule(trace, ExitRuleSpec("final", ()), costs)
    record = {
        "dataset": dataset, "backbone": BACKBONE, "exits_after": ["layer1", "layer2"], "heads": "class (sigmoid)" if head == "pool" else f"spatial class (sigmoid), hidden {hidden}",
        "epochs": epochs, "train_images": len(train_set.labels), "val_images": len(val_set.labels),
        "test_images": len(test.labels), "backbone_unchanged": digest == backbone_digest(model),
        "betas_int8_val": list(search.betas), "val": search.to_dict(),
        "test_full_network": {"accuracy": full_acc, "macs": runner.manifest.full_macs,
                              "avg_macs_fraction": no_exclusion.avg_macs_fraction},
        "test_class_exclusion": {"accuracy": point.accuracy,
                                 "avg_macs": point.avg_macs_fraction * runner.manifest.full_macs,
                                 "avg_macs_fraction_of_full": point.avg_macs_fraction,
                                 "exit_fractions": list(point.exit_fractions),
                                 "accuracy_change_pp": 100 * (point.accuracy - full_acc)},
        "test_exclusion_stats": exclusion_stats(trace, search.betas).to_dict(),
        "int8_exit_accuracy": [float(np.mean(l.argmax(1) == test.labels)) for l in trace.logits],
        "bundle_cumulative_macs": list(runner.manifest.cumulative_macs()),
        "verification_passed": None if report.verification is None else report.verification.passed,
        "train_seconds": round(train_s, 1), "convert_seconds": round(report.seconds, 1),
    }
    log.info("%s: %s", dataset, json.dumps({k: record[k] for k in ("betas_int8_val", "test_full_network",
                                                                   "test_class_exclusion")}))
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="mnist,fashion-mnist")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-limit", type=int, default=12000, help="use only the first N training images")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--head", default="pool", choices=["pool", "spatial"], help="class exit kind")
    ap.add_argument("--hidden", type=int, default=16, help="units of the spatial class exit")
    ap.add_argument("--out", default="classexit_mnist.json", help="results file name under benchmarks/results/")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    records = [run_dataset(d, args.epochs, args.train_limit, args.test_limit, args.head, args.hidden) for d in args.datasets.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / args.out
    out.write_text(json.dumps({"command": " ".join(sys.argv), "torch": torch.__version__, "results": records},
                              indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
