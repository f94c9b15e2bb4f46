"""Training under torchrun: 2 gloo processes on this CPU train what 1 process trains, write once, fail together.

Every run is the real command line (``tests/distributed_entry.py``), 1 process started plainly, 2 processes by
``torch.distributed.run``, one thread per process. The runs that are compared train in float64: these tiny
networks amplify float32 rounding (a different sharding of the same sums, or merely 2 threads instead of 1 in a
single process, moved some weights by 1e-4 to 1e-3 after 8 steps), which would blur the comparison; in float64
the same runs agree to 1e-13, while BatchNorm over each process's half batch instead of the global batch moves
weights by 3e-2 to 7e-2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.workstation

from edgeexit.workstation.posttrain import pteenet  # noqa: E402
from edgeexit.workstation.models import zoo  # noqa: E402
from edgeexit.workstation.catalog.checkpoint import load_checkpoint, read_checkpoint  # noqa: E402
from edgeexit.workstation.training.distributed import GlooSyncBatchNorm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENTRY = Path(__file__).with_name("distributed_entry.py")
#: max |2-process - 1-process| of any float64 weight or BatchNorm statistic (measured: <= 1e-13).
TOL = 1e-9
COMMON = ["--epochs", "2", "--batch-size", "64", "--lr", "1e-3", "--val-fraction", "0.2", "--seed", "3"]
BACKBONE = {"num_classes": 10, "in_channels": 1, "small_input": True, "base_width": 4}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from synthetic import synthetic_digits

    images, labels = synthetic_digits(320, seed=11)  # 256 training images = 4 global batches of 64
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, images=images, labels=labels)
    return path


def _launch(nproc: int, argv: list[str], workdir: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """``python argv`` in ``workdir``: 1 process started plainly, more by ``torch.distributed.run``."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return subprocess.run([sys.executable, *launcher, *argv], capture_output=True, text=True, env=full_env,
                          cwd=workdir, timeout=timeout)


def _run(nproc: int, args: list[str], workdir: Path, timeout: float = 150,
         **env: str) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    return _launch(nproc, [str(ENTRY), "-q", *args], workdir, timeout,
                   EDGEEXIT_TEST_WRITES=str(workdir / "writes.log"), **env)


def _pair(tmp_path: Path, args: list[str]) -> tuple[Path, Path]:
    """Checkpoints of the same command run by 1 and by 2 processes; checks both ran and rank 0 alone wrote."""
    paths = []
    for nproc in (1, 2):
        work = tmp_path / f"p{nproc}"
        out = work / "model.pt"
        proc = _run(nproc, [*args, "--output", str(out), "--json", str(work / "metrics.json")], work,
                    EDGEEXIT_TEST_FLOAT64="1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("checkpoint: ") == 1  # one summary, not one per process
        assert (work / "writes.log").read_text().splitlines() == [f"rank 0 {out}"]
        assert sorted(p.name for p in work.iterdir()) == ["metrics.json", "model.pt", "writes.log"]
        paths.append(out)
    return paths[0], paths[1]


def _assert_same_training(one: Path, two: Path) -> dict[str, torch.Tensor]:
    a, b = read_checkpoint(one), read_checkpoint(two)
    assert a["spec"] == b["spec"]
    sa, sb = a["state_dict"], b["state_dict"]
    assert list(sa) == list(sb) and not any(k.startswith("module.") for k in sb)
    for k in sa:
        assert sb[k].dtype == sa[k].dtype and sb[k].shape == sa[k].shape, k
        if sa[k].is_floating_point():
            assert float((sa[k] - sb[k]).abs().max()) < TOL, k
        else:
            assert torch.equal(sa[k], sb[k]), k  # num_batches_tracked: the same number of steps
    assert a["metrics"]["best_epoch"] == b["metrics"]["best_epoch"]
    for ha, hb in zip(a["metrics"]["history"], b["metrics"]["history"]):
        assert hb["val_loss"] == pytest.approx(ha["val_loss"], rel=1e-9)  # reduced over both processes
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-9)
        assert hb["val_final_accuracy"] == ha["val_final_accuracy"]
    model = load_checkpoint(two)  # rebuilds and loads like any checkpoint: plain BatchNorm, no wrapper
    assert not any(isinstance(m, (GlooSyncBatchNorm, torch.nn.SyncBatchNorm)) for m in model.modules())
    return sb


def _onnx_stages(checkpoint: Path, folder: Path) -> list:
    import onnx

    from edgeexit.workstation.conversion.export import export_onnx, split_stages

    folder.mkdir()
    return [onnx.load(str(export_onnx(unit, folder / f"{unit.name}.onnx")))
            for unit in split_stages(load_checkpoint(checkpoint))]


@pytest.mark.parametrize("args", [
    # two-stage: the v0 warm-up leaves the confidence heads unused; shift augmentation; BatchNorm everywhere
    ["--placement", "0,1,2", "--augment", "2"],
    # class-based exits and loss
    ["--placement", "0,1,2", "--head", "class", "--loss", "class"],
], ids=["eenet-two-stage", "class-exits"])
def test_two_processes_train_the_same_weights_as_one(tmp_path, digits, args):
    one, two = _pair(tmp_path, ["train", "--dataset", str(digits), *COMMON, *args])
    _assert_same_training(one, two)
    if "--augment" in args:  # the conversion's first step sees the same graphs and (float32) weights
        from onnx import numpy_helper

        for ga, gb in zip(_onnx_stages(one, tmp_path / "onnx1"), _onnx_stages(two, tmp_path / "onnx2")):
            assert [n.op_type for n in ga.graph.node] == [n.op_type for n in gb.graph.node]
            wa = {t.name: numpy_helper.to_array(t) for t in ga.graph.initializer}
            wb = {t.name: numpy_helper.to_array(t) for t in gb.graph.initializer}
            assert wa.keys() == wb.keys()
            for k in wa:
                np.testing.assert_allclose(wb[k], wa[k], rtol=0, atol=1e-6, err_msg=k)


def _backbone_weights(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    backbone = zoo.build_backbone("resnet18", **BACKBONE).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(backbone.state_dict(), path)
    return backbone, path


def test_post_train_on_two_processes_keeps_the_backbone_bit_identical(tmp_path, digits):
    backbone, weights = _backbone_weights(tmp_path)
    options = [a for k, v in BACKBONE.items() for a in ("--backbone-option", f"{k}={v}")]
    one, two = _pair(tmp_path, ["post-train", "--backbone", "resnet18", "--backbone-weights", str(weights), *options,
                                "--dataset", str(digits), "--exits-after", "layer1,layer2", "--branch", "conv1",
                                *COMMON])
    state = _assert_same_training(one, two)
    torch.set_default_dtype(torch.float64)  # as the compared runs build it
    try:
        untrained = pteenet.attach_branches(backbone.double(), (1, 28, 28), [str(i) for i in range(10)],
                                            exits_after=["layer1", "layer2"], branch="conv1").state_dict()
    finally:
        torch.set_default_dtype(torch.float32)
    frozen = [k for k in untrained if ".segment." in k or k.startswith(f"stages.{2}.head.")]
    assert len(frozen) > 50
    for k in frozen:
        assert torch.equal(state[k], untrained[k]), k  # weights and BatchNorm statistics, bit for bit
    trained = [k for k in untrained if k.startswith("stages.0.head.") and untrained[k].is_floating_point()]
    assert any(not torch.equal(state[k], untrained[k]) for k in trained)
    assert read_checkpoint(two)["metrics"]["backbone_sha256"] == read_checkpoint(one)["metrics"]["backbone_sha256"]


def test_sweep_on_two_processes_writes_each_file_once(tmp_path, digits):
    work = tmp_path / "sweep"
    proc = _run(2, ["sweep", "--dataset", str(digits), *COMMON, "--placement", "0,1", "--lambdas", "0.5,1",
                    "--output-dir", str(work / "out")], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted((work / "writes.log").read_text().splitlines()) == \
        sorted(f"rank 0 {work / 'out' / f'lambda_{lam}.pt'}" for lam in ("0.5", "1"))
    assert len((work / "out" / "sweep.csv").read_text().splitlines()) == 3
    assert proc.stdout.count("written: ") == 1


@pytest.mark.parametrize("command", ["train", "post-train"])
def test_a_failing_process_ends_the_whole_run_with_an_error(tmp_path, digits, command):
    args = ["train", "--placement", "0,1,2"] if command == "train" else \
        ["post-train", "--backbone", "resnet18", "--backbone-weights", str(_backbone_weights(tmp_path)[1]),
         *[a for k, v in BACKBONE.items() for a in ("--backbone-option", f"{k}={v}")], "--exits-after", "layer1"]
    work = tmp_path / "run"
    out = work / "model.pt"
    # rank 1 dies in its third step while rank 0 waits for its gradients; the subprocess timeout is the hang check
    proc = _run(2, [*args, "--dataset", str(digits), *COMMON, "--output", str(out)], work, timeout=120,
                EDGEEXIT_TEST_FAIL_RANK="1", EDGEEXIT_DIST_TIMEOUT="60")
    assert proc.returncode != 0
    assert "injected failure in rank 1" in proc.stderr
    assert not out.exists() and not (work / "writes.log").exists()
    assert sorted(p.name for p in work.iterdir()) == []


def test_a_global_batch_that_does_not_split_evenly_is_a_one_line_error(tmp_path, digits):
    work = tmp_path / "run"
    proc = _run(2, ["train", "--dataset", str(digits), "--placement", "0,1", "--batch-size", "33",
                    "--output", str(work / "m.pt")], work, timeout=120)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert errors and all("--batch-size 33 is not divisible by the 2 processes" in ln for ln in errors)
    assert "Traceback" not in "\n".join(ln for ln in proc.stderr.splitlines() if ln.startswith("[rank"))
    assert not (work / "m.pt").exists()


_DDP_EXIT = """
import torch
from torch import nn

from edgeexit.workstation.training import distributed

with distributed.session() as info:
    torch.manual_seed(0)
    net = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                                                            nn.Linear(4 * 26 * 26, 10)))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 1, 28, 28)).square().mean().backward()
        opt.step()
    del net, opt  # as a command returning from training: unreachable, but held by reference cycles
open(f"done{info.rank}", "w").close()
"""


def test_every_process_exits_cleanly_after_distributed_training(tmp_path):
    """A command that trained under DDP leaves the group so that no process aborts on its way out.

    Before the session collected garbage on leaving, 6 of 30 of these runs ended in a gloo abort at exit
    (exit -6); each run here has that chance, so 10 runs catch the defect with probability about 0.9."""
    script = tmp_path / "ddp_exit.py"
    script.write_text(_DDP_EXIT)
    for run in range(10):
        for rank in (0, 1):
            (tmp_path / f"done{rank}").unlink(missing_ok=True)
        proc = _launch(2, [str(script)], tmp_path, timeout=120)
        assert proc.returncode == 0, f"run {run}: {proc.stderr[-2000:]}"
        assert (tmp_path / "done0").exists() and (tmp_path / "done1").exists()  # both ran to the end


def test_mixed_precision_is_a_cuda_option_and_cpu_training_stays_float32():
    from synthetic import synthetic_digits

    from edgeexit.datasets import ImageSet
    from edgeexit.workstation.catalog.registry import create
    from edgeexit.workstation.training.train import TrainConfig, train

    labels = tuple(str(i) for i in range(10))
    train_set = ImageSet(*synthetic_digits(128, seed=1), labels, "train")
    val_set = ImageSet(*synthetic_digits(32, seed=2), labels, "val")
    runs = []
    for amp in (False, True):
        torch.manual_seed(0)
        model = create("eenet-small", layers=[[8, 2, 0], [16, 2, 0]], placement=[0, 1], num_classes=10,
                       labels=list(labels), input_shape=[1, 28, 28], mean=[0.5], std=[0.5])
        runs.append(train(model, train_set, val_set, TrainConfig(epochs=2, batch_size=32, device="cpu", amp=amp)
                          ).model.state_dict())
    assert all(v.dtype != torch.bfloat16 and v.dtype != torch.float16 for v in runs[1].values())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # --amp on CPU: the float32 run, bit for bit
