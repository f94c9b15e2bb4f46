"""``edgeexit train`` and ``edgeexit sweep``: train early-exit networks from the command line.

Results go to stdout (a per-exit table) and files (checkpoint, CSV/JSON); progress bars and logs go to
stderr. Every user error is an :class:`~edgeexit.errors.EdgeExitError` (one line, no traceback).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np

from edgeexit.datasets import ImageSet, load_dataset, train_val_split
from edgeexit.progress import Progress, StderrProgress
from edgeexit.errors import UsageError
from edgeexit.runtime.atomic import write_file_atomic

from ..training import distributed
from ..catalog.checkpoint import save_checkpoint
from ..models.heads import EENET_HEAD_KINDS
from ..models.eenet import HEAD_KINDS
from ..models.placement import SCHEMES
from ..catalog.registry import BUILDERS, RENAMED, create
from ..training.train import LOSSES, EvalSummary, TrainConfig, TrainResult, evaluate
from ..training.train import train as train_model

log = logging.getLogger(__name__)

#: models ``edgeexit train`` builds from scratch (PTEENet starts from a trained backbone: its own command).
TRAINABLE = tuple(name for name in BUILDERS if name != "pteenet")


@dataclass
class TrainingRun:
    """One finished training: the result, the test summary and what the model was tested on."""

    result: TrainResult
    test: EvalSummary
    test_name: str
    config: TrainConfig


def parse_placement(value: str) -> str | list[int] | None:
    """"pareto" / "fine" / ... or a comma list of block indices ("1,2,4,5"); "" or "default" = builder default."""
    if value in ("", "default"):
        return None
    if value in SCHEMES:
        return value
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise UsageError(f"--placement '{value}' is neither a scheme ({', '.join(SCHEMES)}) nor a comma-separated "
                         "list of block indices like 1,2,4,5") from None


def data_stats(data: ImageSet) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1] (4 decimals)."""
    x = data.images.reshape(-1, data.images.shape[-1]).astype(np.float64) / 255.0  # [N*H*W, C]
    return [round(float(v), 4) for v in x.mean(0)], [round(max(float(v), 1e-3), 4) for v in x.std(0)]


def run_training(model_name: str, dataset: str, config: TrainConfig, exits: int | None = None,
                 placement: str | list[int] | None = None, head: str | None = None, val_fraction: float = 0.1,
                 train_limit: int | None = None, threshold: float = 0.5, progress: Progress | None = None,
                 state_path: str | None = None) -> TrainingRun:
    """Load data, build ``model_name`` for it, train, and evaluate on the test split.

    Named datasets (mnist, fashion-mnist, cifar10:DIR, svhn:DIR) are tested on their test split; a
    folder or .npz is one set, so it is tested on the held-out validation part (said in ``test_name``).
    """
    if model_name in RENAMED:
        raise UsageError(f"model '{model_name}' is now called '{RENAMED[model_name]}' (an EENet ResNet); a torchvision-"
                         f"layout {model_name} with post-trained exits is 'edgeexit post-train --backbone {model_name}'")
    if model_name not in TRAINABLE:
        raise UsageError(f"unknown model '{model_name}'; expected one of {', '.join(TRAINABLE)}")
    full = load_dataset(dataset, "train", limit=train_limit)
    train_set, val_set = train_val_split(full, val_fraction, seed=config.seed)
    has_splits = dataset in ("mnist", "fashion-mnist") or dataset.split(":")[0] in ("cifar10", "svhn")
    test_set = load_dataset(dataset, "test") if has_splits else val_set
    mean, std = data_stats(train_set)
    h, w, c = full.image_shape
    kwargs: dict[str, Any] = dict(num_classes=len(full.classes), labels=list(full.classes), mean=mean, std=std,
                                  input_shape=[c, h, w])
    if exits is not None:
        kwargs["exits"] = exits
    if placement is not None:
        kwargs["placement"] = placement  # a list of block indices also fixes the number of exits
    if head is not None:
        kwargs["head"] = head
    import torch

    torch.manual_seed(config.seed)  # the initial weights depend on the seed too
    model = create(model_name, **kwargs)
    model.spec.extra["train"] = {k: v for k, v in vars(config).items()}
    model.spec.extra["dataset"] = dataset
    result = train_model(model, train_set, val_set, config, progress=progress, state_path=state_path)
    test = evaluate(result.model, test_set, threshold)
    return TrainingRun(result, test, test_set.name if has_splits else f"{val_set.name} (no test split)", config)


def machine_info() -> dict[str, Any]:
    """The machine a run used (for result files)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "cuda": torch.cuda.is_available(),
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _config(epochs: int, batch_size: int, lr: float, seed: int, loss: str, lam: float, warmup: int,
            augment: int, freeze: bool, amp: bool) -> TrainConfig:
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, loss=loss, lam=lam,
                      warmup_epochs=warmup, augment_shift=augment, freeze_trunk=freeze, amp=amp)
    cfg.validate()
    return cfg


AMP_OPTION = click.option("--amp", is_flag=True,
                          help="Mixed precision (torch.autocast) on CUDA; CPU training stays float32.")


def _common_options(fn: Any) -> Any:
    options = [
        click.option("--model", "model_name", default="eenet-small", show_default=True,
                     help=f"Architecture: {', '.join(TRAINABLE)}."),
        click.option("--dataset", default="mnist", show_default=True,
                     help="mnist, fashion-mnist, cifar10:DIR, svhn:DIR, an image folder or a .npz file."),
        click.option("--exits", type=int, default=None, help="Exits including the final one (default: the model's)."),
        click.option("--placement", default="default", show_default=True,
                     help=f"Exit placement scheme ({', '.join(SCHEMES)}) or block indices like 1,2,4,5."),
        click.option("--head", type=click.Choice(HEAD_KINDS), default=None,
                     help="Exit head kind (default: the model's; 'class' = class-based sigmoid exits)."),
        click.option("--loss", type=click.Choice(LOSSES), default="two-stage", show_default=True,
                     help="EENet loss v0/v1/v2, two-stage (v0 warm-up then v2), or class (class-based)."),
        click.option("--warmup-epochs", type=int, default=1, show_default=True, help="v0 epochs of two-stage training."),
        click.option("--epochs", type=int, default=TrainConfig.epochs, show_default=True),
        click.option("--batch-size", type=int, default=128, show_default=True,
                     help="Global batch: under torchrun each of W processes takes batch-size / W images per step."),
        click.option("--lr", type=float, default=3e-3, show_default=True, help="Peak learning rate (AdamW, one-cycle)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--val-fraction", type=float, default=0.1, show_default=True,
                     help="Share of the training split held out for validation."),
        click.option("--train-limit", type=int, default=None, help="Use only the first N training images."),
        click.option("--augment", type=int, default=0, show_default=True, help="Random shift augmentation, pixels."),
        click.option("--freeze-trunk", is_flag=True, help="Train only the exit heads (PTEENet)."),
        click.option("--threshold", type=float, default=0.5, show_default=True,
                     help="Confidence threshold T of the summary table."),
        AMP_OPTION,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command()
@_common_options
@click.option("--lambda", "lam", type=float, default=TrainConfig.lam, show_default=True,
              help="Cost weight of the EENet loss (higher = earlier exits, lower accuracy).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True, help="Checkpoint file to write (.pt).")
@click.option("--force", is_flag=True, help="Overwrite an existing --output.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the summary as JSON here.")
@click.option("--state", "state_path", type=click.Path(dir_okay=False), default=None,
              help="Resumable training: the whole training state is written here after every epoch; run the same "
              "command again after a stop to continue from the last finished epoch (same result).")
@click.pass_context
def train_command(ctx: click.Context, model_name: str, dataset: str, exits: int | None, placement: str,
                  head: str | None, loss: str, warmup_epochs: int, epochs: int, batch_size: int, lr: float, seed: int,
                  val_fraction: float, train_limit: int | None, augment: int, freeze_trunk: bool, threshold: float,
                  amp: bool, lam: float, output: str, force: bool, json_path: str | None,
                  state_path: str | None) -> None:
    """Train an early-exit network and write a checkpoint; print a per-exit summary.

    Runs unchanged under ``torchrun`` (data-parallel over the processes; rank 0 writes and prints).
    """
    if Path(output).exists() and not force:
        raise UsageError(f"{output} already exists; pass --force to overwrite it or choose another --output")
    quiet = bool((ctx.find_root().obj or {}).get("quiet"))
    cfg = _config(epochs, batch_size, lr, seed, loss, lam, warmup_epochs, augment, freeze_trunk, amp)
    with distributed.session() as info:
        run = run_training(model_name, dataset, cfg, exits, parse_placement(placement), head, val_fraction,
                           train_limit, threshold, progress=StderrProgress(not quiet, unit="images"),
                           state_path=state_path)
    if not info.is_main:
        return
    metrics = {"test": run.test.to_dict(), "test_set": run.test_name, "best_epoch": run.result.best_epoch,
               "history": run.result.history, "train_seconds": run.result.seconds}
    save_checkpoint(run.result.model, output, metrics, force=force)
    costs = run.result.costs
    click.echo(f"model {model_name} ({costs.full_macs / 1e6:.2f} MMACs, {len(costs.segment_macs)} exits), "
               f"dataset {run.test_name}, loss {loss}, lambda {lam:g}, {epochs} epochs in {run.result.seconds:.0f} s "
               f"(best epoch {run.result.best_epoch})")
    click.echo(run.test.table())
    click.echo(f"checkpoint: {output}")
    if json_path:
        Path(json_path).write_text(json.dumps(metrics, indent=2))


train_command.name = "train"
train = train_command


SWEEP_FIELDS = ("lambda", "final_accuracy", "early_exit_accuracy", "avg_cost", "avg_cost_kappa", "exit_share",
                "exit_accuracy", "train_seconds")


def parse_lambdas(value: str) -> list[float]:
    """"0.5,0.8,1" -> [0.5, 0.8, 1.0]; raises UsageError for anything else."""
    try:
        lams = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        lams = []
    if not lams or any(not np.isfinite(v) or v < 0 for v in lams):
        raise UsageError(f"--lambdas '{value}' must be a comma-separated list of numbers >= 0, like 0.5,0.8,1.0,1.3")
    return lams


def sweep_rows(runs: Sequence[tuple[float, TrainingRun]]) -> list[dict[str, Any]]:
    """One row per lambda: accuracies, average cost, exit shares."""
    return [{"lambda": lam, "final_accuracy": r.test.final_accuracy, "early_exit_accuracy": r.test.early_exit_accuracy,
             "avg_cost": r.test.avg_cost, "avg_cost_kappa": r.test.avg_cost_kappa, "exit_share": r.test.exit_share,
             "exit_accuracy": r.test.exit_accuracy, "train_seconds": r.result.seconds} for lam, r in runs]


def sweep_table(rows: Sequence[dict[str, Any]], threshold: float) -> str:
    """Accuracy vs average cost, one line per lambda."""
    out = [f"{'lambda':>7} {'final acc':>9} {'EE acc@T=' + format(threshold, 'g'):>12} {'avg cost':>8}  exit shares"]
    for r in rows:
        shares = " ".join(f"{100 * s:5.1f}%" for s in r["exit_share"])
        out.append(f"{r['lambda']:>7g} {100 * r['final_accuracy']:>8.2f}% {100 * r['early_exit_accuracy']:>11.2f}% "
                   f"{r['avg_cost']:>8.3f}  {shares}")
    return "\n".join(out)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, text)


@click.command()
@_common_options
@click.option("--lambdas", default="0.5,0.8,1.0,1.3", show_default=True, help="Comma-separated lambda values.")
@click.option("--output-dir", "-o", type=click.Path(file_okay=False), required=True,
              help="Folder for sweep.csv, sweep.json and one checkpoint per lambda.")
@click.option("--force", is_flag=True, help="Overwrite existing files in --output-dir.")
@click.pass_context
def sweep_command(ctx: click.Context, model_name: str, dataset: str, exits: int | None, placement: str,
                  head: str | None, loss: str, warmup_epochs: int, epochs: int, batch_size: int, lr: float, seed: int,
                  val_fraction: float, train_limit: int | None, augment: int, freeze_trunk: bool, threshold: float,
                  amp: bool, lambdas: str, output_dir: str, force: bool) -> None:
    """Train one network per lambda and tabulate accuracy against average cost (CSV + JSON)."""
    lams = parse_lambdas(lambdas)
    out = Path(output_dir)
    csv_path, json_path = out / "sweep.csv", out / "sweep.json"
    if not force and (csv_path.exists() or json_path.exists()):
        raise UsageError(f"{out} already holds sweep results; pass --force to overwrite or choose another --output-dir")
    quiet = bool((ctx.find_root().obj or {}).get("quiet"))
    runs: list[tuple[float, TrainingRun]] = []
    with distributed.session() as info:
        for lam in lams:
            cfg = _config(epochs, batch_size, lr, seed, loss, lam, warmup_epochs, augment, freeze_trunk, amp)
            run = run_training(model_name, dataset, cfg, exits, parse_placement(placement), head, val_fraction,
                               train_limit, threshold, progress=StderrProgress(not quiet, unit="images"))
            if info.is_main:
                save_checkpoint(run.result.model, out / f"lambda_{lam:g}.pt",
                                {"test": run.test.to_dict(), "test_set": run.test_name}, force=True)
            runs.append((lam, run))
            log.info("lambda %g: early-exit accuracy %.4f at cost %.3f", lam, run.test.early_exit_accuracy,
                     run.test.avg_cost)
    if not info.is_main:
        return
    rows = sweep_rows(runs)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SWEEP_FIELDS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (" ".join(f"{v:.4f}" for v in r[k]) if isinstance(r[k], list) else r[k]) for k in SWEEP_FIELDS})
    _atomic_write(csv_path, buf.getvalue())
    _atomic_write(json_path, json.dumps({"model": model_name, "dataset": dataset, "threshold": threshold,
                                         "loss": loss, "epochs": epochs, "rows": rows}, indent=2))
    click.echo(sweep_table(rows, threshold))
    click.echo(f"written: {csv_path}, {json_path}")


sweep_command.name = "sweep"
sweep = sweep_command
