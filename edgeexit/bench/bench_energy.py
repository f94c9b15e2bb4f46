"""Energy in a benchmark: measure the phases with the benchmark's Runner, and the ``energy`` section of a result.

The ``energy`` section states every figure with its kind (see :mod:`edgeexit.energy.model`), per exit, for the
early-exit run and for the monolithic model, in mJ per input:

* ``measured_mj`` / ``measured_attributable_mj``: ``{"mean", "ci95", "n"}`` from the phases (forced to exit k,
  the run's rule, the monolithic model), or None without a power source;
* ``board_estimate_mj`` / ``board_estimate_attributable_mj``: the measured whole-call latency (per exit: the
  timed exit cost of the run's rule kind) x the profile's active power (or active - idle);
* ``proxy_mj``: the operation proxy (for the run: averaged over the exits the inputs took).

The measured phases run the Runner's whole call (preprocessing included) on the benchmark's images.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import EnergyError, UsageError
from ..runtime.manifest import MANIFEST_FILE, Manifest
from ..energy.boards import Board
from ..energy.measure import EnergyMeasurement, Phase, measure_phases, measure_with_trace
from ..energy.model import KIND_LABELS, EnergyModel
from ..energy.sources import HWMON_ROOT, PowerSource, detect_power_source

log = logging.getLogger(__name__)

EARLY_EXIT = "early exit"
MONOLITHIC = "monolithic"


@dataclass(frozen=True)
class EnergySettings:
    """How to measure energy in a benchmark.

    Attributes:
        sensor: "auto" (an hwmon power sensor, else the Pi 5 PMIC), "none", or a :class:`PowerSource`.
        power_trace: a CSV trace an external meter logs during the run (replaces the sensor).
        reps: repeats of the phase sequence (confidence intervals need 2 or more).
        phase_s: seconds per phase window (at least); idle_s: seconds of the idle window.
        hwmon_root: where hwmon sensors are looked for (tests).
    """

    sensor: str | PowerSource = "auto"
    power_trace: str | None = None
    reps: int = 5
    phase_s: float = 2.0
    idle_s: float = 2.0
    hwmon_root: str = HWMON_ROOT

    def validate(self) -> None:
        if isinstance(self.reps, bool) or not isinstance(self.reps, int) or self.reps < 1:
            raise UsageError(f"energy repeats must be an integer >= 1, got {self.reps!r}")
        if not (self.phase_s > 0 and self.idle_s > 0):
            raise UsageError(f"energy phase and idle seconds must be > 0, got {self.phase_s} and {self.idle_s}")
        if self.power_trace is not None and not os.path.isfile(self.power_trace):
            raise UsageError(f"power trace {self.power_trace} does not exist; start the meter's log into it before "
                             "the benchmark (it is read after the energy phases)")


def bench_phases(runner: Any, images: np.ndarray, rule: Any, with_monolithic: bool) -> list[Phase]:
    """One phase per exit k (every input forced to leave at k: ``ForcedExitRule(rule, k)``, which still makes
    the rule's decisions at every exit up to k, or ``FixedExitRule(k)`` for a rule that decides nothing), the
    run's rule, and the monolithic model."""
    from ..runtime.rules import FixedExitRule, ForcedExitRule

    n = int(images.shape[0])

    def classify(i: int) -> None:
        runner.classify(images[i])

    def forced(k: int) -> Any:
        return FixedExitRule(k) if rule.kind in ("fixed", "final") else ForcedExitRule(rule, k)

    phases = [Phase(f"exit {k}", classify, n, setup=lambda r=forced(k): runner.set_rule(r))
              for k in range(runner.num_exits)]
    phases.append(Phase(EARLY_EXIT, classify, n, setup=lambda: runner.set_rule(rule)))
    if with_monolithic:
        phases.append(Phase(MONOLITHIC, lambda i: runner.run_monolithic(images[i]), n))
    return phases


def measure_bench(runner: Any, images: np.ndarray, settings: EnergySettings, *, with_monolithic: bool,
                  progress: Callable[[str, int, int], None] | None = None) -> EnergyMeasurement | None:
    """Measure every phase of :func:`bench_phases` with the trace or sensor of ``settings``; None without one.

    The runner's rule is restored afterwards. A sensor that vanishes gives a partial, incomplete result.
    """
    settings.validate()
    rule = runner.rule
    phases = bench_phases(runner, images, rule, with_monolithic)
    try:
        if settings.power_trace is not None:
            return measure_with_trace(settings.power_trace, phases, settings.reps, phase_s=settings.phase_s,
                                      idle_s=settings.idle_s, progress=progress)
        source = settings.sensor
        if source == "none":
            return None
        if source == "auto":
            source = detect_power_source(settings.hwmon_root)
            if source is None:
                return None
        return measure_phases(source, phases, settings.reps, phase_s=settings.phase_s, idle_s=settings.idle_s,
                              progress=progress)
    finally:
        runner.set_rule(rule)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def energy_section(result: Mapping[str, Any], manifest: Manifest, board: Board,
                   measurement: EnergyMeasurement | None) -> dict[str, Any]:
    """The ``energy`` section of a benchmark result (see the module docstring)."""
    model = EnergyModel(manifest, board)
    inputs = result["inputs"]
    exits = np.asarray(inputs["exit"], dtype=np.int64)
    lat = np.asarray(inputs["latency_ms"], dtype=np.float64)
    idle, active = board.idle_w, board.active_w

    def measured(phase: str, attributable: bool) -> dict[str, Any] | None:
        if measurement is None or phase not in measurement.phases:
            return None
        return measurement.phases[phase]["attributable_mj" if attributable else "total_mj"]

    def row(latency: float | None, proxy: float | None, phase: str) -> dict[str, Any]:
        return {"measured_mj": measured(phase, False), "measured_attributable_mj": measured(phase, True),
                "board_estimate_mj": None if latency is None else latency * active,
                "board_estimate_attributable_mj": None if latency is None else latency * (active - idle),
                "proxy_mj": proxy}

    rule_kind = (result.get("settings") or {}).get("rule", {}).get("kind")
    costs = ((result.get("exit_costs") or {}).get("latency_ms") or {})
    per_exit = costs.get("fixed" if rule_kind in ("final", "fixed") else rule_kind) or costs.get("fixed")
    rows = []
    for k in range(manifest.num_exits):
        at_k = lat[exits == k]
        if per_exit:
            latency, basis = float(per_exit[k]), "timed exit cost: whole call of an input forced to leave here"
        elif at_k.size:
            latency, basis = float(at_k.mean()), "timed pass: mean latency of the inputs that left here"
        else:
            latency, basis = None, "no input left here and no timed exit costs"
        rows.append({"exit": k, **row(latency, model.proxy_mj[k], f"exit {k}"), "board_estimate_latency_ms": latency,
                     "board_estimate_latency_basis": basis})
    mono_lat = inputs.get("monolithic_latency_ms")
    section: dict[str, Any] = {
        "unit": "mJ per input",
        "board": board.to_dict(),
        "exits": rows,
        "early_exit": row(float(lat.mean()), float(np.mean(np.asarray(model.proxy_mj)[exits])), EARLY_EXIT),
        "monolithic": row(_mean(list(mono_lat)) if mono_lat else None, model.monolithic_proxy_mj, MONOLITHIC),
        "measurement": None if measurement is None else measurement.to_dict(),
        "sources": {"measured": measurement.source if measurement is not None else
                    "no power sensor or trace: nothing measured", "board_estimate": model.board_source,
                    "proxy": model.proxy_source},
    }
    return section


def measured_entry(section: Mapping[str, Any], created: str | None = None) -> dict[str, Any] | None:
    """What ``bench --store-energy`` writes into the bundle's manifest for the board: per-exit measured mJ.

    None when the section has no complete measurement of every exit.
    """
    m = section.get("measurement")
    if not m or not m.get("complete"):
        return None
    total = [r["measured_mj"]["mean"] if r["measured_mj"] else None for r in section["exits"]]
    att = [r["measured_attributable_mj"]["mean"] if r["measured_attributable_mj"] else None for r in section["exits"]]
    if None in total:
        return None
    return {"exit_total_mj": total, "exit_attributable_mj": att,
            "exit_ci95_mj": [r["measured_mj"]["ci95"] for r in section["exits"]], "source": m["source"],
            "created": created or _dt.datetime.now().astimezone().isoformat(timespec="seconds")}


def check_measurement(result: Mapping[str, Any]) -> None:
    """Raise EnergyError when the result's energy measurement stopped early (its partial figures are kept).

    Raises:
        EnergyError: the power source went away during the phases.
    """
    m = (result.get("energy") or {}).get("measurement")
    if m and not m.get("complete"):
        raise EnergyError(f"{m.get('error')}; the results hold the partial figures; check the sensor's wiring and "
                          "driver and run the benchmark again")


def store_measured(bundle_dir: str | os.PathLike[str], result: Mapping[str, Any]) -> str:
    """Write the result's measured per-exit energy into the bundle's manifest under its board; return the board.

    Raises:
        UsageError: the result has no complete measurement of every exit.
        BundleError: the manifest cannot be read or written.
    """
    from ..runtime.bundle import write_manifest_atomic

    section = result.get("energy") or {}
    entry = measured_entry(section, result.get("created"))
    if entry is None:
        raise UsageError("nothing to store: the benchmark measured no energy for every exit; run it with a power "
                         "sensor or --power-trace")
    board = section["board"]["name"]
    path = Path(os.fspath(bundle_dir)) / MANIFEST_FILE
    manifest = Manifest.from_json(path.read_text(encoding="utf-8"))
    energy = dict(manifest.energy)
    energy["measured"] = {**dict(energy.get("measured") or {}), board: entry}
    write_manifest_atomic(bundle_dir, manifest.replace(energy=energy))
    return board


def _fmt(v: Mapping[str, Any] | float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, Mapping):
        if v.get("mean") is None:
            return "-"
        ci = v.get("ci95")
        return f"{v['mean']:.4f}" + (f" +-{ci:.4f}" if ci is not None else "")
    return f"{v:.4g}" if abs(v) < 1e-3 else f"{v:.4f}"


def format_energy(section: Mapping[str, Any]) -> str:
    """The energy table of a benchmark: per exit, the early-exit run and the monolithic model, every kind."""
    head = (f"{'energy, mJ per input':22}{'measured':>20}{'measured attrib.':>20}{'board est.':>12}"
            f"{'board attrib.':>14}{'op proxy':>11}")
    lines = [head, "-" * len(head)]
    named = [(f"exit {r['exit']}", r) for r in section["exits"]]
    named += [("early exit (run)", section["early_exit"]), ("monolithic", section["monolithic"])]
    for name, r in named:
        lines.append(f"{name:22}{_fmt(r['measured_mj']):>20}{_fmt(r['measured_attributable_mj']):>20}"
                     f"{_fmt(r['board_estimate_mj']):>12}{_fmt(r['board_estimate_attributable_mj']):>14}"
                     f"{_fmt(r['proxy_mj']):>11}")
    m = section.get("measurement")
    if m:
        idle = m.get("idle_w") or {}
        lines.append(f"measured: {m['source']}; idle {_fmt(idle)} W; +- is the 95% interval over "
                     f"{idle.get('n', 0)} repeat(s); whole Runner call (preprocessing included)")
        if m.get("error"):
            lines.append(f"measured figures are PARTIAL: {m['error']}")
    else:
        lines.append(f"measured: {section['sources']['measured']}")
    lines.append(f"{KIND_LABELS['board_estimate']}: {section['sources']['board_estimate']}")
    lines.append(f"{KIND_LABELS['proxy']}: {section['sources']['proxy']}")
    return "\n".join(lines)
