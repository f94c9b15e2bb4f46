"""``edgeexit bench``: benchmark a bundle on a labelled set against its monolithic int8 model."""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click

from .device import FALLBACK, _build_rule, _parse_thresholds, offload_kwargs, offload_options
from ..energy.boards import BOARDS
from ..errors import UsageError, printable
from .options import Choice
from ..progress import StderrProgress
from ..runtime.interpreter import BACKENDS, MAX_THREADS
from ..runtime.manifest import EXIT_RULES


#: How the benchmark's phases are named on stderr.
PHASES = {"timed": "timed pass (whole calls: early exit, monolithic, stored points, forced to each exit)",
          "overhead": "bare invokes (3000 per model)",
          "throughput": "throughput at batch sizes (images through the early-exit and monolithic calls)",
          "trace": "trace pass (every stage)", "float": "float network",
          "energy": "energy phases (idle, each exit, early exit, monolithic)"}
#: What a phase counts, where it is not inputs.
UNITS = {"timed": "inputs x repeats", "overhead": "models (stages and monolithic)", "throughput": "images"}


def _check_writable_dir(path: str, option: str) -> None:
    """UsageError unless ``path`` is a directory this user can write, or one that can be created there (its
    nearest existing parent is a writable directory); checked before the run, nothing is created here."""
    p = Path(path).absolute()
    existing = next((q for q in (p, *p.parents) if q.exists()), None)
    if existing is None or not existing.is_dir():
        raise UsageError(f"{option} {path}: {existing or p} is not a directory; pass a writable {option}, or --no-save")
    try:  # a file made and removed at once: the real test (read-only mounts, /proc, root's access() answers)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write into {existing} ({exc.strerror}); pass a writable {option}, "
                         "or --no-save") from None


def _check_float_checkpoint(path: str) -> None:
    """--float-checkpoint needs torch and a readable file: refused before the benchmark starts."""
    if importlib.util.find_spec("torch") is None:
        raise UsageError("--float-checkpoint needs torch (the workstation install), which is not installed here; "
                         "drop --float-checkpoint, or run the benchmark with the workstation install")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise UsageError(f"--float-checkpoint {path}: no such readable file")


def offload_report(o: dict[str, Any]) -> str:
    """The offload section of a bench result as a few lines of text."""
    def ms(summary: dict[str, Any]) -> str:
        return " / ".join("-" if summary[k] is None else f"{summary[k]:.3f}" for k in ("p50", "p90", "p99"))

    lines = [f"offload to {o['url']} after stage {o['after']} (policy margin {o['margin']:.0%}"
             f"{', always' if o['always'] else ''}; deadline {o['timeout_ms']:.0f} ms)",
             f"  whole call p50 / p90 / p99 ms: local {ms(o['local_latency_ms'])}, with offload {ms(o['latency_ms'])}",
             f"  offloaded {o['share_offloaded']:.1%} of inputs ({o['undecided_after_stage']:.1%} undecided after "
             f"stage {o['after']}); round trip p50 {ms(o['round_trip_ms']).split(' / ')[0]} ms; same answers as local: "
             f"{o['agreement_with_local']:.1%}; requests {o['requests']['sent']} sent, "
             f"{o['requests']['failed']} failed"]
    lines += [f"  finished locally {n}x: {printable(reason, 200)}" for reason, n in o["fallback_reasons"].items()]
    return "\n".join(lines)


def _parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers, e.g. 1,8,32",
                                 param_hint="--batch-sizes") from None
    if not sizes or any(not 1 <= b <= 4096 for b in sizes):
        raise click.BadParameter(f"{text!r}: give batch sizes between 1 and 4096, e.g. 1,8,32",
                                 param_hint="--batch-sizes")
    return sizes


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--data", "data_spec", required=True, metavar="SPEC",
              help="Labelled set: mnist, fashion-mnist, cifar10:DIR, svhn:DIR, a .npz file or an image folder.")
@click.option("--split", type=Choice(["test", "train"]), default="test", show_default=True,
              help="Split of a named dataset.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N images.")
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True,
              help="Warm-up inputs (per model) before timing.")
@click.option("--repeat", type=click.IntRange(min=1, max=1000), default=3, show_default=True,
              help="Timed passes; each input's latency is its median over them.")
@click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=1, show_default=True,
              help="Interpreter threads.")
@click.option("--backend", type=Choice(["auto", *BACKENDS]), default="auto", show_default=True,
              help="TFLite interpreter package.")
@click.option("--rule", default=None, metavar="KIND|POINT",
              help=f"Exit rule kind ({', '.join(EXIT_RULES)}) or an operating point stored in the bundle "
                   "(default: the bundle's own rule).")
@click.option("--thresholds", default=None, metavar="T0,T1,...", help="One threshold per exit except the last.")
@click.option("--exit", "exit_index", type=int, default=None, help="Exit index for --rule fixed.")
@FALLBACK
@click.option("--board", type=Choice(["auto", *BOARDS]), default="auto", show_default=True,
              help="Board power profile for the energy estimate.")
@click.option("--sweep/--no-sweep", default=True, show_default=True,
              help="Trace every stage once per input and sweep the exit thresholds (accuracy vs MACs/latency).")
@click.option("--resize", is_flag=True,
              help="Convert images of another size or colour mode with Pillow instead of refusing them.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/bench", show_default=True,
              help="Directory for <board>_<bundle>_<time>.json/.csv/.png.")
@click.option("--no-save", is_flag=True, help="Do not write result files.")
@click.option("--no-plot", is_flag=True, help="Do not draw the PNG plot.")
@click.option("--json", "as_json", is_flag=True, help="Print the result JSON on stdout instead of the tables.")
@click.option("--float-checkpoint", default=None, type=click.Path(dir_okay=False), metavar="CKPT",
              help="Also evaluate this checkpoint's float network on the same images (needs torch).")
@click.option("--batch-sizes", default="1,8,32", show_default=True, metavar="B1,B2,...",
              help="Batch sizes of the throughput comparison (1 = single-image calls).")
@click.option("--points/--no-points", default=True, show_default=True,
              help="Also time every stored operating point (estimated vs measured latency).")
@click.option("--power-sensor", type=Choice(["auto", "none"]), default="auto", show_default=True,
              help="Measure energy with the first hwmon power sensor (INA2xx) or the Raspberry Pi 5 PMIC (auto), "
                   "or not at all (none).")
@click.option("--power-trace", type=click.Path(dir_okay=False), default=None, metavar="CSV",
              help="Measure energy from a CSV trace an external meter logs during the run (time and watts, or "
                   "volts and amps, columns); read after the phases, joined by timestamps.")
@click.option("--energy-reps", type=click.IntRange(min=1), default=5, show_default=True,
              help="Repeats of the energy phases (the 95% interval needs 2 or more).")
@click.option("--energy-phase-s", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="Seconds per energy phase (idle, each exit, early exit, monolithic).")
@click.option("--store-energy", is_flag=True,
              help="Store the measured per-exit energy for this board in the bundle's manifest (Runner, tune and "
                   "the controller then use it).")
@offload_options
@click.pass_context
def bench(ctx: click.Context, bundle: str, data_spec: str, split: str, limit: int | None, warmup: int, repeat: int,
          threads: int, backend: str, rule: str | None, thresholds: str | None, exit_index: int | None,
          fallback: str | None, board: str,
          sweep: bool, resize: bool, out_dir: str, no_save: bool, no_plot: bool, as_json: bool,
          float_checkpoint: str | None, batch_sizes: str, points: bool, power_sensor: str, power_trace: str | None,
          energy_reps: int, energy_phase_s: float, store_energy: bool, **offload: Any) -> None:
    """Benchmark BUNDLE on a labelled set: per-exit and overall accuracy, MACs, latency and energy against
    the monolithic int8 model measured in the same run, plus an accuracy/cost threshold sweep."""
    from ..bench.bench import BenchSettings, run_benchmark
    from ..bench.report import format_report, write_results
    from ..runtime.bundle import load_bundle
    from ..datasets import check_dataset, load_dataset
    from ..bench.bench_energy import EnergySettings, check_measurement, store_measured

    quiet = bool((ctx.find_root().obj or {}).get("quiet"))
    # every option is checked here, before the data is read and anything is timed
    sizes = _parse_batch_sizes(batch_sizes)
    parsed_thresholds = _parse_thresholds(thresholds)
    energy = EnergySettings(sensor=power_sensor, power_trace=power_trace, reps=energy_reps, phase_s=energy_phase_s,
                            idle_s=energy_phase_s)
    energy.validate()
    if not no_save:
        _check_writable_dir(out_dir, "--out")
    if float_checkpoint is not None:
        _check_float_checkpoint(float_checkpoint)
    loaded = load_bundle(bundle, backend=backend, check_tensors=False)
    if store_energy and not os.access(loaded.path, os.W_OK):
        raise UsageError(f"--store-energy writes into the bundle, but {loaded.path} is not writable by this user; "
                         "run as the bundle's owner or drop --store-energy")
    unverified = loaded.manifest.unverified_reason()
    if unverified is not None:  # measured anyway; the result file records the verdict (names come from the manifest)
        click.echo(printable(f"warning: bundle {bundle}: {unverified}; its figures are not those of a verified "
                             "conversion", 1000), err=True)
    chosen = _build_rule(loaded, rule, parsed_thresholds, exit_index, fallback)
    offload_settings = offload_kwargs(loaded, chosen, **offload) or None
    data = load_dataset(data_spec, split=split, limit=limit)
    settings = BenchSettings(warmup=warmup, repeat=repeat, num_threads=threads, backend=backend, rule=chosen,
                             board=board, sweep=sweep, resize=resize, float_checkpoint=float_checkpoint,
                             batch_sizes=sizes, points=points, energy=energy, offload=offload_settings)
    settings.validate()
    check_dataset(loaded.manifest, data, resize=resize)
    progress = StderrProgress(not quiet, PHASES, units=UNITS)
    result: dict[str, Any] = run_benchmark(loaded, data, settings, progress=progress,
                                           dataset_spec=data_spec)
    files = None
    if not no_save:
        files = write_results(result, out_dir, plot=not no_plot)
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        click.echo(format_report(result))
        if "offload" in result:
            click.echo(offload_report(result["offload"]))
    if files is not None and not quiet:
        written = [files[k] for k in ("json", "csv", "png") if files[k]]
        click.echo(f"wrote {', '.join(written)}", err=True)
        if files["plot_skipped"] and not no_plot:
            click.echo(f"plot skipped: {files['plot_skipped']}", err=True)
    check_measurement(result)
    if store_energy:
        click.echo(f"stored measured energy for board {store_measured(loaded.path, result)} in {loaded.path}",
                   err=True)
