"""``edgeexit convert``: a checkpoint -> a verified int8 bundle (workstation command, needs torch and onnx2tf).

Progress goes to stderr (one line per pipeline step with its time), the summary table to stdout, or the
whole report as JSON with ``--json``.
"""

from __future__ import annotations

import json
import logging
import time

import click
import numpy as np

from edgeexit.bench.datasets import ImageSet, load_dataset
from edgeexit.errors import UsageError
from edgeexit.runtime.manifest import EXIT_RULES

log = logging.getLogger(__name__)

#: Seed of the permutation that picks calibration / verification images.
SAMPLE_SEED = 0


def _sample(data: ImageSet, n: int, seed: int = SAMPLE_SEED) -> ImageSet:
    """``n`` images of ``data`` picked with a seeded permutation (all of them if it has fewer)."""
    idx = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
    return data.subset(idx)


def calibration_and_verification(spec: str, calib_size: int, verify_size: int) -> tuple[ImageSet, ImageSet | None]:
    """Calibration images from the dataset's train split and held-out verification images from its test split.

    A dataset without splits (a .npz file or an image folder) is divided: the calibration images and the
    verification images are disjoint.
    """
    train = load_dataset(spec, "train")
    test = load_dataset(spec, "test")
    if train.name == test.name:  # one set, no splits: hold out disjoint parts of it
        perm = np.random.default_rng(SAMPLE_SEED).permutation(len(train))
        calib_idx, verify_idx = perm[:calib_size], perm[calib_size:calib_size + verify_size]
        if len(verify_idx) == 0:
            log.warning("%s has only %d images, all used for calibration: verification skipped", spec, len(train))
        calib = train.subset(np.sort(calib_idx), f"{train.name}[calibration]")
        verify = train.subset(np.sort(verify_idx), f"{train.name}[verification]") if len(verify_idx) else None
        return calib, verify
    return _sample(train, calib_size), (_sample(test, verify_size) if verify_size > 0 else None)


def _parse_thresholds(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--thresholds must be comma-separated numbers, got {text!r}") from None


@click.command("convert")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--calib", "calib_spec", required=True, metavar="DATASET",
              help="Calibration images: mnist, fashion-mnist, cifar10:DIR, svhn:DIR, a .npz file or an image folder.")
@click.option("--calib-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="Number of calibration images (from the train split).")
@click.option("--verify-size", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Held-out images (test split) to check int8 against float; 0 skips verification.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Bundle directory to create.")
@click.option("--force", is_flag=True, help="Replace an existing bundle directory.")
@click.option("--strict", is_flag=True, help="Fail (write nothing) if int8 misses the verification tolerances.")
@click.option("--no-monolithic", is_flag=True, help="Do not convert the network without exits (the baseline).")
@click.option("--exit-rule", type=click.Choice([r for r in EXIT_RULES if r != "fixed"]), default="confidence",
              show_default=True, help="The bundle's default exit rule.")
@click.option("--thresholds", default=None, metavar="T0,T1,...",
              help="Per-exit thresholds of the exit rule (default: confidence 0.5 at every early exit).")
@click.option("--name", default=None, help="Bundle name (default: the model's architecture name).")
@click.option("--json", "as_json", is_flag=True, help="Print the conversion report as JSON on stdout.")
@click.pass_context
def convert(ctx: click.Context, checkpoint: str, calib_spec: str, calib_size: int, verify_size: int, out_dir: str,
            force: bool, strict: bool, no_monolithic: bool, exit_rule: str, thresholds: str | None,
            name: str | None, as_json: bool) -> None:
    """Convert a trained CHECKPOINT into a bundle of per-stage full-int8 TFLite files.

    Example: edgeexit convert runs/mnist-default.pt --calib mnist --out runs/mnist-bundle
    """
    from pathlib import Path

    from ..training.checkpoint import load_checkpoint, read_checkpoint
    from ..convert.convert import convert as run_convert

    quiet = bool((ctx.obj or {}).get("quiet"))
    start = time.perf_counter()

    def progress(line: str) -> None:
        if not quiet:
            click.echo(f"[{time.perf_counter() - start:6.1f} s] {line}", err=True)

    if Path(out_dir).exists() and not force:
        raise UsageError(f"output {out_dir} already exists; pass --force to replace it, or choose another --out")
    model = load_checkpoint(checkpoint)
    metrics = read_checkpoint(checkpoint).get("metrics") or {}
    calib, verify = calibration_and_verification(calib_spec, calib_size, verify_size)
    progress(f"loaded {checkpoint} ({model.spec.builder}, {model.num_exits} exits); {len(calib)} calibration "
             f"images from {calib.name}, {0 if verify is None else len(verify)} verification images")
    report = run_convert(model, calib.images, out_dir, verify_images=None if verify is None else verify.images,
                         verify_labels=None if verify is None else verify.labels,
                         thresholds=_parse_thresholds(thresholds), exit_rule=exit_rule, monolithic=not no_monolithic,
                         force=force, strict=strict, name=name, progress=progress,
                         training={"checkpoint": str(checkpoint), "metrics": metrics,
                                   "calibration": {"dataset": calib.name, "images": len(calib)}})
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.summary())
