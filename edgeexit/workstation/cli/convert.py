"""``edgeexit convert``: a checkpoint, or a network of one's own, -> a verified int8 bundle (workstation command).

Three sources: an edgeexit checkpoint (``m.pt``); ``FILE.py:NAME`` (a function/class building the user's
early-exit network, see :mod:`edgeexit.workstation.own.user_network`) with ``--weights`` and the input
description (``--input-shape``, ``--mean``, ``--std``, ``--labels``); or a multi-output ``model.onnx`` (one
output per exit, see :mod:`edgeexit.workstation.own.onnx_network`) with the same input description. Progress goes to stderr (one line per
pipeline step with its time), the summary table to stdout, or the whole report as JSON with ``--json``;
missed verification tolerances are printed on stderr.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import click
import numpy as np

from edgeexit.datasets import ImageSet, load_dataset
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


def _numbers(text: str, option: str, kind: type = float) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{option} must be comma-separated {'whole ' if kind is int else ''}numbers, got {text!r}; "
                         f"e.g. {option} {'1,28,28' if kind is int else '0.5'}") from None
    return values


def _read_labels(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --labels {path} ({type(exc).__name__}); give a UTF-8 text file with one class "
                         "name per line") from None
    labels = [ln.strip() for ln in lines if ln.strip()]
    if not labels:
        raise UsageError(f"--labels {path} is empty; give one class name per line")
    return labels


#: Options that only apply to a network file (FILE.py:NAME or an .onnx file), with their values when not given.
NETWORK_OPTIONS = {"weights": None, "input_shape": None, "mean": None, "std": None, "labels": None,
                   "color_mode": None, "confidence": None, "scores": "softmax", "split_after": None,
                   "leaf_modules": None, "trust_pickle": False, "input_layout": None, "outputs": None}
#: The options of NETWORK_OPTIONS that only one kind of network file takes.
PY_ONLY, ONNX_ONLY = ("weights", "split_after", "leaf_modules", "trust_pickle"), ("input_layout", "outputs")


def _stage_user_network(source: str, opts: dict[str, Any], classes: tuple[str, ...]) -> Any:
    """The StagedModel of ``FILE.py:NAME`` built, loaded with --weights and staged (labels default: the
    calibration set's class names when their number fits)."""
    from ..own.user_network import network_from_file, stage_network

    missing = [f"--{k.replace('_', '-')}" for k in ("input_shape", "mean", "std") if opts[k] is None]
    if missing:
        raise UsageError(f"converting a network file needs {', '.join(missing)}: the input it takes and the "
                         "normalisation it was trained with, e.g. --input-shape 1,28,28 --mean 0.5 --std 0.5")
    if opts["weights"] is None:
        log.warning("no --weights: converting %s with the weights it is built with", source)
    if opts["trust_pickle"] and opts["weights"] is None:
        raise UsageError("--trust-pickle applies to the --weights file; give --weights or drop --trust-pickle")
    net = network_from_file(source, opts["weights"], trust_pickle=opts["trust_pickle"])
    labels = _read_labels(opts["labels"]) if opts["labels"] is not None else None
    split_after = [v.strip() for v in opts["split_after"].split(",")] if opts["split_after"] else None
    leaf_modules = [v.strip() for v in opts["leaf_modules"].split(",") if v.strip()] if opts["leaf_modules"] else []
    staged = stage_network(net, _numbers(opts["input_shape"], "--input-shape", int), _numbers(opts["mean"], "--mean"),
                           _numbers(opts["std"], "--std"), labels=labels, color_mode=opts["color_mode"],
                           confidence=opts["confidence"], scores=opts["scores"], split_after=split_after,
                           leaf_modules=leaf_modules)
    if labels is None and len(classes) == staged.num_classes:
        staged.spec.labels = list(classes)
    return staged


def _stage_onnx_network(path: str, opts: dict[str, Any], classes: tuple[str, ...]) -> Any:
    """The StagedModel of the multi-output ONNX file ``path`` (input shape default: the file's own)."""
    from ..own.onnx_network import stage_onnx

    missing = [f"--{k}" for k in ("mean", "std") if opts[k] is None]
    if missing:
        raise UsageError(f"converting an ONNX file needs {', '.join(missing)}: the normalisation it was trained with "
                         "(the network sees (pixel/255 - mean) / std), e.g. --mean 0.5 --std 0.5")
    labels = _read_labels(opts["labels"]) if opts["labels"] is not None else None
    outputs = [v.strip() for v in opts["outputs"].split(",") if v.strip()] if opts["outputs"] else None
    shape = _numbers(opts["input_shape"], "--input-shape", int) if opts["input_shape"] is not None else None
    staged = stage_onnx(path, shape, _numbers(opts["mean"], "--mean"), _numbers(opts["std"], "--std"), labels=labels,
                        color_mode=opts["color_mode"], confidence=opts["confidence"], scores=opts["scores"],
                        outputs=outputs, input_layout=opts["input_layout"])
    if labels is None and len(classes) == staged.num_classes:
        staged.spec.labels = list(classes)
    return staged


@click.command("convert")
@click.argument("checkpoint", metavar="CHECKPOINT|FILE.py:NAME|MODEL.onnx")
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
@click.option("--precision", type=click.Choice(["int8", "int16", "auto", "float32"]), default="int8",
              show_default=True,
              help="auto: int8, with the layers (or whole stages) where int8 misses the check kept in float32 "
                   "between int8 inputs and outputs, the fastest way that passes on this CPU; int16: every file "
                   "TFLite 16x8 (int8 weights, int16 activations; slow reference kernels; no Edge TPU, no "
                   "class_exclusion); float32: every layer float32 between int8 inputs and outputs (the float "
                   "reference).")
@click.option("--calib-range", type=click.Choice(["minmax", "percentile", "mse"]), default="minmax",
              show_default=True,
              help="How calibration sets each inner tensor's int8 range: min/max, the 0.01-99.99 percentiles, or "
                   "the clipping with the smallest int8 error (mse); inputs and outputs keep min/max.")
@click.option("--activations", type=click.Choice(["int8", "int16"]), default="int8", hidden=True,
              help="Older spelling of --precision int8/int16.")
@click.option("--weights", default=None, metavar="FILE",
              help="FILE.py:NAME only: the state_dict to load (torch.save(model.state_dict(), FILE)).")
@click.option("--input-shape", default=None, metavar="C,H,W",
              help="Network file only: the input it takes, e.g. 1,28,28 (ONNX: default the file's own).")
@click.option("--mean", default=None, metavar="M[,M,M]",
              help="Network file only: per-channel mean it was trained with (on pixels / 255).")
@click.option("--std", default=None, metavar="S[,S,S]", help="Network file only: per-channel std, likewise.")
@click.option("--labels", default=None, metavar="FILE",
              help="Network file only: class names, one per line (default: the calibration set's, or 0..K-1).")
@click.option("--color-mode", type=click.Choice(["L", "RGB"]), default=None,
              help="Network file only: image colour mode (default from the channels).")
@click.option("--confidence", type=click.Choice(["probability", "logit"]), default=None,
              help="Network file only: what its exits' confidences are (after a sigmoid, or before it).")
@click.option("--scores", type=click.Choice(["softmax", "sigmoid"]), default="softmax", show_default=True,
              help="Network file only: how its logits are read (one class, or independent per-class scores); a "
                   "softmax (sigmoid) ending an exit's logits is removed and reported.")
@click.option("--split-after", default=None, metavar="NAME,...",
              help="FILE.py:NAME only: the submodule ending each early exit's stage (default: found automatically).")
@click.option("--leaf-modules", default=None, metavar="NAME,...",
              help="FILE.py:NAME only: submodules torch.fx must call whole instead of tracing into (qualified names "
                   "as in named_modules(), e.g. blocks.2); they must still export to ONNX.")
@click.option("--trust-pickle", is_flag=True,
              help="FILE.py:NAME only: also read --weights saved as a whole pickled model (torch.save(model)); "
                   "unpickling runs code named in the file: only for files you trust.")
@click.option("--input-layout", type=click.Choice(["nchw", "nhwc"], case_sensitive=False), default=None,
              help="ONNX file only: its input's layout (nhwc: Keras) (default: the one its declared input fits).")
@click.option("--outputs", default=None, metavar="NAME,...",
              help="ONNX file only: the outputs that are exits, in exit order, each confidence right before its "
                   "logits (default: every output, in order).")
@click.pass_context
def convert(ctx: click.Context, checkpoint: str, calib_spec: str, calib_size: int, verify_size: int, out_dir: str,
            force: bool, strict: bool, no_monolithic: bool, exit_rule: str, thresholds: str | None,
            name: str | None, as_json: bool, precision: str, calib_range: str, activations: str,
            **network_opts: Any) -> None:
    """Convert a trained CHECKPOINT, the early-exit network FILE.py:NAME builds, or a multi-output MODEL.onnx
    (one output per exit) into per-stage int8 files.

    Examples: edgeexit convert runs/mnist-default.pt --calib mnist --out runs/mnist-bundle

    edgeexit convert my_net.py:build --weights my_net.pt --input-shape 1,28,28 --mean 0.5 --std 0.5
    --confidence probability --calib fashion-mnist --out bundle/

    edgeexit convert my_net.onnx --mean 0.5 --std 0.5 --confidence probability --calib fashion-mnist --out bundle/
    """
    from ..catalog.checkpoint import load_checkpoint, read_checkpoint
    from ..conversion.pipeline import (VerificationWarning, check_calibration_range, check_precision,
                                       convert as run_convert)

    check_calibration_range(calib_range, check_precision(precision, activations, exit_rule)[0])

    quiet = bool((ctx.obj or {}).get("quiet"))
    start = time.perf_counter()

    def progress(line: str) -> None:
        if not quiet:
            click.echo(f"[{time.perf_counter() - start:6.1f} s] {line}", err=True)

    if Path(out_dir).exists() and not force:
        raise UsageError(f"output {out_dir} already exists; pass --force to replace it, or choose another --out")
    onnx_network = checkpoint.lower().endswith(".onnx")
    user_network = not onnx_network and (".py:" in checkpoint or checkpoint.endswith(".py"))
    given = [k for k, v in network_opts.items() if v != NETWORK_OPTIONS[k]]
    wrong = [k for k in given if not (user_network or onnx_network) or k in (ONNX_ONLY if user_network else PY_ONLY)]
    if wrong:
        kind = ("an ONNX file (MODEL.onnx)" if wrong[0] in ONNX_ONLY else "a network file (FILE.py:NAME)"
                if wrong[0] in PY_ONLY else "a network file (FILE.py:NAME or MODEL.onnx)")
        what = "the ONNX file" if onnx_network else "the network file" if user_network else "the checkpoint"
        raise UsageError(f"--{wrong[0].replace('_', '-')} applies to {kind}, not to {what} {checkpoint}; drop it")
    calib, verify = calibration_and_verification(calib_spec, calib_size, verify_size)
    if onnx_network:
        model = _stage_onnx_network(checkpoint, network_opts, calib.classes)
        training = {"network": checkpoint}
    elif user_network:
        model = _stage_user_network(checkpoint, network_opts, calib.classes)
        training = {"network": checkpoint, "weights": network_opts["weights"]}
    else:
        model = load_checkpoint(checkpoint)
        training = {"checkpoint": str(checkpoint), "metrics": read_checkpoint(checkpoint).get("metrics") or {}}
    progress(f"loaded {checkpoint} ({model.spec.builder}, {model.num_exits} exits); {len(calib)} calibration "
             f"images from {calib.name}, {0 if verify is None else len(verify)} verification images")
    for note in (model.spec.extra or {}).get("removed_activations") or []:
        progress(f"note: {note}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", VerificationWarning)
        report = run_convert(model, calib.images, out_dir, verify_images=None if verify is None else verify.images,
                             verify_labels=None if verify is None else verify.labels,
                             thresholds=_parse_thresholds(thresholds), exit_rule=exit_rule,
                             monolithic=not no_monolithic, force=force, strict=strict, name=name, progress=progress,
                             activations=activations, precision=precision, calibration_range=calib_range,
                             training={**training, "calibration": {"dataset": calib.name, "images": len(calib)}})
    for w in caught:  # a failed verification is said below, in the CLI's words
        if not issubclass(w.category, VerificationWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if report.verification is not None and not report.verification.passed:
        click.echo(f"warning: {'the mixed-precision bundle' if precision == 'auto' else precision} missed the "
                   f"verification tolerances "
                   f"{', '.join(report.verification.failed_tolerances)}: {'; '.join(report.verification.failures)}; "
                   "the bundle was written anyway and is marked unverified (pass --strict to write nothing instead)",
                   err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.summary())
