"""What the frozen-backbone benchmarks share (``pteenet_mnist.py``, ``classexit_mnist.py``).

* the backbone: a torchvision-layout ResNet-18 (``edgeexit.workstation.models.zoo``, 3x3 stem, 1 channel, base width 8) trained
  as a plain classifier once per dataset and cached under ``runs/pteenet/`` (a torchvision-style weights file);
* the data: the last :data:`VAL_SIZE` training images are the validation set (never the test set), the test
  set is cut into a tuning half ``test[:TUNE_SIZE]`` and a held-out half ``test[TUNE_SIZE:]``;
* the int8 path: calibration images, conversion state kept beside the bundle (``--reuse`` skips training and
  conversion when the configuration is unchanged), traces of the device Runner, operating points as JSON.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgeexit.workstation.models import zoo  # noqa: E402
from edgeexit.workstation.own.split import split_module, staged_from_split  # noqa: E402
from edgeexit.workstation.models.staged import ModelSpec, StagedModel  # noqa: E402
from edgeexit.workstation.training.train import TrainConfig, train  # noqa: E402
from edgeexit.datasets import ImageSet, load_dataset  # noqa: E402
from edgeexit.runtime.runner import Runner  # noqa: E402
from edgeexit.runtime.trace import Trace  # noqa: E402
from edgeexit.runtime.points import OperatingPoint  # noqa: E402

log = logging.getLogger("benchmarks.common")

RUNS = ROOT / "runs" / "pteenet"
RESULTS = ROOT / "benchmarks" / "results"
MEAN, STD = [0.5], [0.5]
INPUT_SHAPE = (1, 28, 28)
VAL_SIZE = 1000
TUNE_SIZE = 5000  # thresholds are searched on test[:TUNE_SIZE] and reported on test[TUNE_SIZE:] (and swapped)
CALIB_SIZE = 256


def backbone_desc(width: int = 8) -> dict[str, Any]:
    """The zoo description of the backbone (torchvision-layout ResNet-18, 3x3 stem, 1 channel)."""
    return {"arch": "resnet18", "options": {"num_classes": 10, "in_channels": 1, "small_input": True,
                                            "base_width": width}}


@dataclass
class Splits:
    """One dataset cut for the benchmarks: train / validation (from the training split) and test."""

    train: ImageSet
    val: ImageSet
    test: ImageSet

    @property
    def labels(self) -> list[str]:
        return list(self.train.classes)

    def sizes(self) -> dict[str, int]:
        return {"train_images": len(self.train.labels), "val_images": len(self.val.labels),
                "test_images": len(self.test.labels)}


def load_splits(dataset: str, train_limit: int | None, test_limit: int | None = None) -> Splits:
    """Train = the first ``train_limit`` images before the last :data:`VAL_SIZE`, val = the last VAL_SIZE."""
    data = load_dataset(dataset, "train")
    n = len(data.labels)
    tr = slice(0, min(n - VAL_SIZE, train_limit) if train_limit else n - VAL_SIZE)
    va = slice(n - VAL_SIZE, n)
    return Splits(ImageSet(data.images[tr], data.labels[tr], data.classes, data.name + "[train]"),
                  ImageSet(data.images[va], data.labels[va], data.classes, data.name + "[val]"),
                  load_dataset(dataset, "test", limit=test_limit))


def _plain_backbone_model(backbone: torch.nn.Module, labels: list[str], desc: dict[str, Any]) -> StagedModel:
    """The backbone as a one-exit StagedModel (segment = features, head = its classifier) for training."""
    spec = ModelSpec(builder="zoo", kwargs=desc, input_shape=INPUT_SHAPE, labels=labels, mean=MEAN, std=STD)
    model = staged_from_split(split_module(backbone, [], "layer4"), [], spec)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trained_backbone(dataset: str, splits: Splits, epochs: int, desc: dict[str, Any]) -> torch.nn.Module:
    """Train (or load from runs/pteenet/) the plain backbone; returns it in eval mode.

    The cache key is the dataset and the base width: delete the file to retrain with other settings.
    """
    path = RUNS / f"{dataset}-resnet18w{desc['options']['base_width']}.pth"
    backbone = zoo.build_backbone(desc["arch"], **desc["options"])
    if path.is_file():
        zoo.load_weights(backbone, path)
        log.info("%s: reusing backbone %s", dataset, path)
        return backbone.eval()
    torch.manual_seed(0)
    model = _plain_backbone_model(backbone, splits.labels, desc)
    result = train(model, splits.train, splits.val, TrainConfig(loss="v0", epochs=epochs, batch_size=128, lr=3e-3,
                                                                augment_shift=2))
    log.info("%s: backbone trained in %.0f s, val accuracy %.4f", dataset, result.seconds,
             result.val_summary.final_accuracy)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbone.state_dict(), path)  # torchvision-style weights file
    return backbone.eval()


def calibration_images(train_set: ImageSet, n: int = CALIB_SIZE) -> np.ndarray:
    """``n`` seeded random training images [n, H, W, C] uint8 for int8 calibration."""
    rng = np.random.default_rng(0)
    return train_set.images[rng.choice(len(train_set.labels), n, replace=False)]


def built_or_reused(bundle: Path, config: dict[str, Any], reuse: bool,
                    build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The training record of ``bundle``: reused when ``reuse`` and it was built with ``config`` (recorded in
    ``<bundle>.state.json``), else ``build()`` (train + convert) and remember the record for the next ``--reuse``."""
    path = bundle.with_name(bundle.name + ".state.json")
    if reuse and path.is_file() and (bundle / "manifest.json").is_file():
        state = json.loads(path.read_text())
        if state.get("config") == config:
            log.info("reusing %s (same settings)", bundle)
            return state["record"]
    record = build()
    path.write_text(json.dumps({"config": config, "record": record}, indent=2))
    return record


def trace_set(runner: Runner, data: ImageSet, start: int = 0, stop: int | None = None) -> Trace:
    """Every exit's int8 outputs on ``data[start:stop]`` (labelled)."""
    return runner.trace(list(data.images[start:stop]), data.labels[start:stop])


def traced_halves(runner: Runner, test: ImageSet) -> tuple[int, Trace, Trace]:
    """(n_tune, trace of test[:n_tune], trace of test[n_tune:]) with n_tune = min(TUNE_SIZE, half the set)."""
    n_tune = min(TUNE_SIZE, len(test.labels) // 2)
    return n_tune, trace_set(runner, test, 0, n_tune), trace_set(runner, test, n_tune)


def exit_accuracies(trace: Trace) -> list[float]:
    """Top-1 accuracy of every exit alone on a labelled trace."""
    return [float(np.mean(z.argmax(1) == trace.labels)) for z in trace.logits]


def point_record(point: OperatingPoint, full_macs: int) -> dict[str, Any]:
    """accuracy, average MACs (absolute and as a fraction of the full network), exit fractions."""
    return {"accuracy": round(point.accuracy, 6), "avg_macs": round(point.avg_macs_fraction * full_macs),
            "avg_macs_fraction": round(point.avg_macs_fraction, 6),
            "exit_fractions": [round(float(f), 6) for f in point.exit_fractions]}


def setup(threads: int = 2) -> None:
    """Logging to stderr and torch's thread count, for the benchmark scripts."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(threads)


def write_results(name: str, records: list[dict[str, Any]]) -> Path:
    """Write ``{"command", "torch", "results"}`` to ``benchmarks/results/<name>``; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / name
    out.write_text(json.dumps({"command": " ".join(sys.argv), "torch": torch.__version__, "results": records},
                              indent=2) + "\n")
    return out
