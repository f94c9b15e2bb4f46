"""Benchmark a bundle on a labelled set, against its monolithic int8 model measured in the same run.

Latency is the whole public call (see :mod:`edgeexit.bench.timing`): image as given -> result, preprocessing
included, timed from outside the call by one harness for every variant. One benchmark
(:func:`run_benchmark`):

1. **Timed pass** (``repeat`` times, after a warm-up), every input through, in rotating order per input:
   the early-exit call with the chosen rule; the monolithic call; each stored operating point; and, per rule
   kind in use, the call forced to leave at each exit (the exit costs; the one forced to the last exit with
   the chosen rule is "forced to the last exit": the real rule's decisions at every exit, never stopping).
   Each input's latency is its median over the repeats; tables give mean, p50, p90, p99.
2. **Estimates checked**: every timed rule's mean latency is estimated from the exit costs
   (``sum_k share_k * cost_k``) and compared with its measured mean.
3. **Overhead**: each stage's bare invoke in a tight loop; the call's time outside the invokes of the stages
   that ran is the measured mean minus the mean sum of those invokes.
4. **Throughput** at batch sizes (default 1, 8, 32): ``classify`` / ``run_monolithic`` at 1,
   ``classify_batch`` / ``run_monolithic_batch`` above, chunks interleaved.
5. **Trace pass** and threshold sweep (:mod:`edgeexit.bench.threshold_sweep`), estimated latencies from the exit costs.
6. Optionally, the float network of a checkpoint on the same images (workstation only, torch imported lazily).

The result is one JSON-able dict (``RESULT_FIELDS``); :func:`edgeexit.bench.report.write_results` stores it.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .bench_energy import EnergySettings, energy_section, measure_bench
from ..errors import DatasetError, EdgeExitError, UsageError
from ..progress import Progress
from ..runtime.bundle import Bundle, load_bundle
from ..runtime.manifest import ExitRuleSpec, Manifest
from ..runtime.rules import ExitRule
from ..runtime.stats import DRIFT_ALPHA, exit_share_test, reference_shares
from ..runtime.trace import Trace
from .compare import bundle_hash
from ..datasets import ImageSet, check_dataset
from .envinfo import EnvPaths, collect_environment
from .threshold_sweep import grid_kind, named_rules, rule_text, sweep_tradeoff
from .timing import (COST_KINDS, Variant, backend_label, cost_table, forced_variants, latency_summary, per_input,
                     rule_setter, time_calls)

log = logging.getLogger(__name__)

SCHEMA = "edgeexit-bench"
SCHEMA_VERSION = 2
#: Top-level keys of every result.
RESULT_FIELDS = ("schema", "schema_version", "created", "bundle", "dataset", "settings", "environment",
                 "latency_definition", "exits", "overall", "monolithic", "forced_last", "speedup", "points",
                 "exit_costs", "overhead", "throughput", "sweep", "float", "inputs", "notes", "energy")
LATENCY_DEFINITION = ("whole call: the public call (Runner.classify / Runner.run_monolithic) timed from outside, "
                      "from the image as given (a uint8 array) to the returned result, preprocessing included; "
                      "each input's latency is its median over the repeats")
EARLY, MONO, OFFLOAD = "early exit", "monolithic", "offload"


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
        batch_sizes: batch sizes of the throughput comparison (1 = the single-image calls).
        points: also time every stored operating point (to check its estimated latency).
        energy: measure energy per phase with a power sensor or meter trace (None: estimates only).
        offload: the Runner's offload arguments (``offload``, ``offload_after``, ...; see
            :class:`~edgeexit.runtime.runner.Runner`): also time the rule with inputs undecided after stage K sent to
            that server (the policy on), interleaved with the local calls; the result's ``offload`` section.
    """

    warmup: int = 20
    repeat: int = 3
    num_threads: int = 1
    backend: str = "auto"
    rule: ExitRule | ExitRuleSpec | str | None = None
    board: str | None = None
    sweep: bool = True
    resize: bool = False
    float_checkpoint: str | None = None
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    points: bool = True
    energy: EnergySettings | None = None
    offload: Mapping[str, Any] | None = None

    def validate(self) -> None:
        """Raise UsageError for values that cannot run."""
        for name in ("warmup", "repeat", "num_threads"):
            value = getattr(self, name)
            low = 0 if name == "warmup" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
        if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 4096
                                       for b in self.batch_sizes):
            raise UsageError(f"batch sizes must be integers 1..4096, got {list(self.batch_sizes)!r}")
        if self.energy is not None:
            self.energy.validate()


# ------------------------------------------------------------------------------------------- dataset checks

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

        from edgeexit.workstation.catalog.checkpoint import load_checkpoint
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



# --------------------------------------------------------------------------------------------- the passes

def _invoke_ms(invoke: Any, reps: int = 3000) -> float:
    """A bare invoke's time (ms): the median of ``reps`` invokes timed one by one, back to back (hot caches:
    a lower bound of what it costs inside a call)."""
    clock = time.perf_counter_ns
    for _ in range(reps // 10):
        invoke()
    ns = np.empty(reps, dtype=np.int64)
    for i in range(reps):
        t = clock()
        invoke()
        ns[i] = clock() - t
    return float(np.median(ns)) * 1e-6


def _throughput(runner: Any, images: np.ndarray, batch: int, has_mono: bool,
                report: Any = None) -> dict[str, Any]:
    """Images per second of the early-exit and the monolithic model at one batch size, chunks interleaved;
    ``report(images)`` after each chunk (progress)."""
    n = images.shape[0] - images.shape[0] % batch if images.shape[0] >= batch else 0
    if n == 0:
        return {"batch": batch, "images": 0, "early_exit_ips": None, "monolithic_ips": None, "ratio": None}
    clock = time.perf_counter_ns
    ee_ns = mono_ns = 0
    if batch == 1:
        calls = (runner.classify, runner.run_monolithic)
        chunks = [images[i] for i in range(n)]
    else:
        calls = (runner.classify_batch, runner.run_monolithic_batch)
        chunks = [images[i:i + batch] for i in range(0, n, batch)]
    for j, chunk in enumerate(chunks):
        order = (0, 1) if j % 2 == 0 else (1, 0)
        for which in order:
            if which == 1 and not has_mono:
                continue
            t = clock()
            calls[which](chunk)
            dt = clock() - t
            if which == 0:
                ee_ns += dt
            else:
                mono_ns += dt
            if report is not None:
                report(len(chunk) if batch > 1 else 1)
    ee = n / (ee_ns * 1e-9)
    mono = n / (mono_ns * 1e-9) if has_mono else None
    return {"batch": batch, "images": n, "early_exit_ips": ee, "monolithic_ips": mono,
            "ratio": None if mono is None else ee / mono}


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


def _exit_rows(manifest: Manifest, pred: np.ndarray, exits: np.ndarray, lat: np.ndarray,
               labels: np.ndarray) -> list[dict[str, Any]]:
    cum_macs = manifest.cumulative_macs()
    n = labels.shape[0]
    rows = []
    for k in range(manifest.num_exits):
        m = exits == k
        count = int(m.sum())
        rows.append({"exit": k, "count": count, "share": count / n,
                     "accuracy": float(np.mean(pred[m] == labels[m])) if count else None,
                     "cumulative_macs": int(cum_macs[k]), "mac_fraction": cum_macs[k] / max(manifest.full_macs, 1),
                     "latency_ms": latency_summary(lat[m])})
    return rows


def run_benchmark(bundle: str | os.PathLike[str] | Bundle, data: ImageSet, settings: BenchSettings = BenchSettings(),
                  *, progress: Progress | None = None, env_paths: EnvPaths = EnvPaths(),
                  dataset_spec: str | None = None) -> dict[str, Any]:
    """Benchmark ``bundle`` on the labelled set ``data`` (see the module docstring for the passes).

    Args:
        bundle: a bundle directory or a loaded :class:`~edgeexit.runtime.bundle.Bundle`.
        data: labelled images; see :func:`edgeexit.datasets.check_dataset` for what fits.
        settings: warm-up, repeats, threads, backend, rule, board, sweep, resize, float checkpoint, batches.
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
    e, last = manifest.num_exits, manifest.num_exits - 1
    has_mono = runner.has_monolithic
    if not has_mono:
        notes.append("the bundle has no monolithic.tflite: no monolithic baseline, speed-up or staging overhead; "
                     "re-convert with the monolithic model to get them")

    # ---- what to time: the rule, the baseline, the stored points, and per rule kind an input at each exit
    points = [(name, r) for name, source, r in named_rules(manifest, rule) if source == "operating_point"]
    timed_points = [(name, r) for name, r in points if r.to_spec() != rule.to_spec()] if settings.points else []
    kinds = [k for k in COST_KINDS
             if k == "fixed" or k in {rule.kind, manifest.exit_rule.kind, *(r.kind for _, r in points)}
             or (settings.sweep and k == grid_kind(manifest, rule))]
    stand_ins = [rule, *(r for _, r in points)]
    variants = [Variant(EARLY, runner.classify, rule_setter(runner, rule))]
    board = None
    if settings.offload:
        board = Runner(loaded, backend=settings.backend, num_threads=settings.num_threads, rule=rule,
                       board=settings.board, power_sensor=None, **settings.offload)
        variants.append(Variant(OFFLOAD, board.classify))
    if has_mono:
        variants.append(Variant(MONO, runner.run_monolithic))
    variants += [Variant(name, runner.classify, rule_setter(runner, r)) for name, r in timed_points]
    forced = [v for kind in kinds for v in forced_variants(runner, kind, stand_ins)]
    variants += forced
    forced_last = f"{rule.kind if rule.kind in COST_KINDS else 'fixed'}@{last}"
    keep = [EARLY, MONO, forced_last, OFFLOAD, *(name for name, _ in timed_points)]
    log.info("benchmark: %d images, %d variants, warm-up %d, repeat %d, rule %r", len(data), len(variants),
             settings.warmup, settings.repeat, rule)
    ms, kept = time_calls(variants, list(images), repeat=settings.repeat, warmup=settings.warmup, keep=keep,
                          progress=progress)
    runner.set_rule(rule)
    at = {v.name: j for j, v in enumerate(variants)}
    env = collect_environment(num_threads=settings.num_threads,  # right after the timed pass: its temperatures
                              backend=f"{runner.backend.name} {runner.backend.version}", paths=env_paths)
    costs = cost_table(ms, variants, kinds, e, settings.repeat, env.get("machine") or "", backend=backend_label(runner))

    # ---- the early-exit rule against the baseline
    lat = per_input(ms[at[EARLY]])                                             # [N] ms
    results = kept[EARLY]
    pred = np.array([r.label for r in results], dtype=np.int64)
    exits = np.array([r.stages_run - 1 for r in results], dtype=np.int64)   # where each input left (what it paid)
    macs = np.asarray(manifest.cumulative_macs(), dtype=np.int64)[exits]
    full = max(manifest.full_macs, 1)
    overall = {"accuracy": float(np.mean(pred == labels)), "avg_macs": float(macs.mean()),
               "mac_fraction": float(macs.mean()) / full, "full_macs": manifest.full_macs,
               "latency_ms": latency_summary(lat),
               "estimated_latency_ms": costs.estimate_ms(rule.kind, exits),
               "drift": _drift(manifest, rule, exits)}
    forced_lat = per_input(ms[at[forced_last]])
    forced_pred = np.array([r.label for r in kept[forced_last]], dtype=np.int64)
    forced_block: dict[str, Any] = {"rule": rule_text(rule), "latency_ms": latency_summary(forced_lat),
                                    "accuracy": float(np.mean(forced_pred == labels)),
                                    "vs_monolithic": {"mean": None, "p50": None, "p90": None}}
    mono_block: dict[str, Any] = {"available": has_mono}
    speedup: dict[str, Any] = {"mean": None, "p50": None, "p90": None}
    mono_lat = mono_pred = None
    if has_mono:
        mono_lat = per_input(ms[at[MONO]])
        mono_pred = np.array([r.label for r in kept[MONO]], dtype=np.int64)
        ml = latency_summary(mono_lat)
        mono_block.update({"accuracy": float(np.mean(mono_pred == labels)),
                           "agreement_with_early_exit": float(np.mean(mono_pred == pred)),
                           "macs": manifest.monolithic.macs, "mac_fraction": manifest.monolithic.macs / full,
                           "latency_ms": ml})
        speedup = {s: ml[s] / overall["latency_ms"][s] for s in ("mean", "p50", "p90")}
        forced_block["vs_monolithic"] = {s: forced_block["latency_ms"][s] / ml[s] for s in ("mean", "p50", "p90")}

    # ---- estimated vs measured mean latency of every timed rule
    point_rows = [_point_row("run", rule, lat, exits, pred, labels, costs)]
    for name, r in timed_points:
        res = kept[name]
        point_rows.append(_point_row(name, r, per_input(ms[at[name]]),
                                     np.array([x.stages_run - 1 for x in res], dtype=np.int64),
                                     np.array([x.label for x in res], dtype=np.int64), labels, costs))

    # ---- time outside the invokes
    invokers = runner.stage_invokers()
    invoke_ms = []
    for k, f in enumerate(invokers):  # 3000 bare invokes per stage: seconds on a slow board
        invoke_ms.append(_invoke_ms(f))
        if progress is not None:
            progress("overhead", k + 1, len(invokers) + int(has_mono))
    cum_invoke = np.cumsum(invoke_ms)
    overhead = {"stage_invoke_ms": invoke_ms,
                "early_exit_invokes_ms": float(cum_invoke[exits].mean()),
                "early_exit_outside_invokes_us": 1e3 * float(lat.mean() - cum_invoke[exits].mean()),
                "note": "bare invokes timed in tight loops (hot caches, a lower bound), so the time outside them is "
                        "an upper bound"}
    if has_mono:
        mono_invoke = _invoke_ms(runner._monolithic()[0])
        if progress is not None:
            progress("overhead", len(invokers) + 1, len(invokers) + 1)
        overhead.update({"monolithic_invoke_ms": mono_invoke,
                         "monolithic_outside_invoke_us": 1e3 * float(mono_lat.mean() - mono_invoke)})

    # ---- throughput at several batch sizes
    calls = (2 if has_mono else 1)
    planned = sum(calls * (images.shape[0] - images.shape[0] % b) for b in settings.batch_sizes)
    done = [0]

    def report(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress("throughput", min(done[0], planned), planned)

    throughput = [_throughput(runner, images, b, has_mono, report) for b in settings.batch_sizes]

    sweep: dict[str, Any] | None = None
    if settings.sweep:
        trace = _trace_pass(runner, images, labels, progress)
        sweep = sweep_tradeoff(trace, manifest, costs, rule, board=runner.board)
        sim_exit, sim_pred = rule.simulate(trace)
        sweep["run_agreement"] = float(np.mean((sim_exit == exits) & (sim_pred == pred)))
    float_block = None
    if settings.float_checkpoint is not None:
        if progress is not None:
            progress("float", 0, 1)
        float_block = float_accuracy(settings.float_checkpoint, ImageSet(images, labels, data.classes, data.name),
                                     rule)
    measurement = None if settings.energy is None else measure_bench(runner, images, settings.energy,
                                                                      with_monolithic=has_mono, progress=progress)
    spec = rule.to_spec()
    result = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "bundle": {"name": manifest.name, "path": str(loaded.path), "sha256": bundle_hash(manifest),
                   "num_exits": manifest.num_exits,
                   "num_classes": manifest.num_classes, "full_macs": manifest.full_macs,
                   "cumulative_macs": list(manifest.cumulative_macs()),
                   "exit_rule": {"kind": manifest.exit_rule.kind, "thresholds": list(manifest.exit_rule.thresholds),
                                 "exit": manifest.exit_rule.exit},
                   "verification": manifest.verification_verdict()},
        "dataset": {"name": data.name, "spec": dataset_spec, "count": len(data),
                    "image_shape": list(data.image_shape), "num_classes": len(data.classes)},
        "settings": {"warmup": settings.warmup, "repeat": settings.repeat, "threads": settings.num_threads,
                     "backend": runner.backend.name, "backend_version": runner.backend.version,
                     "rule": spec.to_dict(),
                     "board": runner.board.name,
                     "batch": 1, "batch_sizes": list(settings.batch_sizes),
                     "variants": [v.name for v in variants],
                     "order": "every variant once per input, interleaved in rotating order"},
        "environment": env,
        "latency_definition": LATENCY_DEFINITION,
        "exits": _exit_rows(manifest, pred, exits, lat, labels),
        "overall": overall,
        "monolithic": mono_block,
        "forced_last": forced_block,
        "speedup": speedup,
        "points": point_rows,
        "exit_costs": costs.to_dict(),
        "overhead": overhead,
        "throughput": throughput,
        "sweep": sweep,
        "float": float_block,
        "inputs": {"label": labels.tolist(), "prediction": pred.tolist(), "exit": exits.tolist(),
                   "macs": macs.tolist(), "latency_ms": [round(float(v), 6) for v in lat],
                   "forced_last_latency_ms": [round(float(v), 6) for v in forced_lat],
                   "monolithic_prediction": None if mono_lat is None else mono_pred.tolist(),
                   "monolithic_latency_ms": None if mono_lat is None else [round(float(v), 6) for v in mono_lat]},
        "notes": notes,
    }
    if board is not None:
        result["offload"] = _offload_block(board, kept[OFFLOAD], per_input(ms[at[OFFLOAD]]), lat, pred, exits,
                                           labels)
    result["energy"] = energy_section(result, manifest, runner.board, measurement)
    return result


def _offload_block(board: Any, results: list[Any], lat: np.ndarray, local_lat: np.ndarray, pred: np.ndarray,
                   exits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The offloaded run against the local one: whole-call latency, share offloaded, agreement, why inputs that
    were to go finished locally (first timed pass's answers; latencies are each input's median over repeats)."""
    link = board.offload
    sent = np.array([r.offloaded for r in results], dtype=bool)
    o_pred = np.array([r.label for r in results], dtype=np.int64)
    o_exit = np.array([r.exit_index for r in results], dtype=np.int64)
    reasons: dict[str, int] = {}
    for r in results:
        if r.offload_error:
            key = r.offload_error.split(" for ", 1)[0] if r.offload_error.startswith("offload paused") else \
                r.offload_error
            reasons[key] = reasons.get(key, 0) + 1
    summary, local = latency_summary(lat), latency_summary(local_lat)
    return {"url": f"{'https' if link.client.tls else 'http'}://{link.client.host}:{link.client.port}",
            "after": link.after, "timeout_ms": 1000 * link.client.timeout_s,
            "margin": link.policy.margin, "always": link.policy.always,
            "latency_ms": summary, "local_latency_ms": local,
            "vs_local": {s: (summary[s] / local[s]) if local[s] else None for s in ("p50", "p90", "p99", "mean")},
            "share_offloaded": float(sent.mean()) if sent.size else 0.0,
            "undecided_after_stage": float(np.mean(exits > link.after)) if exits.size else 0.0,
            "round_trip_ms": latency_summary(np.array([r.round_trip_ms for r in results if r.offloaded])),
            "accuracy": float(np.mean(o_pred == labels)),
            "agreement_with_local": float(np.mean((o_pred == pred) & (o_exit == exits))),
            "requests": {"sent": link.sent, "answered": link.answered, "failed": link.failures},
            "fallback_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:10]),
            "policy": link.policy.to_dict()}


def _drift(manifest: Manifest, rule: ExitRule, exits: np.ndarray) -> dict[str, Any] | None:
    """The run's exit shares against the rule's tuned shares (when the rule is a stored operating point): does
    this set look like the tuning data to the rule? (See :mod:`edgeexit.runtime.stats`.)"""
    spec = rule.to_spec()
    ref = reference_shares(manifest.operating_points, spec.kind, spec.thresholds)
    if ref is None or len(ref.shares) != manifest.num_exits:
        return None
    counts = np.bincount(exits, minlength=manifest.num_exits).tolist()
    test = exit_share_test(counts, ref.shares, ref.n)
    out = {"reference": ref.source, "tuned_shares": list(ref.shares), "n_tuned": ref.n, "observed": counts,
           **{k: v for k, v in test.items() if k != "n"}, "alpha": DRIFT_ALPHA, "drift": test["p_value"] < DRIFT_ALPHA}
    if out["drift"]:
        log.warning("benchmark: the exit shares %s differ from those the rule was tuned to (%s, %s) beyond chance "
                    "(p = %.2g): this set does not look like the tuning data to the rule; re-tune on data like it",
                    [round(c / max(len(exits), 1), 4) for c in counts], [round(f, 4) for f in ref.shares],
                    ref.source, test["p_value"])
    return out


def _point_row(name: str, rule: ExitRule, lat: np.ndarray, exits: np.ndarray, pred: np.ndarray, labels: np.ndarray,
               costs: Any) -> dict[str, Any]:
    est = costs.estimate_ms(rule.kind, exits)
    measured = float(lat.mean())
    return {"name": name, "rule": rule_text(rule), "accuracy": float(np.mean(pred == labels)),
            "measured_mean_ms": measured, "estimated_mean_ms": est, "estimate_error": est / measured - 1.0,
            "measured_p50_ms": float(np.median(lat)),
            "exit_shares": [float(v) for v in np.bincount(exits, minlength=len(costs.for_rule(rule.kind))) / len(exits)]}
