"""Energy in `edgeexit bench` and `edgeexit compare`: measured phases from a meter trace, a vanishing sensor,
storing measured figures in the bundle, and boards side by side."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeexit.bench.bench import BenchSettings, run_benchmark
from edgeexit.datasets import ImageSet
from edgeexit.energy import BOARDS, EnergyModel
from edgeexit.bench.bench_energy import EnergySettings, check_measurement
from edgeexit.energy.sources import find_power_sensor
from edgeexit.errors import EnergyError
from edgeexit.runtime.bundle import read_manifest

pytestmark = pytest.mark.runtime  # numpy, Pillow, click and a TFLite interpreter only (device/legacy runs)

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import synthetic_digits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
METER_W = 4.0


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeexit", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def _data(n: int = 30) -> ImageSet:
    images, labels = synthetic_digits(n, seed=11)
    return ImageSet(images, labels, tuple(str(i) for i in range(10)), "synthetic")


class Meter(threading.Thread):
    """An external USB meter logging volts and amps with timestamps to a CSV file every 5 ms."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.stop = path, threading.Event()

    def run(self) -> None:
        with open(self.path, "w", newline="") as f:
            f.write("timestamp,volts,amps\n")
            while not self.stop.wait(0.005):
                t = time.time()
                watts = METER_W + 0.3 * math.sin(2 * math.pi * t / 0.05)
                f.write(f"{t:.6f},5.0,{watts / 5.0:.6f}\n")
                f.flush()


def test_bench_measures_energy_from_a_meter_trace_and_stores_it(bundle_dir, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    images, labels = synthetic_digits(30, seed=11)
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    meter = Meter(tmp_path / "meter.csv")
    meter.start()
    try:
        proc = cli("bench", bundle, "--data", tmp_path / "set.npz", "--warmup", "2", "--no-sweep", "--board", "rpi4",
                   "--power-trace", tmp_path / "meter.csv", "--energy-reps", "2", "--energy-phase-s", "0.25",
                   "--store-energy", "--out", tmp_path / "out")
    finally:
        meter.stop.set()
        meter.join()
    assert proc.returncode == 0, proc.stderr
    assert "energy, mJ per input" in proc.stdout and "CSV power trace meter.csv" in proc.stdout
    assert "stored measured energy for board rpi4" in proc.stderr
    result = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    energy = result["energy"]
    m = energy["measurement"]
    assert m["complete"] and m["kind"] == "measured"
    assert m["idle_w"]["mean"] == pytest.approx(METER_W, rel=0.02)
    num_exits = result["bundle"]["num_exits"]
    assert set(m["phases"]) == {f"exit {k}" for k in range(num_exits)} | {"early exit", "monolithic"}
    for name, phase in m["phases"].items():
        # the meter read a steady 4 W: energy per input = 4 W x time per input; nothing attributable to the load
        assert phase["total_mj"]["mean"] == pytest.approx(METER_W * phase["per_input_ms"], rel=0.02)
        assert abs(phase["attributable_mj"]["mean"]) < 0.05 * phase["total_mj"]["mean"]
    for row in energy["exits"]:
        assert row["measured_mj"]["n"] == 2 and row["measured_mj"]["ci95"] is not None
        assert row["proxy_mj"] > 0
    assert energy["early_exit"]["board_estimate_mj"] == pytest.approx(
        np.mean(result["inputs"]["latency_ms"]) * BOARDS["rpi4"].active_w)
    # the bundle now holds the measured per-exit figures for rpi4; the EnergyModel uses them on that board
    manifest = read_manifest(bundle)[1]
    model = EnergyModel(manifest, BOARDS["rpi4"])
    assert model.default_kind() == "measured"
    assert model.for_exit(0, 1.0).measured_mj == pytest.approx(energy["exits"][0]["measured_mj"]["mean"])
    assert EnergyModel(manifest, BOARDS["rpi5"]).for_exit(0, 1.0).measured_mj is None


def test_vanishing_sensor_in_a_benchmark_keeps_the_partial_figures_and_says_so(bundle_dir, tmp_path):
    hw = tmp_path / "hwmon0"
    hw.mkdir()
    (hw / "name").write_text("ina226\n")
    (hw / "update_interval").write_text("2\n")
    (hw / "power1_input").write_text("3000000\n")
    sensor = find_power_sensor(str(tmp_path))
    num_exits = read_manifest(bundle_dir)[1].num_exits

    def progress(phase, done, total):  # gone once the first repeat (idle, every exit, run, monolithic) is done
        if phase == "energy" and done == num_exits + 3:
            (hw / "power1_input").unlink()

    energy = EnergySettings(sensor=sensor, reps=3, phase_s=0.15, idle_s=0.15)
    result = run_benchmark(bundle_dir, _data(), BenchSettings(warmup=2, sweep=False, board="rpi4", energy=energy),
                           progress=progress)
    m = result["energy"]["measurement"]
    assert m["complete"] is False and "stopped answering" in m["error"] and "ina226" in m["error"]
    assert all(r["measured_mj"]["n"] == 1 for r in result["energy"]["exits"])  # the first repeat was measured
    assert "repeat 2" in m["error"]
    with pytest.raises(EnergyError, match="partial figures"):
        check_measurement(result)


def test_no_sensor_means_no_measured_figures_and_the_report_says_so(bundle_dir):
    result = run_benchmark(bundle_dir, _data(), BenchSettings(warmup=2, sweep=False, board="rpi5",
                                                              energy=EnergySettings(sensor="none")))
    energy = result["energy"]
    assert energy["measurement"] is None and energy["early_exit"]["measured_mj"] is None
    assert "nothing measured" in energy["sources"]["measured"]
    assert energy["board"]["name"] == "rpi5" and energy["board"]["active_load"]


def test_energy_settings_and_storing_refuse_what_cannot_work(bundle_dir, tmp_path):
    from edgeexit.bench.bench_energy import store_measured
    from edgeexit.errors import UsageError

    with pytest.raises(UsageError, match="start the meter's log"):
        EnergySettings(power_trace=str(tmp_path / "not-yet.csv")).validate()
    with pytest.raises(UsageError, match="energy repeats"):
        EnergySettings(reps=0).validate()
    result = run_benchmark(bundle_dir, _data(10), BenchSettings(warmup=1, repeat=1, sweep=False, points=False,
                                                                batch_sizes=(1,), energy=EnergySettings(sensor="none")))
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(UsageError, match="nothing to store"):
        store_measured(bundle, result)
    assert (bundle / "manifest.json").read_bytes() == before


def _write(result: dict, path: Path) -> Path:
    path.write_text(json.dumps(result))
    return path


def test_compare_boards_side_by_side_and_refuse_mixed_bundles(bundle_dir, tmp_path):
    files = []
    for board in ("rpi4", "rpi5"):
        r = run_benchmark(bundle_dir, _data(), BenchSettings(warmup=2, sweep=False, board=board,
                                                             energy=EnergySettings(sensor="none")))
        files.append(_write(r, tmp_path / f"{board}.json"))
    proc = cli("compare", *files, "--out", tmp_path / "cmp", "--name", "pi4-pi5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("board estimate") >= 2
    with open(tmp_path / "cmp" / "pi4-pi5.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["board_profile"] for r in rows] == ["rpi4", "rpi5"]
    for r in rows:
        assert r["energy_kind"] == "board_estimate"
        watts = BOARDS[r["board_profile"]].active_w
        assert float(r["energy_mj"]) == pytest.approx(float(r["latency_mean_ms"]) * watts, rel=1e-4)
        assert float(r["monolithic_energy_mj"]) == pytest.approx(float(r["monolithic_latency_mean_ms"]) * watts,
                                                                 rel=1e-4)
    if HAS_MATPLOTLIB:
        assert (tmp_path / "cmp" / "pi4-pi5.png").stat().st_size > 10_000
    other = json.loads(files[1].read_text())
    other["bundle"]["sha256"] = "0" * 64  # a result of another bundle
    mixed = _write(other, tmp_path / "other.json")
    proc = cli("compare", files[0], mixed, "--out", tmp_path / "cmp2")
    assert proc.returncode == 2 and proc.stderr.startswith("error: the results are of different bundles")
    assert "Traceback" not in proc.stderr and not (tmp_path / "cmp2").exists()
    proc = cli("compare", files[0], mixed, "--out", tmp_path / "cmp3", "--allow-mixed", "--no-plot")
    assert proc.returncode == 0 and "MIXED BUNDLES" in proc.stdout
    proc = cli("compare", files[0])
    assert proc.returncode == 2 and "at least two" in proc.stderr


def test_tune_and_controller_use_the_energy_kind_the_bundle_has(bundle_dir, tmp_path):
    from edgeexit import Runner
    from edgeexit.errors import TuningError
    from edgeexit.runtime.bundle import write_manifest_atomic
    from edgeexit.tuning.control import BudgetController
    from edgeexit.tuning.results import Target
    from edgeexit.tuning.tune import tune_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    images, labels = synthetic_digits(80, seed=5)
    np.savez(tmp_path / "val.npz", images=images, labels=labels)
    with pytest.raises(TuningError, match="no measured energy for board rpi4"):
        tune_bundle(bundle, str(tmp_path / "val.npz"), Target(budget_energy_mj=1.0, energy_kind="measured"),
                    board="rpi4", dry_run=True)
    manifest = read_manifest(bundle)[1]
    per_exit = [0.05 * (k + 1) for k in range(manifest.num_exits)]  # as `bench --store-energy` would store them
    write_manifest_atomic(bundle, manifest.replace(energy={"measured": {"rpi4": {
        "exit_total_mj": per_exit, "exit_attributable_mj": per_exit, "source": "hwmon ina226"}}}))
    result = tune_bundle(bundle, str(tmp_path / "val.npz"), Target(budget_energy_mj=0.9 * per_exit[-1]), board="rpi4",
                         risk=1)   # 80 images: the point estimate (a guarantee needs >= 200)
    assert result.exit_costs.energy_kind == "measured"
    assert list(result.exit_costs.energy_mj) == pytest.approx(per_exit)
    chosen = result.chosen
    assert chosen.energy_mj == pytest.approx(float(np.dot(chosen.exit_fractions, per_exit)))
    assert chosen.energy_mj <= 0.9 * per_exit[-1] + 1e-9
    runner = Runner(bundle, board="rpi4", power_sensor=None)
    assert runner.manifest.operating_points.exit_costs["energy_kind"] == "measured"
    ctl = BudgetController.for_runner(runner, 0.9 * per_exit[-1], cost="energy")
    assert ctl.energy_kind == "measured" and list(ctl.exit_costs) == pytest.approx(per_exit)
    # on another board the bundle holds no measured figures: the proxy, and it says so
    other = tune_bundle(bundle, str(tmp_path / "val.npz"), Target(max_drop_pp=50.0), board="rpi5", dry_run=True,
                        risk=1)
    assert other.exit_costs.energy_kind == "proxy"
