"""Benchmark a bundle on a labelled set, against its monolithic int8 model measured in the same run.

One benchmark (:func:`run_benchmark`) makes three passes over the set, batch 1, after a warm-up:

1. **Timed pass** (``repeat`` times): for every input, the early-exit network with the chosen rule, the same
   network *forced to its last exit* (every stage runs: the staging overhead) and the monolithic model, in an
   order that rotates from input to input, so that frequency scaling, heat and cache effects hit all three
   alike. Latencies are the Runner's own (input copy through the last exit decision; preprocessing excluded
   for both networks); with ``repeat`` > 1 each input's latency is its median over the repeats.
2. **Trace pass**: every stage once per input (:meth:`edgeexit.runtime.runner.Runner.trace`), recording every exit's
   outputs and every stage's latency. The threshold sweep re-decides exits from it with numpy; its latencies
   are *estimated*: each stage's median latency over the trace, summed up to the exit the rule would take
   (medians, so that a busy moment of the machine does not tilt one point of the sweep).
3. Optionally, the float network of a checkpoint on the same images (workstation only, torch imported lazily).

The result is one JSON-able dict (see ``RESULT_FIELDS``); :func:`write_results` stores it as
``<board>_<bundle>_<time>.json`` plus the sweep as ``.csv`` and the trade-off plot as ``.png``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..energy import proxy as _energy
from ..runtime.bundle import Bundle, load_bundle
from .datasets import ImageSet
from .envinfo import EnvPaths, collect_environment, slug
from ..errors import DatasetError, EdgeExitError, UsageError
from ..runtime.manifest import ExitRuleSpec, Manifest
from ..runtime.rules import ExitRule, FinalExitRule, FixedExitRule, RULES, rule_from_spec
from ..runtime.trace import Trace

log = logging.getLogger(__name__)

SCHEMA = "edgeexit-bench"
SCHEMA_VERSION = 1
#: Top-level keys of every result.
RESULT_FIELDS = ("schema", "schema_version", "created", "bundle", "dataset", "settings", "environment", "exits",
                 "overall", "monolithic", "forced_last", "speedup", "sweep", "float", "inputs", "notes",
                 "energy_sources")
#: Points of the global-threshold grid of each rule kind (plus the rule's end points).
GRID_POINTS = 21
#: Columns of the sweep CSV.
SWEEP_COLUMNS = ("name", "source", "kind", "thresholds", "accuracy", "avg_macs", "mac_fraction", "est_latency_ms",
                 "est_latency_p50_ms", "ops_mj", "exit_shares")

#: progress(phase, done, total): called now and then during the passes (the CLI draws it on stderr).
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BenchSettings:
    """How to run a benchmark.

    Attributes:
        warmup: inputs run (per variant) before timing starts.
        repeat: timed passes over the set; each input's latency is its median over the passes.
        num_threads: interpreter threads per stage (and for the monolithic model).
        backend: interpreter backend ("auto", "ai-edge-litert", "tflite-runtime", "tensorflow").
        rule: the exit rule to measure (an ExitRule, an ExitRuleSpec, an operating point name) or None for
            the bundle's own rule.
        board: board power profile for the energy estimate (None / "auto" = detect).
        sweep: run the trace pass and the threshold sweep.
        resize: convert dataset images of another size or colour mode with Pillow (bilinear) instead of
            refusing them.
        float_checkpoint: a training checkpoint whose float network is evaluated beside (needs torch).
    """

    warmup: int = 20
    repeat: int = 1
    num_threads: int = 1
    backend: str = "auto"
    rule: ExitRule | ExitRuleSpec | str | None = None
    board: str | None = None
    sweep: bool = True
    resize: bool = False
    float_checkpoint: str | None = None

    def validate(self) -> None:
        """Raise UsageError for values that cannot run."""
        for name in ("warmup", "repeat", "num_threads"):
            value = getattr(self, name)
            low = 0 if name == "warmup" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")


# ------------------------------------------------------------------------------------------- dataset checks

def _index_named(classes: Sequence[str]) -> bool:
    """True when class names are just "0", "1", ... (a .npz without a 'classes' array)."""
    return all(c == str(i) for i, c in enumerate(classes))


def check_dataset(manifest: Manifest, data: ImageSet, resize: bool = False) -> None:
    """Check that a labelled set fits a bundle before anything is run.

    Class names must equal the bundle's labels, in order. A set whose classes are only numbered
    ("0", "1", ...; e.g. a .npz without a ``classes`` array) may have fewer classes than the bundle, as long
    as every label is a valid class index of it. Images must have the bundle's height, width and channels
    unless ``resize`` is set (then Pillow converts them, see :func:`fit_images`).

    Raises:
        DatasetError: an empty set, other classes, or images of another size or colour mode (one line).
    """
    if len(data) == 0:
        raise DatasetError(f"dataset {data.name} has no images; a benchmark needs at least one labelled image")
    labels = manifest.labels
    if _index_named(data.classes):
        if len(data.classes) > len(labels):
            raise DatasetError(f"dataset {data.name} has {len(data.classes)} classes but bundle '{manifest.name}' "
                               f"has {len(labels)} ({', '.join(labels[:5])}{', ...' if len(labels) > 5 else ''}); "
                               "use a dataset of the bundle's task")
    elif tuple(data.classes) != tuple(labels):
        diff = next((i for i, (a, b) in enumerate(zip(data.classes, labels)) if a != b), min(len(labels),
                                                                                            len(data.classes)))
        got = data.classes[diff] if diff < len(data.classes) else "<none>"
        want = labels[diff] if diff < len(labels) else "<none>"
        raise DatasetError(f"dataset {data.name} has {len(data.classes)} classes and bundle '{manifest.name}' "
                           f"{len(labels)}; class {diff} is {got!r} in the dataset but {want!r} in the bundle; "
                           "use a dataset of the bundle's task with the same class order")
    h, w = manifest.preprocessing.size
    c = manifest.preprocessing.channels
    if data.image_shape != (h, w, c) and not resize:
        ih, iw, ic = data.image_shape
        raise DatasetError(f"dataset {data.name} has {ih}x{iw}x{ic} images but bundle '{manifest.name}' takes "
                           f"{h}x{w}x{c} ({manifest.preprocessing.color_mode}); pass --resize to convert them with "
                           "Pillow, or use a dataset of the bundle's input size")


def fit_images(manifest: Manifest, images: np.ndarray) -> np.ndarray:
    """Convert ``images`` [N, H', W', C'] uint8 to the bundle's size and colour mode with Pillow (bilinear).

    Returns:
        [N, H, W, C] uint8, the bundle's (H, W) and channels.

    Raises:
        DatasetError: Pillow is not installed.
    """
    try:
        from PIL import Image
    except ImportError:
        raise DatasetError("resizing dataset images needs Pillow: pip install Pillow") from None
    h, w = manifest.preprocessing.size
    mode = manifest.preprocessing.color_mode
    out = np.empty((images.shape[0], h, w, manifest.preprocessing.channels), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img, "L" if img.shape[2] == 1 else "RGB")
        arr = np.asarray(pil.convert(mode).resize((w, h), Image.BILINEAR), dtype=np.uint8)
        out[i] = arr[:, :, None] if arr.ndim == 2 else arr
    return out


# ---------------------------------------------------------------------------------------------- statistics

def latency_summary(values_ms: np.ndarray) -> dict[str, float | None]:
    """mean, p50, p95, p99, min and max of latencies in ms (None for an empty array)."""
    v = np.asarray(values_ms, dtype=np.float64)
    if v.size == 0:
        return {k: None for k in ("mean", "p50", "p95", "p99", "min", "max")}
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"mean": float(v.mean()), "p50": float(p50), "p95": float(p95), "p99": float(p99),
            "min": float(v.min()), "max": float(v.max())}


def _robust_mean(lat_ms: np.ndarray, exit_index: np.ndarray) -> float:
    """Mean over inputs of the median latency of the exit each input took: sum_k share_k * p50_k.

    Unlike the plain mean it is not dragged by a few inputs that the OS delayed, and it is the statistic the
    sweep estimates (median stage latencies), so measured and estimated points can be compared.
    """
    exits, counts = np.unique(exit_index, return_counts=True)
    medians = np.array([np.median(lat_ms[exit_index == k]) for k in exits])
    return float(np.sum(counts * medians) / counts.sum())


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def monolithic_ops_mj(manifest: Manifest) -> float | None:
    """The operation-proxy energy (mJ) of the monolithic model, with the constants of :mod:`edgeexit.energy.proxy`.

    Like a stage: its MACs, one int32 add per output element, its input and output through SRAM and every
    parameter byte from DRAM once. None when the bundle has no monolithic model.
    """
    mono = manifest.monolithic
    if mono is None:
        return None
    act_in, act_out = int(np.prod(mono.input.shape)), int(np.prod(mono.output.shape))
    pj = (mono.macs * _energy.INT8_MAC_PJ + act_out * _energy.INT32_ADD_PJ
          + (act_in + act_out) * _energy.SRAM_PJ_PER_BYTE + mono.param_bytes * _energy.DRAM_PJ_PER_BYTE)
    return pj * 1e-9


# ------------------------------------------------------------------------------------------------- sweep

def threshold_grid(kind: str, num_classes: int, points: int = GRID_POINTS) -> list[float]:
    """Global thresholds (the same at every exit) spanning a rule's useful range, from permissive to strict.

    confidence / max_softmax: 0..1 plus 0.99 and 0.999 (int8 exits are often very confident);
    entropy: ln K (almost everything leaves at exit 0) down to 0 nats (nothing leaves early);
    class_exclusion: beta 0.01..0.99.

    Raises:
        UsageError: a rule without thresholds.
    """
    if kind in ("confidence", "max_softmax"):
        grid = list(np.linspace(0.0, 1.0, points)) + [0.99, 0.999]
    elif kind == "entropy":
        grid = list(np.linspace(math.log(num_classes), 0.0, points))
    elif kind == "class_exclusion":
        grid = list(np.linspace(0.01, 0.99, points))
    else:
        raise UsageError(f"rule '{kind}' has no thresholds to sweep; expected one of confidence, max_softmax, "
                         "entropy, class_exclusion")
    return sorted({round(float(t), 6) for t in grid}, reverse=(kind == "entropy"))


def _sweep_point(name: str, source: str, rule: ExitRule, trace: Trace, cum_macs: np.ndarray, cum_ops: np.ndarray,
                 full_macs: int) -> tuple[dict[str, Any], np.ndarray]:
    exit_index, prediction = rule.simulate(trace)                   # [N] int64, [N] int64
    n, e = trace.num_inputs, trace.num_exits
    lat = np.cumsum(np.median(trace.stage_latency_ms, axis=0))[exit_index]  # [N] ms: median stage costs to the exit
    spec = rule.to_spec()
    macs = cum_macs[exit_index]
    return {"name": name, "source": source, "kind": spec.kind, "thresholds": list(spec.thresholds),
            "exit": spec.exit, "accuracy": trace.accuracy(prediction), "avg_macs": float(macs.mean()),
            "mac_fraction": float(macs.mean()) / max(full_macs, 1), "est_latency_ms": float(lat.mean()),
            "est_latency_p50_ms": float(np.median(lat)), "ops_mj": float(cum_ops[exit_index].mean()),
            "exit_shares": [float(v) for v in np.bincount(exit_index, minlength=e) / n]}, exit_index


def sweep_tradeoff(trace: Trace, manifest: Manifest, run_rule: ExitRule | None = None,
                   extra_rules: Sequence[tuple[str, str, ExitRule]] = ()) -> dict[str, Any]:
    """Accuracy against average MACs and estimated latency for a grid of global thresholds and named rules.

    The grid uses the kind of ``run_rule`` (or the bundle's rule) when it has thresholds, else max_softmax.
    Named points: the bundle's own rule ("bundle"), the measured run's rule ("run", when it differs), the
    bundle's operating points, ``extra_rules`` as (name, source, rule), and every exit on its own ("fixed").

    Args:
        trace: every stage's outputs and latencies for N labelled inputs.
        manifest: the bundle's manifest (costs, rule, operating points).
        run_rule: the rule the timed pass used.
        extra_rules: more named points.

    Returns:
        {"rule": grid kind, "latency_is_estimated": True, "stage_latency_ms": per-stage summary,
        "points": [...]} with one dict per point (see ``SWEEP_COLUMNS``).
    """
    if trace.labels is None or trace.stage_latency_ms is None:
        raise UsageError("the sweep needs a trace with labels and stage latencies: Runner.trace(images, labels)")
    cum_macs = np.asarray(manifest.cumulative_macs(), dtype=np.float64)            # [E]
    cum_ops = np.cumsum(_energy.stages_ops_mj(manifest))                          # [E] mJ
    bundle_rule = rule_from_spec(manifest.exit_rule)
    base = run_rule if run_rule is not None and run_rule.uses_thresholds else bundle_rule
    kind = base.kind if base.uses_thresholds else "max_softmax"
    has_conf = all(c is not None for c in trace.confidence[:-1])
    if kind == "confidence" and not has_conf:
        kind = "max_softmax"
    points: list[dict[str, Any]] = []
    e = trace.num_exits

    def add(name: str, source: str, rule: ExitRule) -> None:
        try:
            point, _ = _sweep_point(name, source, rule, trace, cum_macs, cum_ops, manifest.full_macs)
        except UsageError as exc:  # e.g. an operating point for another number of exits
            log.warning("sweep: skipped %s (%s)", name, exc)
            return
        points.append(point)

    if e > 1:
        for t in threshold_grid(kind, manifest.num_classes):
            add(f"{kind} T={t:g}", "grid", RULES[kind]([t] * (e - 1)))
    add(f"bundle ({_rule_text(bundle_rule)})", "bundle", bundle_rule)
    if run_rule is not None and run_rule.to_spec() != bundle_rule.to_spec():
        add(f"run ({_rule_text(run_rule)})", "run", run_rule)
    for name, value in manifest.operating_points.items():
        if name == "front" or not isinstance(value, dict):
            continue
        try:
            add(f"point '{name}'", "operating_point", rule_from_spec(manifest.point_rule(name)))
        except EdgeExitError as exc:
            log.warning("sweep: operating point %r skipped (%s)", name, exc)
    for name, source, rule in extra_rules:
        add(name, source, rule)
    for k in range(e):
        add(f"exit {k} only", "fixed", FixedExitRule(k))
    st = trace.stage_latency_ms
    return {"rule": kind, "latency_is_estimated": True,
            "latency_note": "estimated: per-stage median latencies of the trace pass, summed up to each input's exit",
            "stage_latency_ms": {"p50": [float(v) for v in np.median(st, axis=0)],
                                 "mean": [float(v) for v in st.mean(axis=0)]},
            "points": points}


def _rule_text(rule: ExitRule) -> str:
    spec = rule.to_spec()
    if spec.kind == "fixed":
        return f"fixed exit {spec.exit}"
    if not spec.thresholds:
        return spec.kind
    return f"{spec.kind} {','.join(f'{t:g}' for t in spec.thresholds)}"


# --------------------------------------------------------------------------------------------- the passes

@dataclass
class _Timed:
    """Per-input results of the timed pass."""

    n: int
    repeat: int
    pred: np.ndarray = field(init=False)         # [N] int64 early-exit prediction
    exit: np.ndarray = field(init=False)         # [N] int64 exit taken
    macs: np.ndarray = field(init=False)         # [N] int64
    ops_mj: np.ndarray = field(init=False)       # [N] float64
    measured_mj: np.ndarray = field(init=False)  # [R, N] float64, NaN where no sensor reading
    lat: np.ndarray = field(init=False)          # [R, N] ms, early exit
    forced: np.ndarray = field(init=False)       # [R, N] ms, forced to the last exit
    mono: np.ndarray = field(init=False)         # [R, N] ms, monolithic
    mono_pred: np.ndarray = field(init=False)    # [N] int64
    forced_pred: np.ndarray = field(init=False)  # [N] int64

    def __post_init__(self) -> None:
        n, r = self.n, self.repeat
        self.pred, self.exit, self.macs = (np.zeros(n, np.int64) for _ in range(3))
        self.mono_pred, self.forced_pred = np.full(n, -1, np.int64), np.zeros(n, np.int64)
        self.ops_mj = np.zeros(n, np.float64)
        self.measured_mj = np.full((r, n), np.nan)
        self.lat, self.forced, self.mono = (np.full((r, n), np.nan) for _ in range(3))


def _timed_pass(runner: Any, images: np.ndarray, rule: ExitRule, settings: BenchSettings, has_mono: bool,
                progress: Progress | None) -> _Timed:
    """Warm up, then run every input through the early-exit network, the forced-last network and the
    monolithic model, in an order that rotates per input."""
    n = images.shape[0]
    final = FinalExitRule()
    out = _Timed(n, settings.repeat)

    def staged(i: int, r: int) -> None:
        runner.set_rule(rule)
        res = runner.classify(images[i])
        out.lat[r, i] = res.latency_ms
        if r == 0:
            out.pred[i], out.exit[i], out.macs[i] = res.label, res.exit_index, res.macs
            out.ops_mj[i] = res.energy.ops_mj
        if res.energy.measured_mj is not None:
            out.measured_mj[r, i] = res.energy.measured_mj

    def forced(i: int, r: int) -> None:
        runner.set_rule(final)
        res = runner.classify(images[i])
        out.forced[r, i] = res.latency_ms
        out.forced_pred[i] = res.label

    def mono(i: int, r: int) -> None:
        res = runner.run_monolithic(images[i])
        out.mono[r, i] = res.latency_ms
        out.mono_pred[i] = res.label

    variants: list[Callable[[int, int], None]] = [staged, forced] + ([mono] if has_mono else [])
    for w in range(settings.warmup):  # caches, thread pools, CPU frequency; results discarded
        x = images[w % n]
        runner.set_rule(rule)
        runner.classify(x)
        runner.set_rule(final)
        runner.classify(x)
        if has_mono:
            runner.run_monolithic(x)
    total = n * settings.repeat
    step = max(1, total // 100)
    for r in range(settings.repeat):
        for i in range(n):
            start = (i + r) % len(variants)
            for v in variants[start:] + variants[:start]:
                v(i, r)
            done = r * n + i + 1
            if progress is not None and (done % step == 0 or done == total):
                progress("timed", done, total)
    runner.set_rule(rule)
    return out


def _trace_pass(runner: Any, images: np.ndarray, labels: np.ndarray, progress: Progress | None) -> Trace:
    """Every stage once per input, with progress reports."""
    n = images.shape[0]
    step = max(1, n // 100)

    def feed() -> Any:
        for i in range(n):
            yield images[i]
            if progress is not None and ((i + 1) % step == 0 or i + 1 == n):
                progress("trace", i + 1, n)

    return runner.trace(feed(), labels)


def float_accuracy(checkpoint: str | os.PathLike[str], data: ImageSet, rule: ExitRule,
                   batch_size: int = 256) -> dict[str, Any]:
    """Accuracy of a checkpoint's float network on ``data``: per exit, and with ``rule`` deciding the exits.

    Needs the workstation install (torch and :mod:`edgeexit.workstation`), imported here and only here.

    Returns:
        {"checkpoint", "exit_accuracy": [E], "rule_accuracy", "rule_exit_shares": [E]}.

    Raises:
        CheckpointError: the checkpoint cannot be read.
        EdgeExitError: torch or the workstation packages are not installed (names the install command).
        DatasetError: images that do not fit the checkpoint's network.
    """
    try:
        import torch

        from edgeexit.workstation.training.checkpoint import load_checkpoint
        from edgeexit.workstation.training.data import to_tensors
    except ImportError as exc:
        raise EdgeExitError(f"--float-checkpoint needs torch and the workstation packages ({exc}); install the workstation "
                            "extras: pip install -c requirements/constraints.txt -e '.[workstation]', or leave "
                            "--float-checkpoint out") from None
    model = load_checkpoint(checkpoint)
    model.eval()
    x, y = to_tensors(data, model.spec)  # [N, C, H, W] float32, [N] int64
    logits: list[list[np.ndarray]] = [[] for _ in model.stages]
    confs: list[list[np.ndarray]] = [[] for _ in model.stages]
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            for k, out in enumerate(model(x[start:start + batch_size])):
                logits[k].append(out["logits"].float().numpy())
                if "confidence" in out:
                    confs[k].append(out["confidence"].float().reshape(-1).numpy())
    trace = Trace(logits=tuple(np.concatenate(v) for v in logits),
                  confidence=tuple(np.concatenate(c) if c else None for c in confs),
                  scores=tuple(s.head.scores for s in model.stages), labels=y.numpy().astype(np.int64))
    exit_index, prediction = rule.simulate(trace)
    e = trace.num_exits
    return {"checkpoint": os.fspath(checkpoint),
            "exit_accuracy": [trace.accuracy(t.argmax(axis=-1)) for t in trace.logits],
            "rule_accuracy": trace.accuracy(prediction),
            "rule_exit_shares": [float(v) for v in np.bincount(exit_index, minlength=e) / trace.num_inputs]}


# ------------------------------------------------------------------------------------------------ results

def _exit_rows(manifest: Manifest, timed: _Timed, lat: np.ndarray, labels: np.ndarray, active_w: float,
               measured: np.ndarray) -> list[dict[str, Any]]:
    cum_macs = manifest.cumulative_macs()
    cum_ops = np.cumsum(_energy.stages_ops_mj(manifest))
    n = labels.shape[0]
    rows = []
    for k in range(manifest.num_exits):
        m = timed.exit == k
        count = int(m.sum())
        meas = measured[m]
        meas = meas[~np.isnan(meas)]
        rows.append({"exit": k, "count": count, "share": count / n,
                     "accuracy": float(np.mean(timed.pred[m] == labels[m])) if count else None,
                     "cumulative_macs": int(cum_macs[k]), "mac_fraction": cum_macs[k] / max(manifest.full_macs, 1),
                     "latency_ms": latency_summary(lat[m]),
                     "energy_mj": {"ops": float(cum_ops[k]),
                                   "board": float(lat[m].mean() * active_w) if count else None,
                                   "measured": _mean_or_none(meas)}})
    return rows


def run_benchmark(bundle: str | os.PathLike[str] | Bundle, data: ImageSet, settings: BenchSettings = BenchSettings(),
                  *, progress: Progress | None = None, env_paths: EnvPaths = EnvPaths(),
                  dataset_spec: str | None = None) -> dict[str, Any]:
    """Benchmark ``bundle`` on the labelled set ``data`` (see the module docstring for the passes).

    Args:
        bundle: a bundle directory or a loaded :class:`~edgeexit.runtime.bundle.Bundle`.
        data: labelled images; see :func:`check_dataset` for what fits.
        settings: warm-up, repeats, threads, backend, rule, board, sweep, resize, float checkpoint.
        progress: optional callback ``progress(phase, done, total)``.
        env_paths: where the machine description is read (tests).
        dataset_spec: how the set was named on the command line, recorded in the result.

    Returns:
        A JSON-able dict with the keys in ``RESULT_FIELDS``.

    Raises:
        DatasetError: an empty set or one that does not fit the bundle.
        BundleError, InterpreterError, UsageError: from loading the bundle or the rule.
    """
    from ..runtime.runner import Runner

    settings.validate()
    loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, backend=settings.backend,
                                                                   check_tensors=False)
    manifest = loaded.manifest
    check_dataset(manifest, data, resize=settings.resize)
    notes: list[str] = []
    images = data.images
    if data.image_shape != (*manifest.preprocessing.size, manifest.preprocessing.channels):
        images = fit_images(manifest, images)
        notes.append(f"dataset images {'x'.join(map(str, data.image_shape))} were converted to "
                     f"{'x'.join(map(str, images.shape[1:]))} ({manifest.preprocessing.color_mode}) with Pillow")
    labels = data.labels
    runner = Runner(loaded, backend=settings.backend, num_threads=settings.num_threads, rule=settings.rule,
                    board=settings.board)
    rule = runner.rule
    has_mono = manifest.monolithic is not None and loaded.monolithic_file is not None
    if not has_mono:
        notes.append("the bundle has no monolithic.tflite: no monolithic baseline, speed-up or staging overhead; "
                     "re-convert with the monolithic model to get them")
    if runner.sensor is None:
        notes.append("no power sensor: energy is the operation proxy and the board-profile estimate only")
    log.info("benchmark: %d images, warm-up %d, repeat %d, rule %r", len(data), settings.warmup, settings.repeat,
             rule)
    timed = _timed_pass(runner, images, rule, settings, has_mono, progress)
    lat = np.median(timed.lat, axis=0)              # [N] ms
    forced = np.median(timed.forced, axis=0)        # [N] ms
    measured = np.nanmean(timed.measured_mj, axis=0) if np.isfinite(timed.measured_mj).any() else \
        np.full(len(data), np.nan)
    active_w = runner.board.active_w
    full = max(manifest.full_macs, 1)
    overall_lat = latency_summary(lat)
    overall_lat["robust_mean"] = _robust_mean(lat, timed.exit)
    meas_ok = measured[~np.isnan(measured)]
    overall = {"accuracy": float(np.mean(timed.pred == labels)), "avg_macs": float(timed.macs.mean()),
               "mac_fraction": float(timed.macs.mean()) / full, "full_macs": manifest.full_macs,
               "latency_ms": overall_lat,
               "energy_mj": {"ops": float(timed.ops_mj.mean()), "board": float(lat.mean() * active_w),
                             "measured": _mean_or_none(meas_ok)}}
    forced_lat = latency_summary(forced)
    mono_block: dict[str, Any] = {"available": has_mono}
    speedup: dict[str, Any] = {"mean": None, "median": None, "robust": None}
    forced_block: dict[str, Any] = {"latency_ms": forced_lat,
                                    "accuracy": float(np.mean(timed.forced_pred == labels)),
                                    "overhead_vs_monolithic": {"mean": None, "median": None}}
    if has_mono:
        mono = np.median(timed.mono, axis=0)
        mono_lat = latency_summary(mono)
        mono_lat["robust_mean"] = mono_lat["p50"]
        mono_ops = monolithic_ops_mj(manifest)
        mono_block.update({"accuracy": float(np.mean(timed.mono_pred == labels)),
                           "agreement_with_early_exit": float(np.mean(timed.mono_pred == timed.pred)),
                           "macs": manifest.monolithic.macs, "mac_fraction": manifest.monolithic.macs / full,
                           "latency_ms": mono_lat,
                           "energy_mj": {"ops": mono_ops, "board": float(mono.mean() * active_w)}})
        speedup = {"mean": mono_lat["mean"] / overall_lat["mean"], "median": mono_lat["p50"] / overall_lat["p50"],
                   "robust": mono_lat["p50"] / overall_lat["robust_mean"]}
        forced_block["overhead_vs_monolithic"] = {"mean": forced_lat["mean"] / mono_lat["mean"] - 1.0,
                                                  "median": forced_lat["p50"] / mono_lat["p50"] - 1.0}
    sweep: dict[str, Any] | None = None
    if settings.sweep:
        trace = _trace_pass(runner, images, labels, progress)
        sweep = sweep_tradeoff(trace, manifest, rule)
        sim_exit, sim_pred = rule.simulate(trace)
        sweep["run_agreement"] = float(np.mean((sim_exit == timed.exit) & (sim_pred == timed.pred)))
    float_block = None
    if settings.float_checkpoint is not None:
        if progress is not None:
            progress("float", 0, 1)
        float_block = float_accuracy(settings.float_checkpoint, ImageSet(images, labels, data.classes, data.name),
                                     rule)
    env = collect_environment(num_threads=settings.num_threads,
                              backend=f"{runner.backend.name} {runner.backend.version}", paths=env_paths)
    spec = rule.to_spec()
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "bundle": {"name": manifest.name, "path": str(loaded.path), "num_exits": manifest.num_exits,
                   "num_classes": manifest.num_classes, "full_macs": manifest.full_macs,
                   "cumulative_macs": list(manifest.cumulative_macs()),
                   "exit_rule": {"kind": manifest.exit_rule.kind, "thresholds": list(manifest.exit_rule.thresholds),
                                 "exit": manifest.exit_rule.exit}},
        "dataset": {"name": data.name, "spec": dataset_spec, "count": len(data),
                    "image_shape": list(data.image_shape), "num_classes": len(data.classes)},
        "settings": {"warmup": settings.warmup, "repeat": settings.repeat, "threads": settings.num_threads,
                     "backend": runner.backend.name, "backend_version": runner.backend.version,
                     "rule": {"kind": spec.kind, "thresholds": list(spec.thresholds), "exit": spec.exit},
                     "board": runner.board.name, "board_active_w": active_w, "board_source": runner.board.source,
                     "power_sensor": None if runner.sensor is None else runner.sensor.description,
                     "batch": 1, "latency_scope": "stage-0 input copy through the last exit decision (Runner "
                                                  "latency_ms); preprocessing excluded for both models",
                     "order": "early exit, forced-last and monolithic interleaved per input, rotating order"},
        "environment": env,
        "exits": _exit_rows(manifest, timed, lat, labels, active_w, measured),
        "overall": overall,
        "monolithic": mono_block,
        "forced_last": forced_block,
        "speedup": speedup,
        "sweep": sweep,
        "float": float_block,
        "inputs": {"label": labels.tolist(), "prediction": timed.pred.tolist(), "exit": timed.exit.tolist(),
                   "macs": timed.macs.tolist(), "latency_ms": [round(float(v), 6) for v in lat],
                   "forced_last_latency_ms": [round(float(v), 6) for v in forced],
                   "monolithic_prediction": timed.mono_pred.tolist() if has_mono else None,
                   "monolithic_latency_ms": [round(float(v), 6) for v in np.median(timed.mono, axis=0)]
                   if has_mono else None},
        "notes": notes,
        "energy_sources": {"ops": _energy.OPS_SOURCE, "board": f"mean latency x {active_w:g} W ({runner.board.title}"
                                                              f", {runner.board.source})",
                           "measured": (runner.sensor.description if runner.sensor is not None else
                                        "no power sensor found")},
    }


def result_stem(result: dict[str, Any]) -> str:
    """``<board-or-machine>_<bundle>_<YYYYmmdd-HHMMSS>`` for a result (file names without suffix)."""
    env = result.get("environment") or {}
    board = result.get("settings", {}).get("board")
    machine = env.get("board") or (board if board and board != "generic" else None) or env.get("machine") or "unknown"
    when = _dt.datetime.fromisoformat(result["created"]).strftime("%Y%m%d-%H%M%S")
    return f"{slug(machine)}_{slug(result['bundle']['name'])}_{when}"


def sweep_csv(result: dict[str, Any]) -> str:
    """The sweep table as CSV text (one row per point; latencies are estimated)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SWEEP_COLUMNS)
    for p in (result.get("sweep") or {}).get("points", []):
        row = []
        for col in SWEEP_COLUMNS:
            v = p.get(col)
            if col in ("thresholds", "exit_shares"):
                v = ";".join(f"{x:.6g}" for x in v)
            elif isinstance(v, float):
                v = f"{v:.6g}"
            row.append(v)
        writer.writerow(row)
    return buf.getvalue()


def write_results(result: dict[str, Any], out_dir: str | os.PathLike[str], plot: bool = True) -> dict[str, Any]:
    """Write ``<stem>.json``, ``<stem>.csv`` (the sweep) and ``<stem>.png`` (the trade-off plot) into ``out_dir``.

    The plot is skipped (and the returned ``"plot_skipped"`` says why) when matplotlib is missing or
    there is no sweep. The file names are also stored in ``result["files"]``.

    Returns:
        {"json": path, "csv": path or None, "png": path or None, "plot_skipped": reason or None}.

    Raises:
        UsageError: the output directory cannot be created or written.
    """
    from .plot import PlotUnavailable, plot_tradeoff

    out = Path(os.fspath(out_dir))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out} ({exc.strerror}); pass a writable --out") from None
    stem = result_stem(result)
    files: dict[str, Any] = {"json": str(out / f"{stem}.json"), "csv": None, "png": None, "plot_skipped": None}
    try:
        if result.get("sweep"):
            (out / f"{stem}.csv").write_text(sweep_csv(result))
            files["csv"] = str(out / f"{stem}.csv")
            if plot:
                try:
                    files["png"] = str(plot_tradeoff(result, out / f"{stem}.png"))
                except PlotUnavailable as exc:
                    files["plot_skipped"] = str(exc)
            else:
                files["plot_skipped"] = "plot not requested"
        else:
            files["plot_skipped"] = "no sweep (--no-sweep)"
        result["files"] = {k: (os.path.basename(v) if k in ("json", "csv", "png") and v else v)
                           for k, v in files.items()}
        Path(files["json"]).write_text(json.dumps(result, indent=1) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write results into {out} ({exc.strerror}); pass a writable --out") from None
    return files


# ------------------------------------------------------------------------------------------------ report

def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def format_report(result: dict[str, Any]) -> str:
    """A readable report: per-exit table, overall summary against the monolithic model, and the sweep table."""
    b, d, s, env = result["bundle"], result["dataset"], result["settings"], result["environment"]
    lines = [f"bundle {b['name']} ({b['num_exits']} exits, full network {b['full_macs']:,} MACs) on {d['name']} "
             f"({d['count']} images)",
             f"machine: {env.get('machine')} | {env.get('os')} | python {env.get('python')} | "
             f"{s['backend']} {s['backend_version']} | {s['threads']} thread(s) | governor {env.get('governor') or 'n/a'} | "
             f"board profile {s['board']}",
             f"rule: {s['rule']['kind']} {s['rule']['thresholds'] or ''}{'' if s['rule']['exit'] is None else s['rule']['exit']}"
             f" | warm-up {s['warmup']} | repeat {s['repeat']} | batch 1", ""]
    head = (f"{'exit':>4} {'share':>8} {'accuracy':>9} {'cum. MACs':>12} {'MAC %':>7} {'p50 ms':>8} {'p95 ms':>8} "
            f"{'p99 ms':>8} {'ops mJ':>9} {'board mJ':>9}")
    lines += [head, "-" * len(head)]
    for r in result["exits"]:
        lat, en = r["latency_ms"], r["energy_mj"]
        lines.append(f"{r['exit']:>4} {_pct(r['share']):>8} {_pct(r['accuracy']):>9} {r['cumulative_macs']:>12,} "
                     f"{100 * r['mac_fraction']:>6.1f}% {_ms(lat['p50']):>8} {_ms(lat['p95']):>8} {_ms(lat['p99']):>8} "
                     f"{en['ops']:>9.2e} {'-' if en['board'] is None else format(en['board'], '9.4f'):>9}")
    o, m, f, sp = result["overall"], result["monolithic"], result["forced_last"], result["speedup"]
    lines += ["", f"{'':22}{'early exit':>14}{'monolithic':>14}"]
    mlat = m.get("latency_ms") or {}
    lines.append(f"{'accuracy':22}{_pct(o['accuracy']):>14}{_pct(m.get('accuracy')):>14}")
    lines.append(f"{'MACs / full network':22}{_pct(o['mac_fraction']):>14}{_pct(m.get('mac_fraction')):>14}")
    lines.append(f"{'mean latency ms':22}{_ms(o['latency_ms']['mean']):>14}{_ms(mlat.get('mean')):>14}")
    lines.append(f"{'median latency ms':22}{_ms(o['latency_ms']['p50']):>14}{_ms(mlat.get('p50')):>14}")
    lines.append(f"{'mean of exit medians':22}{_ms(o['latency_ms']['robust_mean']):>14}"
                 f"{_ms(mlat.get('robust_mean')):>14}")
    lines.append(f"{'p99 latency ms':22}{_ms(o['latency_ms']['p99']):>14}{_ms(mlat.get('p99')):>14}")
    men = m.get("energy_mj") or {}
    lines.append(f"{'energy ops proxy mJ':22}{o['energy_mj']['ops']:>14.3e}"
                 f"{'-' if men.get('ops') is None else format(men['ops'], '.3e'):>14}")
    lines.append(f"{'energy board est. mJ':22}{o['energy_mj']['board']:>14.4f}"
                 f"{'-' if men.get('board') is None else format(men['board'], '.4f'):>14}")
    if o["energy_mj"]["measured"] is not None:
        lines.append(f"{'energy measured mJ':22}{o['energy_mj']['measured']:>14.4f}")
    if sp["mean"] is not None:
        lines.append(f"speed-up vs monolithic: {sp['mean']:.2f}x (mean), {sp['median']:.2f}x (median), "
                     f"{sp['robust']:.2f}x (mean of exit medians)")
        ov = f["overhead_vs_monolithic"]
        lines.append(f"forced to the last exit: median {_ms(f['latency_ms']['p50'])} ms vs monolithic "
                     f"{_ms(mlat.get('p50'))} ms: staging overhead {100 * ov['median']:+.1f}% (median), "
                     f"{100 * ov['mean']:+.1f}% (mean)")
    if result.get("float"):
        fl = result["float"]
        lines.append(f"float network (checkpoint): {_pct(fl['rule_accuracy'])} with the same rule, per exit "
                     + ", ".join(_pct(a) for a in fl["exit_accuracy"]))
    sw = result.get("sweep")
    if sw:
        lines += ["", f"threshold sweep ({sw['rule']}, one trace; latency ESTIMATED from per-stage latencies; "
                      f"run agreement {_pct(sw.get('run_agreement'))})"]
        head = f"{'point':34} {'accuracy':>9} {'MAC %':>7} {'est. ms':>9}  exit shares"
        lines += [head, "-" * (len(head) + 12)]
        for p in sw["points"]:
            shares = " ".join(f"{100 * v:.0f}" for v in p["exit_shares"])
            lines.append(f"{p['name'][:34]:34} {_pct(p['accuracy']):>9} {100 * p['mac_fraction']:>6.1f}% "
                         f"{p['est_latency_ms']:>9.4f}  {shares}")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
