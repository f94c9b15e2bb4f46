"""A board owner's day with the device CLI, as a user runs it (a subprocess; no torch needed).

Typos get a suggestion, every option is checked before long work, `run --keep-going` goes on past a bad file,
`run` and `bench` share one resize policy, workstation commands on a device install say so in one line, `run`
and `info` print headers and readable numbers, exit costs name the machine that timed them, `compare` tells
runs apart, files get the user's umask (a service account reads a bundle its owner made and tuned), the bench
plot's labels neither overlap nor leave the figure, and progress has an ETA.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.runtime  # numpy, Pillow, click and a TFLite interpreter only (device/legacy runs)

ROOT = Path(__file__).resolve().parents[1]
XNNPACK_LINE = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


def cli(*args: object, umask: int | None = None, user: int | None = None) -> subprocess.CompletedProcess:
    """``edgeexit ARGS`` in a subprocess; ``user``: as that uid/gid (setpriv), ``umask``: with that umask."""
    prefix = ([shutil.which("setpriv") or "setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
              if user is not None else [])
    return subprocess.run([*prefix, sys.executable, "-m", "edgeexit", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=180,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def one_error(proc: subprocess.CompletedProcess, code: int, *parts: str) -> str:
    lines = errors(proc)
    assert proc.returncode == code and len(lines) == 1, proc.stderr
    assert all(p in lines[0] for p in parts), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def images(bundle_dir, tmp_path_factory) -> dict[str, Path]:
    """PNG files: two of the bundle's size and mode, one larger colour image, one truncated file."""
    from PIL import Image

    m = json.loads((bundle_dir / "manifest.json").read_text())
    h, w = m["input"]["preprocessing"]["size"]
    mode = m["input"]["preprocessing"]["color_mode"]
    rng = np.random.default_rng(3)
    d = tmp_path_factory.mktemp("board-images")
    out = {}
    for name in ("ok", "ok2"):
        out[name] = d / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").convert(mode).save(out[name])
    out["big"] = d / "big.png"
    Image.fromarray(rng.integers(0, 256, (h + 12, w + 4, 3), dtype=np.uint8), "RGB").save(out["big"])
    out["corrupt"] = d / "corrupt.png"
    out["corrupt"].write_bytes(out["ok"].read_bytes()[:60])
    return out


@pytest.fixture(scope="module")
def labelled(bundle_dir, tmp_path_factory) -> dict[str, Path]:
    """.npz sets: 'fit' of the bundle's input shape, 'other' 4 pixels larger."""
    m = json.loads((bundle_dir / "manifest.json").read_text())
    h, w = m["input"]["preprocessing"]["size"]
    c = 1 if m["input"]["preprocessing"]["color_mode"] == "L" else 3
    rng = np.random.default_rng(5)
    d = tmp_path_factory.mktemp("board-data")
    out = {}
    for name, (hh, ww) in (("fit", (h, w)), ("other", (h + 4, w + 4))):
        out[name] = d / f"{name}.npz"
        n = 240 if name == "fit" else 20  # tune tests a point on 100 images it did not search on
        np.savez(out[name], images=rng.integers(0, 256, (n, hh, ww, c), dtype=np.uint8),
                 labels=rng.integers(0, len(m["labels"]), n))
    return out


def test_typos_get_suggestions(bundle_dir, images):
    line = one_error(cli("run", bundle_dir, images["ok"], "--rule", "max_sofmax"), 2, "did you mean 'max_softmax'?")
    assert "confidence, max_softmax, entropy" in line  # the kinds are listed
    one_error(cli("rnu", bundle_dir, images["ok"]), 2, "did you mean 'run'?")
    one_error(cli("run", bundle_dir, images["ok"], "--board", "rpi44"), 2, "did you mean 'rpi4'?")
    one_error(cli("run", bundle_dir, images["ok"], "--thresholdz", "0.5"), 2, "--thresholds")


def test_point_names_get_suggestions(tiny_bundle_copy, images):
    m = json.loads((tiny_bundle_copy / "manifest.json").read_text())
    rule = m["exit_rule"]
    m.setdefault("operating_points", {})["tuned"] = {"kind": rule["kind"], "thresholds": rule["thresholds"],
                                                     "exit": None}
    (tiny_bundle_copy / "manifest.json").write_text(json.dumps(m))
    line = one_error(cli("run", tiny_bundle_copy, images["ok"], "--rule", "tunde"), 2, "did you mean 'tuned'?")
    assert "operating points (tuned)" in line
    assert cli("run", tiny_bundle_copy, images["ok"], "--rule", "tuned").returncode == 0


def test_run_keep_going_reports_bad_files_and_fails_at_the_end(bundle_dir, images):
    args = ("run", bundle_dir, images["ok"], images["corrupt"], images["ok2"])
    stopped = cli(*args)
    one_error(stopped, 4, "corrupt.png")
    assert [line.split()[0] for line in stopped.stdout.splitlines()[1:]] == [str(images["ok"])]
    going = cli(*args, "--keep-going")
    one_error(going, 4, "corrupt.png")
    header, *rows = going.stdout.splitlines()
    assert header.split()[:3] == ["file", "label", "p(label)"]
    assert [row.split()[0] for row in rows] == [str(images["ok"]), str(images["ok2"])]
    json_going = cli(*args, "--keep-going", "--json")
    assert json_going.returncode == 4 and [json.loads(x)["file"] for x in json_going.stdout.splitlines()] == \
        [str(images["ok"]), str(images["ok2"])]


def test_run_and_bench_share_one_resize_policy(bundle_dir, images, labelled, tmp_path):
    one_error(cli("run", bundle_dir, images["big"]), 4, "big.png", "--resize")
    resized = cli("run", bundle_dir, images["big"], "--resize")
    assert resized.returncode == 0 and "converted to" in resized.stderr and len(resized.stdout.splitlines()) == 2
    one_error(cli("bench", bundle_dir, "--data", labelled["other"], "--no-save"), 5, "--resize")


def test_run_output_has_a_header_and_labelled_columns(bundle_dir, images):
    proc = cli("run", bundle_dir, images["ok"], images["ok2"], "--board", "rpi4")
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert header.split() == ["file", "label", "p(label)", "exit", f"(0..{len(m['stages']) - 1})", "MACs", "ms",
                              "mJ", "(rpi4)"]
    for row in rows:
        cells = row.split()
        assert len(cells) == 7 and 0.0 <= float(cells[2]) <= 1.0 and cells[3].isdigit()
        assert header.index("MACs") + len("MACs") == row.index(cells[4]) + len(cells[4])  # right-aligned under


def test_workstation_commands_on_a_device_install_are_one_line(tmp_path):
    # a device install has no torch: simulate it where torch is installed (a None entry blocks the import)
    code = ("import sys; sys.modules['torch'] = None; from edgeexit.cli.main import entry_point; "
            "entry_point(sys.argv[1:])")
    for argv in (["convert", "m.pt", "--calib", "mnist", "--out", str(tmp_path / "b")],
                 ["train", "--model", "eenet-small", "--dataset", "mnist", "--output", str(tmp_path / "m.pt")],
                 ["post-train", "--help"]):
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        one_error(proc, 2, f"'edgeexit {argv[0]}' needs the workstation install", "torch is not installed")
        assert not (tmp_path / "b").exists()


def test_bench_checks_every_option_before_reading_data(bundle_dir, labelled, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for extra, code, part in ((["--out", blocker / "results"], 2, "--out"),
                              (["--batch-sizes", "0"], 2, "--batch-sizes"),
                              (["--thresholds", "a,b"], 2, "--thresholds"),
                              (["--rule", "entropyy"], 2, "did you mean 'entropy'?"),
                              (["--energy-reps", "0"], 2, "--energy-reps")):
        proc = cli("-v", "bench", bundle_dir, "--data", "no-such-set.npz", *extra)
        one_error(proc, code, part)  # the missing data set is not even looked at


def test_info_prints_readable_numbers_and_training_history(tiny_bundle_copy):
    m = json.loads((tiny_bundle_copy / "manifest.json").read_text())
    n = len(m["stages"]) - 1
    m["exit_rule"] = {"kind": "max_softmax", "thresholds": [0.123456789] * n, "exit": None}
    m["training"] = {"checkpoint": "m.pt", "metrics": {"best_epoch": 7, "history": [
        {"epoch": e, "train_loss": 1.0 / e + 1e-7, "val_final_accuracy": 0.9 + e / 1000.0} for e in range(1, 11)]}}
    (tiny_bundle_copy / "manifest.json").write_text(json.dumps(m))
    proc = cli("info", tiny_bundle_copy)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"exit rule max_softmax thresholds {', '.join(['0.1235'] * n)}" in out and "0.123456789" not in out
    assert "metrics.history (10 rows):" in out and "[{" not in out and '{"' not in out
    table = [line for line in out[out.index("metrics.history"):].splitlines()[1:]]
    table = table[:next(i for i, line in enumerate(table) if not line.startswith("    "))]
    assert table[0].split() == ["epoch", "train_loss", "val_final_accuracy"]
    assert table[1].split() == ["1", "1", "0.901"] and table[-1].split() == ["10", "0.1", "0.91"]
    assert any(line.strip() == "..." for line in table)  # 10 epochs shown as the first and last three


def test_exit_costs_name_their_machine_and_info_warns_elsewhere(tiny_bundle_copy, labelled, tmp_path):
    from edgeexit.bench.envinfo import machine_stamp

    here = machine_stamp()
    proc = cli("bench", tiny_bundle_copy, "--data", labelled["fit"], "--out", tmp_path, "--no-sweep",
               "--batch-sizes", "1", "--repeat", "1", "--warmup", "2", "--json", "--no-plot")
    assert proc.returncode == 0, proc.stderr
    costs = json.loads(proc.stdout)["exit_costs"]
    assert (costs["machine"], costs["cpu"], costs["int8_features"]) == (here["machine"], here["cpu"],
                                                                         here["int8_features"])
    m = json.loads((tiny_bundle_copy / "manifest.json").read_text())
    for machine, features, warned in ((here["machine"], here["int8_features"], False),
                                      ("Raspberry Pi 4 Model B Rev 1.4", ["asimd"], True)):
        m["operating_points"] = {"exit_costs": {**costs, "machine": machine, "int8_features": features}}
        (tiny_bundle_copy / "manifest.json").write_text(json.dumps(m))
        info = cli("info", tiny_bundle_copy)
        assert info.returncode == 0, info.stderr
        assert f"timed on {machine}" in info.stdout
        assert ("warning: the stored exit costs (est. ms) were timed on Raspberry Pi 4" in info.stdout) == warned


def test_compare_tells_runs_apart(bundle_dir, labelled, tmp_path):
    m = json.loads((bundle_dir / "manifest.json").read_text())
    n = len(m["stages"]) - 1
    for rule in ("max_softmax", "entropy"):
        proc = cli("bench", bundle_dir, "--data", labelled["fit"], "--out", tmp_path / "r", "--no-sweep",
                   "--batch-sizes", "1", "--repeat", "1", "--warmup", "0", "--no-points", "--rule", rule,
                   "--thresholds", ",".join(["0.5"] * n), "--board", "rpi4" if rule == "entropy" else "generic")
        assert proc.returncode == 0, proc.stderr
    results = sorted((tmp_path / "r").glob("*.json"))
    assert len(results) == 2
    proc = cli("compare", *results, "--out", tmp_path / "c", "--no-plot")
    assert proc.returncode == 0, proc.stderr
    head, _, *rows = proc.stdout.splitlines()[:4]
    machine = json.loads(results[0].read_text())["environment"]["cpu"] or ""
    assert head.split()[:5] == ["#", "machine", "rule", "time", "file"]
    assert all(machine in row for row in rows)  # the machine column is not cut
    assert {r.name for r in results} == {next(c for c in row.split() if c.endswith(".json")) for row in rows}
    assert any("max_softmax 0.5" in row for row in rows) and any("entropy 0.5" in row for row in rows)


def test_files_get_the_umask_and_a_replaced_file_keeps_its_mode(tmp_path):
    from edgeexit.runtime.atomic import publish_dir, staging_dir, write_file_atomic

    old = os.umask(0o027)
    try:
        with staging_dir(tmp_path / "b") as staged:
            write_file_atomic(staged / "manifest.json", "{}")
            publish_dir(staged, tmp_path / "b")
        assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o750
        assert stat.S_IMODE((tmp_path / "b" / "manifest.json").stat().st_mode) == 0o640
        os.chmod(tmp_path / "b" / "manifest.json", 0o600)  # the owner's choice survives a rewrite
        write_file_atomic(tmp_path / "b" / "manifest.json", "{}")
        assert stat.S_IMODE((tmp_path / "b" / "manifest.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root (to run as a second uid) and setpriv")
def test_service_account_reads_a_bundle_made_and_tuned_by_its_owner(bundle_dir, labelled, images):
    """Root makes a bundle (the converter's staging + publish) and tunes it under umask 022; nobody reads it."""
    from edgeexit.workstation.conversion.bundle_writer import publish

    nobody = 65534
    base = Path(tempfile.mkdtemp(prefix="edgeexit-srv-"))
    try:
        os.chmod(base, 0o755)  # like /srv/models
        old = os.umask(0o022)
        try:
            from edgeexit.runtime.atomic import staging_dir

            with staging_dir(base / "bundle") as staged:
                for f in bundle_dir.iterdir():
                    if f.is_file() and f.name != "manifest.sig":
                        shutil.copyfile(f, staged / f.name)  # the converter writes its files with plain open()
                publish(staged, base / "bundle", force=False)
        finally:
            os.umask(old)
        tuned = cli("tune", base / "bundle", "--data", labelled["fit"], "--cost-images", "20", "--risk", "1",
                    umask=0o022)  # random labels: a point estimate (no guarantee to find)
        assert tuned.returncode == 0, tuned.stderr
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [base / "bundle", *(base / "bundle").iterdir()]
                 if not p.name.startswith(".")}
        assert modes["bundle"] == 0o755 and modes["manifest.json"] == 0o644, modes
        info = cli("info", base / "bundle", user=nobody)
        assert info.returncode == 0, info.stderr
        assert "tuned" in info.stdout
        shutil.copyfile(images["ok"], base / "ok.png")  # pytest's own directories are root's alone
        run = cli("run", base / "bundle", base / "ok.png", "--rule", "tuned", user=nobody)
        assert run.returncode == 0 and len(run.stdout.splitlines()) == 2, run.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_bench_plot_labels_neither_overlap_nor_leave_the_figure():
    pytest.importorskip("matplotlib")
    from edgeexit.bench.plot import headline, tradeoff_figure

    path = sorted((ROOT / "benchmarks" / "results" / "demo").glob("*.json"))[0]
    result = json.loads(path.read_text())
    fig = tradeoff_figure(result)
    try:
        renderer = fig.canvas.get_renderer()
        whole = fig.bbox
        axes = fig.axes[:3]
        boxes = []
        for ax in axes:
            inside = ax.get_window_extent(renderer)
            notes = [t.get_window_extent(renderer) for t in ax.texts]
            assert notes, "no point annotated"
            assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 and b.y1 <= inside.y1
                       for b in notes)
            boxes += [(ax, b) for b in notes]
            label = ax.xaxis.label.get_window_extent(renderer)
            assert whole.x0 <= label.x0 and label.x1 <= whole.x1  # not cut at the figure's edge
        for i, (ax, a) in enumerate(boxes):  # annotations of one panel do not cover each other
            assert not any(ax is bx and a.overlaps(b) for bx, b in boxes[i + 1:])
        xlabels = [ax.xaxis.label.get_window_extent(renderer) for ax in axes]
        assert all(not a.overlaps(b) for a, b in zip(xlabels, xlabels[1:]))  # panels' axis labels apart
        assert fig._suptitle.get_text().splitlines()[0] == headline(result)
        assert "faster than the monolithic int8 model" in headline(result)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_progress_shows_count_percent_and_eta():
    from edgeexit.progress import StderrProgress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    now = [0.0]
    tty = Tty()
    p = StderrProgress(labels={"timed": "timed pass"}, stream=tty, clock=lambda: now[0])
    for done in range(0, 101, 10):
        now[0] = done * 0.1  # 10 s for 100 inputs
        p("timed", done, 100)
    text = tty.getvalue()
    assert "timed pass: 50/100 (50%), 5 s, ETA 5 s" in text and text.endswith("100/100 (100%), done in 10 s\n")
    log = io.StringIO()  # not a terminal: a start line, then a line with the ETA every LOG_EVERY_S seconds
    p = StderrProgress(labels={"timed": "timed pass"}, stream=log, clock=lambda: now[0])
    for done in range(0, 101):
        now[0] = done * 0.5
        p("timed", done, 100)
    lines = log.getvalue().splitlines()
    assert lines[0] == "timed pass: 100 inputs ..." and "20/100 (20%), 10 s, ETA 40 s" in lines[1]
    assert lines[-1] == "timed pass: 100/100 (100%), done in 50 s" and len(lines) == 1 + 4 + 1


def test_bench_throughput_reports_while_it_runs(bundle_dir, labelled):
    from edgeexit.bench.bench import BenchSettings, run_benchmark
    from edgeexit.datasets import load_dataset

    seen: list[tuple[str, int, int]] = []
    run_benchmark(bundle_dir, load_dataset(str(labelled["fit"])),
                  BenchSettings(warmup=0, repeat=1, sweep=False, points=False, batch_sizes=(1, 8)),
                  progress=lambda phase, done, total: seen.append((phase, done, total)))
    throughput = [(d, t) for phase, d, t in seen if phase == "throughput"]
    assert len(throughput) > 10 and throughput[0][0] < throughput[0][1] and throughput[-1][0] == throughput[-1][1]
    assert [d for d, _ in throughput] == sorted(d for d, _ in throughput)
    assert any(phase == "overhead" for phase, _, _ in seen)
