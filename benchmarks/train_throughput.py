"""Training throughput of ``edgeexit``'s ``train()`` against a bare torch loop of the same model, on this machine.

For every backbone recipe of zoo_train.py: images/s of the training steps of ``train()`` (augmentation, the
EENet/v0 loss, one-cycle AdamW, progress; timed between the first and the last batch of one epoch on
``--images`` images, validation excluded) and of a bare loop (the same model, batch size, channels-last
layout, AdamW and cross-entropy, tensors already in memory, nothing else), in the same process, alternated
``--rounds`` times; medians reported. Also the bare loop in the default (contiguous) layout, to show what
channels-last buys.

    python benchmarks/train_throughput.py [--nets resnet20,mobilenet_v2] [--images 3840] [--threads 2]

Writes ``benchmarks/results/zoo/train_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import RESULTS  # noqa: E402
from zoo_train import RECIPES, build_model  # noqa: E402

from edgeexit.datasets import ImageSet  # noqa: E402
from edgeexit.runtime.atomic import write_file_atomic  # noqa: E402
from edgeexit.workstation.training.data import to_tensors  # noqa: E402
from edgeexit.workstation.training.train import train  # noqa: E402


def edgeexit_rate(name: str, data: ImageSet, val: ImageSet, batch: int) -> float:
    recipe = RECIPES[name]
    model = build_model(name, list(data.classes))
    cfg = recipe.config()
    cfg.epochs, cfg.batch_size = 1, batch
    marks: list[tuple[float, int]] = []
    train(model, data, val, cfg, progress=lambda phase, done, total: marks.append((time.perf_counter(), done)))
    (t0, n0), (t1, n1) = marks[0], marks[-1]  # from the end of the first batch to the end of the last
    return (n1 - n0) / (t1 - t0)


def bare_rate(name: str, data: ImageSet, batch: int, channels_last: bool) -> float:
    model = build_model(name, list(data.classes))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()
    x, y = to_tensors(data, model.spec)
    x = x.contiguous(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    times = []
    for begin in range(0, len(y), batch):
        idx = perm[begin:begin + batch]
        loss = loss_fn(model(x[idx])[-1]["logits"], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append((time.perf_counter(), begin + len(idx)))
    (t0, n0), (t1, n1) = times[0], times[-1]
    return (n1 - n0) / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", default=",".join(n for n in RECIPES if n != "resnet56"))
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--images", type=int, default=3840)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "zoo" / "train_throughput.json"))
    args = ap.parse_args()
    common.setup(args.threads)
    splits = common.load_splits(args.dataset, args.images)
    val = ImageSet(splits.val.images[:256], splits.val.labels[:256], splits.val.classes, "val")
    rows = []
    for name in args.nets.split(","):
        batch = RECIPES[name].batch_size
        runs: dict[str, list[float]] = {"edgeexit_train": [], "bare_channels_last": [], "bare_contiguous": []}
        for _ in range(args.rounds):
            torch.manual_seed(0)
            runs["edgeexit_train"].append(edgeexit_rate(name, splits.train, val, batch))
            runs["bare_channels_last"].append(bare_rate(name, splits.train, batch, True))
            runs["bare_contiguous"].append(bare_rate(name, splits.train, batch, False))
        med = {k: round(statistics.median(v), 1) for k, v in runs.items()}
        rows.append({"net": name, "batch_size": batch, "images_per_second_median": med,
                     "edgeexit_vs_bare": round(med["edgeexit_train"] / med["bare_channels_last"], 3),
                     "channels_last_gain": round(med["bare_channels_last"] / med["bare_contiguous"], 3),
                     "rounds": {k: [round(v, 1) for v in vs] for k, vs in runs.items()}})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out, json.dumps({"command": " ".join(sys.argv), "threads": args.threads,
                                       "images": len(splits.train.labels), "torch": torch.__version__,
                                       "machine": platform.processor() or platform.machine(), "rows": rows},
                                      indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
