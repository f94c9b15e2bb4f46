"""`edgeexit bench` as a user runs it: result JSON, sweep CSV, plot, environment record, clean failures."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeexit.bench.bench import RESULT_FIELDS, BenchSettings, run_benchmark
from edgeexit.bench.report import result_stem, write_results
from edgeexit.bench.threshold_sweep import SWEEP_COLUMNS
from edgeexit.runtime.bundle import read_manifest
from edgeexit.datasets import ImageSet, load_dataset
from edgeexit.bench.envinfo import EnvPaths, collect_environment, slug
from edgeexit.errors import DatasetError
from edgeexit.runtime.runner import Runner

pytestmark = pytest.mark.runtime  # numpy, Pillow, click and a TFLite interpreter only (device/legacy runs)

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 60
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
NO_MONOLITHIC_NOTE = ("the bundle has no monolithic.tflite: no monolithic baseline, speed-up or staging overhead; "
                      "re-convert with the monolithic model to get them")


@pytest.fixture(scope="module")
def manifest(bundle_dir):
    return read_manifest(bundle_dir)[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeexit", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def make_npz(path: Path, n: int, size: tuple[int, int], channels: int, num_classes: int,
             classes: list[str] | None = None, seed: int = 0) -> Path:
    """A labelled .npz: template-plus-noise digits for 1-channel sets, random pixels otherwise."""
    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic import synthetic_digits

    if channels == 1 and size[0] == size[1] and num_classes == 10:
        images, labels = synthetic_digits(n, seed=seed, size=size[0])
    else:
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (n, *size, channels), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n).astype(np.int64)
        labels[:num_classes] = np.arange(min(n, num_classes))  # every class present
    arrays = {"images": images, "labels": labels}
    if classes is not None:
        arrays["classes"] = np.array(classes)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def data_npz(manifest, tmp_path_factory) -> Path:
    h, w = manifest.preprocessing.size
    return make_npz(tmp_path_factory.mktemp("bench") / "set.npz", N_IMAGES, (h, w), manifest.preprocessing.channels,
                    manifest.num_classes, classes=list(manifest.labels), seed=11)


@pytest.fixture(scope="module")
def bench_run(bundle_dir, data_npz, tmp_path_factory):
    """One real `edgeexit bench --json` run: (result dict, output dir, completed process)."""
    out = tmp_path_factory.mktemp("bench-out")
    proc = cli("bench", bundle_dir, "--data", data_npz, "--warmup", "3", "--repeat", "2", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), out, proc


def test_result_has_every_field_and_consistent_counts(bench_run, manifest):
    r, _, _ = bench_run
    assert set(RESULT_FIELDS) <= set(r)
    assert r["dataset"]["count"] == N_IMAGES and r["settings"]["repeat"] == 2 and r["settings"]["batch"] == 1
    exits = r["exits"]
    assert len(exits) == manifest.num_exits
    assert sum(e["count"] for e in exits) == N_IMAGES
    assert sum(e["share"] for e in exits) == pytest.approx(1.0)
    for e in exits:
        assert set(e["latency_ms"]) >= {"p50", "p90", "p99", "mean"}
        if e["count"]:
            assert e["latency_ms"]["p50"] <= e["latency_ms"]["p90"] <= e["latency_ms"]["p99"]
    assert [e["cumulative_macs"] for e in exits] == list(manifest.cumulative_macs())
    kinds = {"measured_mj", "measured_attributable_mj", "board_estimate_mj", "board_estimate_attributable_mj",
             "proxy_mj"}
    assert [e["exit"] for e in r["energy"]["exits"]] == list(range(manifest.num_exits))
    assert all(kinds <= set(e) for e in (*r["energy"]["exits"], r["energy"]["early_exit"], r["energy"]["monolithic"]))


def _mark_failed(bundle: Path) -> dict:
    """Rewrite ``bundle``'s manifest as if its int8 verification had failed (a bundle converted with
    strict=False that missed a tolerance); returns the verification section written."""
    path = bundle / "manifest.json"
    d = json.loads(path.read_text())
    d["verification"] = {**d["verification"], "passed": False, "failed_tolerances": ["max_logit_error"],
                         "failures": ["exit 1: RMS logit error 19.25 % of the float logit range > max_logit_error 3 %"]}
    path.write_text(json.dumps(d))
    return d["verification"]


def test_bench_records_the_verdict_and_warns_about_an_unverified_bundle(bench_run, manifest, tiny_bundle_copy,
                                                                        data_npz):
    r, _, proc = bench_run
    assert r["bundle"]["verification"] == manifest.verification_verdict()
    assert r["bundle"]["verification"]["status"] == "passed" and "warning:" not in proc.stderr  # the session bundle
    _mark_failed(tiny_bundle_copy)
    failed = cli("bench", tiny_bundle_copy, "--data", data_npz, "--warmup", "0", "--repeat", "1", "--no-sweep",
                 "--no-points", "--no-save", "--json")
    assert failed.returncode == 0, failed.stderr
    assert [ln for ln in failed.stderr.splitlines() if ln.startswith("warning:")] == [
        (f"warning: bundle {tiny_bundle_copy}: its int8 verification failed at conversion (max_logit_error); its "
         "figures are not those of a verified conversion")]
    verdict = json.loads(failed.stdout)["bundle"]["verification"]
    assert verdict["status"] == "failed" and verdict["failed_tolerances"] == ["max_logit_error"]


def test_benchmark_scripts_quote_only_verified_bundles(tiny_bundle, tiny_bundle_copy, tmp_path):
    """benchmarks/verified.py through a script that needs only the manifest (energy_proxy.py)."""
    def script(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "energy_proxy.py"), *map(str, args)],
                              capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              timeout=120, check=False)

    _mark_failed(tiny_bundle_copy)
    refused = script(f"tiny={tiny_bundle_copy}", "--out", tmp_path / "refused.json")
    assert refused.returncode == 1 and not (tmp_path / "refused.json").exists()
    assert refused.stderr.strip().splitlines() == [
        (f"error: bundle {tiny_bundle_copy}: its int8 verification failed at conversion (max_logit_error); benchmark "
         "figures are quoted only for verified bundles: re-convert it with verification images, or pass "
         "--allow-unverified (the result file records the verdict)")]
    allowed = script(f"tiny={tiny_bundle_copy}", "--out", tmp_path / "allowed.json", "--allow-unverified")
    assert allowed.returncode == 0, allowed.stderr
    assert "warning: bundle" in allowed.stderr and "measured anyway (--allow-unverified)" in allowed.stderr
    record = json.loads((tmp_path / "allowed.json").read_text())["bundles"]["tiny"]["verification"]
    assert record["status"] == "failed" and record["allowed_unverified"] is True
    assert record["failed_tolerances"] == ["max_logit_error"]
    ok = script(f"tiny={tiny_bundle}", "--out", tmp_path / "ok.json")  # the session bundle passed its verification
    assert ok.returncode == 0 and "warning" not in ok.stderr, ok.stderr
    record = json.loads((tmp_path / "ok.json").read_text())["bundles"]["tiny"]["verification"]
    assert record["status"] == "passed" and record["allowed_unverified"] is False


def test_accuracies_match_a_recount_of_the_per_input_results(bench_run, manifest):
    r, _, _ = bench_run
    inp = r["inputs"]
    label, pred, ex = (np.array(inp[k]) for k in ("label", "prediction", "exit"))
    assert len(label) == len(pred) == len(ex) == N_IMAGES
    assert r["overall"]["accuracy"] == pytest.approx(np.mean(pred == label))
    for e in r["exits"]:
        m = ex == e["exit"]
        assert e["count"] == int(m.sum())
        assert e["accuracy"] == (pytest.approx(np.mean(pred[m] == label[m])) if m.any() else None)
    cum = np.array(manifest.cumulative_macs())
    assert r["overall"]["avg_macs"] == pytest.approx(cum[ex].mean())
    assert r["overall"]["mac_fraction"] == pytest.approx(cum[ex].mean() / manifest.full_macs)
    lat = np.array(inp["latency_ms"])
    assert r["overall"]["latency_ms"]["mean"] == pytest.approx(lat.mean(), rel=1e-4)
    assert r["overall"]["latency_ms"]["p90"] == pytest.approx(np.percentile(lat, 90), rel=1e-4)


def test_monolithic_baseline_speedup_and_staging_overhead(bench_run, manifest):
    r, _, _ = bench_run
    assert manifest.monolithic is not None  # the session bundle is converted with its monolithic model
    mono, inp = r["monolithic"], r["inputs"]
    assert mono["available"] is True and mono["macs"] == manifest.monolithic.macs
    assert mono["accuracy"] == pytest.approx(np.mean(np.array(inp["monolithic_prediction"]) == np.array(inp["label"])))
    assert r["speedup"]["p50"] == pytest.approx(mono["latency_ms"]["p50"] / r["overall"]["latency_ms"]["p50"])
    # forced to the last exit: every input runs every stage; with a threshold rule it answers the last exit's argmax
    assert r["settings"]["rule"]["kind"] in ("confidence", "max_softmax", "entropy")
    last = {p["exit"]: p for p in r["sweep"]["points"] if p["source"] == "fixed"}[manifest.num_exits - 1]
    assert r["forced_last"]["accuracy"] == pytest.approx(last["accuracy"])
    assert len(r["inputs"]["forced_last_latency_ms"]) == N_IMAGES


def test_bench_without_a_monolithic_model_says_so(bundle_without_monolithic, data_npz, tmp_path):
    out = tmp_path / "out"
    proc = cli("bench", bundle_without_monolithic, "--data", data_npz, "--limit", "10", "--warmup", "1", "--repeat", "1",
               "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["monolithic"] == {"available": False}
    assert r["speedup"] == {"mean": None, "p50": None, "p90": None}
    assert r["inputs"]["monolithic_prediction"] is None
    assert NO_MONOLITHIC_NOTE in r["notes"]


def test_exit_costs_cover_every_timed_rule_and_throughput_every_batch(bench_run, manifest):
    r, _, _ = bench_run
    costs = r["exit_costs"]["latency_ms"]
    kinds = {r["settings"]["rule"]["kind"], "fixed"} | {p["kind"] for p in r["sweep"]["points"] if p["source"] != "fixed"}
    assert kinds <= set(costs) and all(len(v) == manifest.num_exits and min(v) > 0 for v in costs.values())
    names = [p["name"] for p in r["points"]]
    stored = [k for k in manifest.operating_points if manifest.point_rule(k) is not None]
    assert names[0] == "run" and set(names[1:]) <= set(stored)
    for p in r["points"]:
        assert sum(p["exit_shares"]) == pytest.approx(1.0) and p["measured_mean_ms"] > 0
    assert [t["batch"] for t in r["throughput"]] == [1, 8, 32]
    for t in r["throughput"]:
        assert t["images"] == N_IMAGES - N_IMAGES % t["batch"] and t["early_exit_ips"] > 0
    assert r["overhead"]["early_exit_invokes_ms"] > 0 and len(r["overhead"]["stage_invoke_ms"]) == manifest.num_exits


def test_sweep_from_one_trace_agrees_with_the_measured_run(bench_run, manifest):
    r, _, _ = bench_run
    sw = r["sweep"]
    assert sw["latency_is_estimated"] is True
    assert sw["run_agreement"] == 1.0  # the trace simulation decides exactly like the Runner
    bundle_points = [p for p in sw["points"] if p["source"] == "bundle"]
    assert len(bundle_points) == 1 and bundle_points[0]["accuracy"] == pytest.approx(r["overall"]["accuracy"])
    assert len([p for p in sw["points"] if p["source"] == "grid"]) >= 10
    for p in sw["points"]:
        assert sum(p["exit_shares"]) == pytest.approx(1.0)
        assert 0 < p["mac_fraction"] and p["est_latency_ms"] > 0
    fixed = {p["exit"]: p for p in sw["points"] if p["source"] == "fixed"}
    cum = manifest.cumulative_macs()
    assert [fixed[k]["avg_macs"] for k in range(manifest.num_exits)] == [float(c) for c in cum]


def test_result_files_are_named_by_machine_and_time(bench_run):
    r, out, _ = bench_run
    stem = result_stem(r)
    saved = json.loads((out / f"{stem}.json").read_text())
    assert saved["overall"] == r["overall"] and saved["files"]["json"] == f"{stem}.json"
    assert stem.startswith(slug(r["environment"]["board"] or r["environment"]["machine"]))
    with open(out / f"{stem}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == SWEEP_COLUMNS and len(rows) == len(r["sweep"]["points"])
    png = out / f"{stem}.png"
    if HAS_MATPLOTLIB:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists()


def test_environment_is_recorded(bench_run):
    env = bench_run[0]["environment"]
    for key in ("board", "cpu", "machine", "os", "kernel", "python", "numpy", "interpreter_backend",
                "interpreter_packages", "threads", "governor", "temperature_c"):
        assert key in env
    assert env["threads"] == 1 and env["python"] and env["numpy"] == np.__version__
    assert env["interpreter_backend"].split()[0] in ("ai-edge-litert", "tflite-runtime", "tensorflow")


def test_environment_reads_board_files(tmp_path):
    (tmp_path / "model").write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\x00")
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nBogoMIPS\t: 108.00\nCPU implementer\t: 0x41\n"
                                      "CPU part\t: 0xd08\n\nHardware\t: BCM2835\nModel\t: Raspberry Pi 4 Model B\n")
    (tmp_path / "os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n')
    (tmp_path / "governor").write_text("ondemand\n")
    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("48312\n")
    (zone / "type").write_text("cpu-thermal\n")
    paths = EnvPaths(device_tree_model=tmp_path / "model", cpuinfo=tmp_path / "cpuinfo",
                     os_release=tmp_path / "os-release", governor=tmp_path / "governor",
                     cur_freq=tmp_path / "missing", thermal=tmp_path / "thermal")
    env = collect_environment(num_threads=2, paths=paths)
    assert env["board"] == env["machine"] == "Raspberry Pi 4 Model B Rev 1.4"
    assert env["cpu"] == "Raspberry Pi 4 Model B"
    assert env["os"] == "Debian GNU/Linux 12 (bookworm)" and env["governor"] == "ondemand"
    assert env["temperature_c"] == {"cpu-thermal": pytest.approx(48.312)} and env["cpu_freq_khz"] is None
    assert slug(env["machine"]) == "raspberry-pi-4-model-b-rev-1-4"


def test_text_report_and_rule_override(bundle_dir, data_npz, manifest, tmp_path):
    e = manifest.num_exits
    proc = cli("-q", "bench", bundle_dir, "--data", data_npz, "--limit", "20", "--warmup", "0", "--no-sweep",
               "--rule", "max_softmax", "--thresholds", ",".join(["0"] * (e - 1)), "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "exit" in proc.stdout and "threshold sweep" not in proc.stdout
    row0 = next(line.split() for line in proc.stdout.splitlines() if line.split()[:1] == ["0"])
    assert row0[1] == "100.00%"  # max_softmax >= 0: every input leaves at exit 0
    saved = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert len(saved) == 1 and saved[0]["sweep"] is None and not list(tmp_path.glob("*.csv"))
    assert saved[0]["settings"]["rule"] == {"kind": "max_softmax", "thresholds": [0.0] * (e - 1), "exit": None}


def test_plot_is_skipped_without_matplotlib(bench_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    files = write_results(dict(bench_run[0]), tmp_path)
    assert files["png"] is None and "pip install matplotlib" in files["plot_skipped"]
    assert Path(files["json"]).is_file() and Path(files["csv"]).is_file()


def test_index_named_dataset_with_fewer_classes_fits(bundle_dir, manifest, tmp_path):
    # classes "0".."K-2" (a .npz without names): accepted, and its labels are scored as the bundle's class indices
    h, w = manifest.preprocessing.size
    path = make_npz(tmp_path / "few.npz", 8, (h, w), manifest.preprocessing.channels, manifest.num_classes - 1)
    data = load_dataset(str(path))
    assert len(data.classes) < manifest.num_classes and data.classes == tuple(map(str, range(len(data.classes))))
    r = run_benchmark(bundle_dir, data, BenchSettings(warmup=0, sweep=False))
    predictions = [Runner(bundle_dir, power_sensor=None)(img).label for img in data.images]
    assert r["dataset"]["count"] == 8
    assert r["overall"]["accuracy"] == pytest.approx(np.mean(np.array(predictions) == data.labels))


def test_empty_dataset_is_refused_by_the_library(bundle_dir, manifest):
    h, w = manifest.preprocessing.size
    empty = ImageSet(np.zeros((0, h, w, manifest.preprocessing.channels), np.uint8), np.zeros(0, np.int64),
                     manifest.labels, "empty")
    with pytest.raises(DatasetError, match="no images"):
        run_benchmark(bundle_dir, empty, BenchSettings(warmup=0))


def _bad_npz(kind: str, manifest, path: Path) -> Path:
    h, w = manifest.preprocessing.size
    c, k = manifest.preprocessing.channels, manifest.num_classes
    if kind == "class-names":
        return make_npz(path, 12, (h, w), c, k, classes=[f"other{i}" for i in range(k)])
    if kind == "class-count":
        return make_npz(path, 12 + k, (h, w), c, k + 2)
    if kind == "size":
        return make_npz(path, 12, (h + 4, w + 4), c, k)
    if kind == "channels":
        return make_npz(path, 12, (h, w), 4 - c, k)  # 1 <-> 3
    np.savez(path, images=np.zeros((0, h, w, c), np.uint8), labels=np.zeros(0, np.int64))  # "empty"
    return path


@pytest.mark.parametrize("kind,match", [("class-names", "class 0 is"), ("class-count", "classes but bundle"),
                                        ("size", "--resize"), ("channels", "--resize"), ("empty", "no images")],
                         ids=["class-names", "class-count", "size", "channels", "empty"])
def test_bad_datasets_fail_with_one_line(bundle_dir, manifest, tmp_path, kind, match):
    proc = cli("bench", bundle_dir, "--data", _bad_npz(kind, manifest, tmp_path / f"{kind}.npz"),
               "--out", tmp_path / "out")
    assert proc.returncode == DatasetError.exit_code, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_resize_converts_other_sizes(bundle_dir, manifest, tmp_path):
    path = _bad_npz("size", manifest, tmp_path / "big.npz")
    proc = cli("-q", "bench", bundle_dir, "--data", path, "--resize", "--warmup", "0", "--no-sweep", "--no-save",
               "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["dataset"]["count"] == 12 and any("converted" in n for n in r["notes"])


def test_invalid_bundle_fails_with_one_line(bundle_dir, data_npz, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    stage = copy / "stage_0.tflite"
    stage.write_bytes(stage.read_bytes()[:-16] + bytes(16))
    proc = cli("bench", copy, "--data", data_npz, "--out", tmp_path / "out")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stage_0.tflite" in errors[0], proc.stderr


@pytest.mark.workstation
@pytest.mark.slow  # trains the tiny model and a float pass: 146 s set-up on the shared machine under load
def test_float_checkpoint_accuracy_beside_the_int8_run(tiny_bundle, tiny_model, data_npz, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from edgeexit.workstation.catalog import registry
    from edgeexit.workstation.catalog.checkpoint import save_checkpoint
    from edgeexit.workstation.training.data import to_tensors
    from tinymodels import tiny_staged_model

    # the tiny test network is not a registry model: register its builder for this test only
    monkeypatch.setitem(registry.BUILDERS, "tiny-test", lambda seed, widths: tiny_staged_model(seed, tuple(widths)))
    ckpt = save_checkpoint(tiny_model, tmp_path / "tiny.pt")
    data = load_dataset(str(data_npz))
    r = run_benchmark(tiny_bundle, data, BenchSettings(warmup=0, sweep=False, float_checkpoint=str(ckpt)))
    x, y = to_tensors(data, tiny_model.spec)
    with torch.no_grad():
        direct = [float((out["logits"].argmax(1) == y).float().mean()) for out in tiny_model(x)]
    assert r["float"]["exit_accuracy"] == pytest.approx(direct)
    assert sum(r["float"]["rule_exit_shares"]) == pytest.approx(1.0)
    assert 0.0 <= r["float"]["rule_accuracy"] <= 1.0


#: Packages a benchmark on a device must not load (matplotlib only for the plot, which write_results draws).
HEAVY = ("torch", "tensorflow", "onnx", "onnx2tf", "onnxruntime", "scipy", "edgeexit.workstation")


def heavy_modules(loaded: list[str], heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """The names in ``loaded`` (full module names, as in sys.modules) that are one of ``heavy`` or inside one."""
    return sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in heavy))


def test_heavy_modules_sees_submodules():
    assert heavy_modules(["edgeexit.workstation.conversion.pipeline", "torch._C", "onnxruntime", "edgeexit.runtime",
                          "onnx_like", "scipyx"]) == ["edgeexit.workstation.conversion.pipeline", "onnxruntime", "torch._C"]


def test_bench_loads_no_workstation_module(bundle_dir, data_npz, tmp_path):
    script = ("import json, sys\n"
              "from edgeexit.bench.bench import BenchSettings, run_benchmark\n"
              "from edgeexit.bench.report import write_results\n"
              "from edgeexit.datasets import load_dataset\n"
              "r = run_benchmark(sys.argv[1], load_dataset(sys.argv[2], limit=10), BenchSettings(warmup=1))\n"
              "ran = sorted(sys.modules)\n"
              "write_results(r, sys.argv[3])\n"
              "print(json.dumps([ran, sorted(sys.modules)]))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(bundle_dir), str(data_npz), str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ran, written = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "edgeexit.bench.bench" in ran and "edgeexit.runtime.runner" in ran  # the real module names are listed
    assert heavy_modules(ran, (*HEAVY, "matplotlib")) == [], "run_benchmark loaded these"
    assert heavy_modules(written) == [], "write_results loaded these"


def _cpuinfo_env(tmp_path: Path, name: str, first_cpu: str) -> dict:
    """The environment record of a machine whose /proc/cpuinfo starts with ``first_cpu`` (a second CPU follows)."""
    (tmp_path / name).write_text(first_cpu + "\nprocessor\t: 1\nflags\t\t: fpu\nFeatures\t: fp\n")
    missing = tmp_path / "missing"
    return collect_environment(num_threads=1, paths=EnvPaths(
        device_tree_model=missing, cpuinfo=tmp_path / name, os_release=missing, governor=missing,
        cur_freq=missing, thermal=missing))


def _x86(family: int, model: int, flags: str) -> str:
    return (f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n"
            f"model name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu sse sse2 ssse3 avx {flags} rdpid\n")


def _arm(variant: str, part: str, revision: int, features: str) -> str:
    return (f"processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid {features}\n"
            f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\n"
            f"CPU revision\t: {revision}\n")


def test_environment_records_cpu_family_and_int8_features(tmp_path):
    zen3 = _cpuinfo_env(tmp_path, "zen3", _x86(25, 1, "fma avx2 bmi2"))
    zen5 = _cpuinfo_env(tmp_path, "zen5", _x86(26, 2, "avx2 avx512f avx512bw avx512_vnni avx512_bf16"))
    spr = _cpuinfo_env(tmp_path, "spr", _x86(6, 143, "avx2 avx512f avx512_vnni avx_vnni amx_bf16 amx_tile amx_int8"))
    assert zen3["cpu"] == zen5["cpu"] == "AMD EPYC"  # one model name, an 8x difference in int8 speed
    assert (zen3["cpu_family"], zen3["int8_features"]) == ("AuthenticAMD family 25 model 1 stepping 1", ["avx2"])
    assert (zen5["cpu_family"], zen5["int8_features"]) == ("AuthenticAMD family 26 model 2 stepping 1",
                                                           ["avx2", "avx512f", "avx512_vnni"])
    assert spr["int8_features"] == ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
    pi4 = _cpuinfo_env(tmp_path, "pi4", _arm("0x0", "0xd08", 3, ""))
    pi5 = _cpuinfo_env(tmp_path, "pi5", _arm("0x4", "0xd0b", 1, "atomics asimdrdm lrcpc dcpop asimddp"))
    v1 = _cpuinfo_env(tmp_path, "v1", _arm("0x1", "0xd40", 1, "asimddp sve i8mm bf16"))
    assert (pi4["cpu_family"], pi4["int8_features"]) == ("Arm implementer 0x41 part 0xd08 (Cortex-A72) r0p3",
                                                         ["asimd"])
    assert (pi5["cpu_family"], pi5["int8_features"]) == ("Arm implementer 0x41 part 0xd0b (Cortex-A76) r4p1",
                                                         ["asimd", "asimddp"])
    assert (v1["cpu_family"], v1["int8_features"]) == ("Arm implementer 0x41 part 0xd40 r1p1",
                                                       ["asimd", "asimddp", "i8mm", "sve"])


def test_compare_tells_two_machines_of_one_cpu_name_apart(tmp_path):
    """Two results whose CPU is "AMD EPYC" (a real demo result file, its environment from two cpuinfo files):
    `edgeexit compare` prints and writes each machine's family and int8 features."""
    demo = json.loads((ROOT / "benchmarks/results/demo/amd-epyc_eenet-small_20261202-154358.json").read_text())
    files = []
    for name, first_cpu in (("zen3", _x86(25, 1, "avx2")), ("zen5", _x86(26, 2, "avx2 avx512f avx512_vnni"))):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps({**demo, "environment": _cpuinfo_env(tmp_path, name, first_cpu)}))
    proc = cli("compare", *files, "--out", tmp_path / "c", "--no-plot")
    assert proc.returncode == 0, proc.stderr
    head, _, zen3, zen5 = proc.stdout.splitlines()[:4]
    assert "cpu family" in head and "int8 features" in head
    assert "AuthenticAMD family 25 model 1 stepping 1" in zen3 and "AuthenticAMD family 26 model 2" in zen5
    assert zen3.split("stepping 1")[1].split()[0] == "avx2"
    assert zen5.split("stepping 1")[1].split()[:3] == ["avx2", "avx512f", "avx512_vnni"]
    with open(tmp_path / "c" / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["cpu"], r["cpu_family"], r["int8_features"]) for r in rows] == [
        ("AMD EPYC", "AuthenticAMD family 25 model 1 stepping 1", "avx2"),
        ("AMD EPYC", "AuthenticAMD family 26 model 2 stepping 1", "avx2 avx512f avx512_vnni")]
    # a result written before the environment recorded features: those stamped on its exit costs, else "not recorded"
    old = {**demo, "environment": {k: v for k, v in demo["environment"].items() if k != "int8_features"}}
    old["exit_costs"] = {**old["exit_costs"], "int8_features": ["avx2", "avx512f", "avx512_vnni"]}
    older = {**old, "exit_costs": {k: v for k, v in old["exit_costs"].items() if k != "int8_features"}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "older.json").write_text(json.dumps(older))
    proc = cli("compare", tmp_path / "old.json", tmp_path / "older.json", "--out", tmp_path / "d", "--no-plot")
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "d" / "compare.csv", newline="") as f:
        assert [r["int8_features"] for r in csv.DictReader(f)] == ["avx2 avx512f avx512_vnni", ""]
    assert "not recorded" in proc.stdout.splitlines()[3]
