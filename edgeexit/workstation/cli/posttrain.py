"""``edgeexit post-train``: attach early exits to an already trained network and train only the exits.

PTEENet branches (``--branch conv1|conv2|conv3|spatial``, EENet loss v2) or class-based exits (``--branch
class``, class loss; ``--class-head pool|spatial``) on a FROZEN backbone: a zoo architecture with a
torchvision-style weights file, or a checkpoint written by ``edgeexit train``. The backbone is checked
bit-identical after training. Example::

    edgeexit post-train --backbone resnet18 --backbone-weights resnet18_cifar.pth \\
        --backbone-option num_classes=10 --dataset cifar10:data/cifar-10-batches-py \\
        --mean 0.4914,0.4822,0.4465 --std 0.247,0.2435,0.2616 --exits-after layer1,layer2 -o pte.pt

Whole-map heads for narrow networks: ``--branch spatial --hidden 16`` (EENet exits) or ``--branch class
--class-head spatial --hidden 16`` (class exits).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click
import torch

from edgeexit.datasets import load_dataset, train_val_split
from edgeexit.errors import UsageError
from edgeexit.progress import StderrProgress

from ..models import zoo
from ..training import distributed
from ..catalog.checkpoint import load_checkpoint, save_checkpoint
from ..models.heads import CLASS_HEAD_KINDS
from ..models.placement import SCHEMES
from ..posttrain.pteenet import BRANCH_KINDS, attach_branches, train_branches
from ..models.staged import MonolithicExport
from ..training.train import TrainConfig, evaluate
from .train import AMP_OPTION

log = logging.getLogger(__name__)


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, int | float | bool | str)."""
    if "=" not in text:
        raise UsageError(f"--backbone-option {text!r} is not KEY=VALUE; e.g. --backbone-option num_classes=10")
    key, raw = text.split("=", 1)
    for cast in (int, float):
        try:
            return key.strip(), cast(raw)
        except ValueError:
            pass
    if raw.lower() in ("true", "false"):
        return key.strip(), raw.lower() == "true"
    return key.strip(), raw


def parse_floats(text: str | None, name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{name} {text!r} is not a comma-separated list of numbers; e.g. 0.5 or 0.485,0.456,0.406") \
            from None


def load_backbone(backbone: str, weights: str | None, options: dict[str, Any], num_classes: int,
                  channels: int) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(module, description for the spec, preprocessing hints) of ``--backbone``.

    Raises:
        UsageError: an architecture without ``--backbone-weights`` (a random backbone has nothing to keep).
    """
    if Path(backbone).is_file():
        model = load_checkpoint(backbone)
        hints = {"mean": model.spec.mean, "std": model.spec.std}
        return MonolithicExport(model), {"spec": model.spec.to_dict()}, hints
    if backbone not in zoo.ARCHITECTURES:
        raise UsageError(f"--backbone {backbone!r} is neither a checkpoint file nor an architecture; expected a path "
                         f"or one of {', '.join(zoo.ARCHITECTURES)}")
    if weights is None:
        raise UsageError(f"--backbone {backbone} needs --backbone-weights FILE (a torch.save(model.state_dict()) file); "
                         "post-training exits on random weights is meaningless")
    opts = {"num_classes": num_classes, "in_channels": channels, **options}
    module = zoo.load_weights(zoo.build_backbone(backbone, **opts), weights)
    return module, {"arch": backbone, "options": opts}, {}


@click.command("post-train")
@click.option("--backbone", required=True, help=f"Checkpoint file, or an architecture: {', '.join(zoo.ARCHITECTURES)}.")
@click.option("--backbone-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="torchvision-style weights file (torch.save(model.state_dict())) for an architecture.")
@click.option("--backbone-option", "backbone_options", multiple=True,
              help="Architecture option KEY=VALUE (num_classes, in_channels, small_input, base_width, ...).")
@click.option("--dataset", default="mnist", show_default=True,
              help="mnist, fashion-mnist, cifar10:DIR, svhn:DIR, an image folder or a .npz file.")
@click.option("--exits-after", default=None, help="Submodules to branch after, in order, e.g. layer1,layer2.")
@click.option("--placement", type=click.Choice(SCHEMES), default="pareto", show_default=True,
              help="Cost-fraction placement when --exits-after is not given.")
@click.option("--exits", type=int, default=3, show_default=True, help="Exits including the backbone's classifier.")
@click.option("--features-end", default=None, help="Submodule where the features end (default: found).")
@click.option("--branch", type=click.Choice(BRANCH_KINDS), default="conv1", show_default=True,
              help="PTEENet branch (convN = N x conv3x3+BN+ReLU), pool/bnpool, or class (class-based exits).")
@click.option("--class-head", "class_head_kind", type=click.Choice(CLASS_HEAD_KINDS), default="pool",
              show_default=True, help="Class-exit kind for --branch class: pool (pool + per-class logits) or spatial "
              "(whole-map conv of --hidden channels first).")
@click.option("--hidden", type=int, default=None,
              help="Width of a whole-map head (--branch spatial, or --class-head spatial); default: the feature "
              "map's channels.")
@click.option("--lambda", "lam", type=float, default=0.9, show_default=True, help="EENet v2 cost weight.")
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True,
              help="Global batch: under torchrun each of W processes takes batch-size / W images per step.")
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@click.option("--train-limit", type=int, default=None, help="Use only the first N training images.")
@click.option("--mean", default=None, help="Per-channel mean the backbone was trained with (default: the data's).")
@click.option("--std", default=None, help="Per-channel std the backbone was trained with (default: the data's).")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="T of the summary table.")
@AMP_OPTION
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True, help="Checkpoint to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing --output.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write metrics here.")
def post_train(backbone: str, backbone_weights: str | None, backbone_options: tuple[str, ...], dataset: str,
               exits_after: str | None, placement: str, exits: int, features_end: str | None, branch: str,
               class_head_kind: str, hidden: int | None, lam: float, epochs: int, batch_size: int, lr: float,
               seed: int, val_fraction: float, train_limit: int | None, mean: str | None, std: str | None,
               threshold: float, amp: bool, output: str, force: bool, json_path: str | None) -> None:
    """Attach early exits to a trained, frozen network and train only the exits; write a checkpoint.

    Runs unchanged under ``torchrun`` (data-parallel over the processes; rank 0 writes and prints).
    """
    if Path(output).exists() and not force:
        raise UsageError(f"{output} already exists; pass --force to overwrite it or choose another --output")
    if class_head_kind != "pool" and branch != "class":
        raise UsageError(f"--class-head {class_head_kind} applies only to --branch class, got --branch {branch}")
    if hidden is not None and not (branch == "spatial" or (branch == "class" and class_head_kind == "spatial")):
        raise UsageError(f"--hidden applies only to --branch spatial or --branch class --class-head spatial, got "
                         f"--branch {branch}" + (f" --class-head {class_head_kind}" if branch == "class" else ""))
    if hidden is not None and hidden < 1:
        raise UsageError(f"--hidden {hidden} must be a positive integer (the whole-map head's width), e.g. 16")
    full = load_dataset(dataset, "train", limit=train_limit)
    train_set, val_set = train_val_split(full, val_fraction, seed=seed)
    has_test = dataset in ("mnist", "fashion-mnist") or dataset.split(":")[0] in ("cifar10", "svhn")
    test_set = load_dataset(dataset, "test") if has_test else val_set
    h, w, c = full.image_shape
    module, desc, hints = load_backbone(backbone, backbone_weights, dict(map(parse_option, backbone_options)),
                                        len(full.classes), c)
    if mean is None and "mean" not in hints:
        from .train import data_stats
        hints["mean"], hints["std"] = data_stats(train_set)
    torch.manual_seed(seed)  # the branches' initial weights depend on the seed too
    model = attach_branches(module, (c, h, w), list(full.classes),
                            exits_after=exits_after.split(",") if exits_after else None, placement=placement,
                            num_exits=exits, branch=branch, features_end=features_end,
                            mean=parse_floats(mean, "--mean") or hints["mean"],
                            std=parse_floats(std, "--std") or hints["std"], backbone_desc=desc,
                            class_head_kind=class_head_kind, hidden=hidden)
    loss = "class" if branch == "class" else "v2"
    cfg = TrainConfig(loss=loss, lam=lam, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                      class_pos_weight=float(len(full.classes) - 1), freeze_trunk=True, amp=amp)
    model.spec.extra.update(train=dict(vars(cfg)), dataset=dataset)
    quiet = bool((click.get_current_context().find_root().obj or {}).get("quiet"))
    with distributed.session() as info:
        result = train_branches(model, train_set, val_set, cfg, progress=StderrProgress(not quiet, unit="images"))
        test = evaluate(result.model, test_set, threshold)
    if not info.is_main:
        return
    metrics = {"test": test.to_dict(), "test_set": test_set.name, "best_epoch": result.best_epoch,
               "history": result.history, "train_seconds": result.seconds,
               "backbone_sha256": result.model.spec.extra["backbone_sha256"]}
    save_checkpoint(result.model, output, metrics, force=force)
    kind = f"class ({class_head_kind})" if branch == "class" else branch
    click.echo(f"{kind} exits after {', '.join(result.model.spec.extra['exits_after'])} on a frozen {backbone} "
               f"(backbone unchanged, sha256 {metrics['backbone_sha256'][:12]}), loss {loss}, {epochs} epochs in "
               f"{result.seconds:.0f} s")
    click.echo(test.table())
    click.echo(f"checkpoint: {output}")
    if json_path:
        Path(json_path).write_text(json.dumps(metrics, indent=2))
