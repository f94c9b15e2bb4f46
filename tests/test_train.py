"""Training, evaluation, checkpoints and the train/sweep CLI on tiny models and a few hundred images."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # workstation-only tests: skipped in the device environments
pytestmark = pytest.mark.workstation
import torch

from edgeexit.workstation.catalog.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from edgeexit.workstation.models.costs import ModelCosts
from edgeexit.workstation.catalog.registry import create
from edgeexit.workstation.training.train import ExitTrace, TrainConfig, evaluate, summarize, train
from edgeexit.datasets import load_dataset, train_val_split
from edgeexit.errors import CheckpointError, UsageError

TINY = dict(layers=[[8, 2, 0], [16, 2, 0], [16, 1, 0]], placement=[0, 1, 2])
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist_small():
    return train_val_split(load_dataset("mnist", "train", limit=600), 0.2, seed=0)


@pytest.fixture(scope="module")
def trained(mnist_small):
    tr, va = mnist_small
    torch.manual_seed(0)
    return train(create("eenet-small", **TINY), tr, va, TrainConfig(epochs=2, seed=1, lr=1e-2, batch_size=32))


def test_training_learns_and_keeps_the_best_epoch(trained, mnist_small):
    assert trained.best_epoch == 2  # two-stage: only the v2 epoch counts
    assert [h["loss"] for h in trained.history] == ["v0", "v2"]
    summary = evaluate(trained.model, mnist_small[1])
    assert max(summary.exit_accuracy) > 0.5  # far above the 10% of chance after 30 steps
    # the returned weights are the best epoch's: they reproduce that epoch's recorded validation accuracy
    assert summary.final_accuracy == pytest.approx(trained.history[trained.best_epoch - 1]["val_final_accuracy"])
    assert not trained.model.training


def test_training_is_deterministic_on_cpu(mnist_small, trained):
    tr, va = mnist_small
    torch.manual_seed(0)
    again = train(create("eenet-small", **TINY), tr, va, TrainConfig(epochs=2, seed=1, lr=1e-2, batch_size=32))
    for (k, a), b in zip(trained.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k


class _Stop(Exception):
    pass


def test_training_stopped_mid_epoch_resumes_to_the_same_weights(mnist_small, tmp_path):
    """A run killed in epoch 3 of 4 continues from the end of epoch 2 and ends bit-identical to an
    uninterrupted run (weights, optimiser moments, schedule, augmentation draws and best epoch all restored)."""
    tr, va = mnist_small
    cfg = TrainConfig(epochs=4, warmup_epochs=1, seed=3, lr=1e-2, batch_size=32, augment_shift=2)

    def fresh():
        torch.manual_seed(0)
        return create("eenet-small", **TINY)

    whole = train(fresh(), tr, va, cfg)
    state = tmp_path / "run.state"

    def stop_in_epoch_3(phase, done, total):
        if phase.startswith("epoch 3/") and done > total // 2:
            raise _Stop

    with pytest.raises(_Stop):
        train(fresh(), tr, va, cfg, progress=stop_in_epoch_3, state_path=state)
    assert state.is_file()
    resumed = train(fresh(), tr, va, cfg, state_path=state)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.best_epoch == whole.best_epoch
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in whole.history]
    # a finished state resumes to the end at once (nothing is trained twice) with the same result
    again = train(fresh(), tr, va, cfg, state_path=state)
    assert torch.equal(next(iter(again.model.state_dict().values())), next(iter(whole.model.state_dict().values())))
    # a state from other settings is refused, not mixed in
    other = TrainConfig(epochs=4, warmup_epochs=1, seed=4, lr=1e-2, batch_size=32, augment_shift=2)
    with pytest.raises(UsageError, match="other settings"):
        train(fresh(), tr, va, other, state_path=state)
    state.write_bytes(b"junk")
    with pytest.raises(UsageError, match="not readable"):
        train(fresh(), tr, va, cfg, state_path=state)


def test_class_based_training_and_frozen_trunk(mnist_small):
    tr, va = mnist_small
    model = create("eenet-small", head="class", **TINY)
    res = train(model, tr, va, TrainConfig(epochs=1, loss="class"))
    assert evaluate(res.model, va).num_samples == len(va)
    before = {k: v.clone() for k, v in res.model.stages[0].segment.state_dict().items()}
    frozen = train(res.model, tr, va, TrainConfig(epochs=1, loss="class", freeze_trunk=True))
    for k, v in frozen.model.stages[0].segment.state_dict().items():
        assert torch.equal(v, before[k]), k  # PTEENet: weights and BN statistics untouched
    with pytest.raises(UsageError, match="needs EENet heads"):
        train(create("eenet-small", head="class", **TINY), tr, va, TrainConfig(epochs=1, loss="v2"))


def test_summarize_by_hand():
    # 2 exits, 4 samples, K=2. exit 0 scores [0.9, 0.2, 0.7, 0.4] -> samples 0 and 2 leave at T=0.5.
    logits = np.array([[[2, 0], [2, 0], [0, 2], [0, 2]],      # exit 0 predicts 0, 0, 1, 1
                       [[2, 0], [0, 2], [2, 0], [0, 2]]], np.float32)  # exit 1 predicts 0, 1, 0, 1
    trace = ExitTrace(logits, np.array([[0.9, 0.2, 0.7, 0.4], [0.0, 0.0, 0.0, 0.0]]), np.array([0, 1, 0, 1]))
    costs = ModelCosts((20, 70), (10, 10), (0, 0), (0, 0))    # full = 100; kappa0 = 0.3, cumulative1 = 1.1
    s = summarize(trace, costs, 0.5)
    assert s.exit_accuracy == [0.5, 1.0]
    assert s.exit_share == [0.5, 0.5]
    assert s.early_exit_accuracy == 0.75                       # sample 2 left early and was wrong
    assert s.avg_cost == pytest.approx((0.3 + 1.1 + 0.3 + 1.1) / 4)
    assert s.avg_cost_kappa == pytest.approx((0.3 + 1.0 + 0.3 + 1.0) / 4)
    assert "early exit at T=0.5: accuracy 75.00%" in s.table()


def test_checkpoint_round_trip_reproduces_outputs(trained, tmp_path):
    path = save_checkpoint(trained.model, tmp_path / "m.pt", {"note": "x"})
    loaded = load_checkpoint(path)
    x = trained.model.example_input(3).normal_()
    for a, b in zip(trained.model(x), loaded(x)):
        assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["confidence"], b["confidence"])
    payload = read_checkpoint(path)
    assert payload["metrics"] == {"note": "x"} and payload["costs"]["kappa"][-1] == 1.0
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file is gone
    with pytest.raises(UsageError, match="already exists"):
        save_checkpoint(trained.model, path)


def test_checkpoint_errors(trained, tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    good = save_checkpoint(trained.model, tmp_path / "good.pt")
    payload = torch.load(good, weights_only=True)
    payload["state_dict"].pop(next(iter(payload["state_dict"])))
    torch.save(payload, tmp_path / "mismatch.pt")
    payload["version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    cases = {"garbage.pt": "not a readable checkpoint", "other.pt": "not an edgeexit checkpoint",
             "mismatch.pt": "do not fit the architecture", "future.pt": "format version 99",
             "missing.pt": "does not exist"}
    for name, match in cases.items():
        with pytest.raises(CheckpointError, match=match) as info:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- CLI

def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "edgeexit", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    data = load_dataset("mnist", "test", limit=300)
    path = tmp_path_factory.mktemp("npz") / "digits.npz"
    np.savez(path, images=data.images, labels=data.labels)
    return path


@pytest.mark.parametrize("args,match", [
    (["--model", "vgg16"], "unknown model 'vgg16'; expected one of eenet-small"),
    (["--dataset", "imagenet-21k"], "unknown dataset 'imagenet-21k'"),
    (["--dataset", "{empty}"], "no images found"),
    (["--lambda", "-1"], "lambda >= 0"),
    (["--placement", "1,x"], "neither a scheme"),
    (["--output", "{existing}"], "already exists; pass --force"),
], ids=["model", "dataset", "empty-folder", "lambda", "placement", "existing-output"])
def test_cli_errors_are_one_line(tmp_path, args, match):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "existing.pt").write_bytes(b"")
    args = [a.format(empty=tmp_path / "empty", existing=tmp_path / "existing.pt") for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out.pt")]
    proc = _cli("train", *args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out.pt").exists()


def test_cli_train_writes_checkpoint_and_table(tmp_path, tiny_npz):
    out = tmp_path / "m.pt"
    proc = _cli("-q", "train", "--dataset", str(tiny_npz), "--placement", "0,1,2", "--epochs", "2",
                "--val-fraction", "0.2", "--batch-size", "32", "--output", str(out), "--json", str(tmp_path / "m.json"))
    assert proc.returncode == 0, proc.stderr
    assert "early exit at T=0.5" in proc.stdout and "no test split" in proc.stdout
    model = load_checkpoint(out)
    assert model.num_exits == 4 and model.spec.labels == [str(i) for i in range(10)]  # 0,1,2 + the final block
    assert (tmp_path / "m.json").exists()


def test_cli_sweep_writes_csv_and_json(tmp_path, tiny_npz):
    proc = _cli("-q", "sweep", "--dataset", str(tiny_npz), "--placement", "0,1", "--epochs", "2",
                "--lambdas", "0.2,2", "--train-limit", "200", "--output-dir", str(tmp_path / "sw"))
    assert proc.returncode == 0, proc.stderr
    csv_lines = (tmp_path / "sw" / "sweep.csv").read_text().splitlines()
    assert csv_lines[0].startswith("lambda,final_accuracy") and len(csv_lines) == 3
    assert (tmp_path / "sw" / "lambda_2.pt").exists()
    again = _cli("sweep", "--lambdas", "1", "--output-dir", str(tmp_path / "sw"))
    assert again.returncode != 0 and again.stderr.startswith("error: ") and "--force" in again.stderr


def test_random_shift_moves_images_and_pads_with_fill():
    from edgeexit.workstation.training.data import random_shift

    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4) + 1
    gen = torch.Generator().manual_seed(0)
    out = random_shift(x, 1, gen, fill=torch.full((1, 1, 1, 1), -5.0))
    assert out.shape == x.shape
    for i in range(2):
        padded = torch.nn.functional.pad(x[i, 0], (1, 1, 1, 1), value=-5.0)
        crops = [padded[dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i, 0], c) for c in crops)
    assert torch.equal(random_shift(x, 0, gen), x)
