"""Class-based early exit: the authors' beta search and exclusion statistics on hand-made traces."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")  # workstation-only tests: skipped in the device environments
pytestmark = pytest.mark.workstation

from edgeexit.workstation.posttrain.classexit import beta_search, exclusion_stats
from edgeexit.errors import UsageError
from edgeexit.runtime.trace import Trace

K = 3
N = 1000


def _trace(early: np.ndarray, labels: np.ndarray) -> Trace:
    final = np.full((len(labels), K), -5.0, np.float32)
    final[np.arange(len(labels)), labels] = 5.0  # the final classifier is always right: baseline 100%
    return Trace(logits=(early.astype(np.float32), final), confidence=(None, None), scores=("sigmoid", "softmax"),
                 labels=labels)


def _confident_exit(labels: np.ndarray) -> np.ndarray:
    z = np.full((len(labels), K), -10.0, np.float32)
    z[np.arange(len(labels)), labels] = 10.0
    return z


def test_beta_rises_to_the_cap_when_exclusion_never_hurts():
    labels = np.arange(N) % K
    result = beta_search(_trace(_confident_exit(labels), labels))
    assert result.betas == (0.99,)
    assert result.accuracy == result.baseline_accuracy == 1.0
    assert result.exit_fractions == [1.0, 0.0]  # one class left after the first exit for every input


def test_beta_backs_off_two_steps_from_the_first_failing_value():
    labels = np.arange(N) % K
    z = _confident_exit(labels)
    # 5 inputs (0.5 pp): a wrong class scores sigmoid(10) ~ 1, the right one sigmoid(0) = 0.5. The right class
    # is excluded once beta * 0.99995 >= 0.5, i.e. from beta = 0.51: the search must stop at 0.51 - 0.02.
    for i in range(5):
        wrong = (labels[i] + 1) % K
        z[i, labels[i]], z[i, wrong] = 0.0, 10.0
    result = beta_search(_trace(z, labels))
    assert result.betas == (0.49,)
    assert result.accuracy == 1.0
    tried = dict(result.history[0])
    assert tried[0.5] == 1.0 and tried[0.51] == pytest.approx(1.0 - 5 / N)
    assert max(tried) == 0.51  # nothing tried after the first failure


def test_tolerance_of_a_tenth_of_a_point_is_allowed():
    labels = np.arange(N) % K
    z = _confident_exit(labels)
    wrong = (labels[0] + 1) % K
    z[0, labels[0]], z[0, wrong] = 0.0, 10.0  # one input = 0.1 pp: not below baseline - 0.1 pp
    result = beta_search(_trace(z, labels), tolerance=0.0015)
    assert result.betas == (0.99,)


def test_beta_clamps_to_the_minimum_when_the_first_step_fails():
    labels = np.arange(N) % K
    z = _confident_exit(labels)
    z[:20] = _confident_exit((labels[:20] + 1) % K)  # confidently wrong: excluded at any beta
    result = beta_search(_trace(z, labels))
    assert result.betas == (0.01,)


def test_exclusion_stats_count_removed_classes():
    labels = np.arange(N) % K
    z = np.zeros((N, K), np.float32)  # all classes tie at the first exit: nothing excluded, nobody exits
    stats = exclusion_stats(_trace(z, labels), [0.5])
    assert stats.excluded_mean[0] == 0.0 and stats.remaining_mean[0] == K and stats.exited == [0.0, 1.0]
    stats = exclusion_stats(_trace(_confident_exit(labels), labels), [0.5])
    assert stats.excluded_mean[0] == K - 1 and stats.exited == [1.0, 0.0] and stats.reached == [1.0, 0.0]


def test_search_needs_labels():
    labels = np.arange(10) % K
    trace = _trace(_confident_exit(labels), labels)
    with pytest.raises(UsageError, match="labelled"):
        beta_search(Trace(trace.logits, trace.confidence, trace.scores, labels=None))


# ---- class exits on a frozen backbone: the whole-map ("spatial") head ----------------------------------------

LABELS = [str(i) for i in range(10)]
DESC = {"arch": "resnet18", "options": {"num_classes": 10, "in_channels": 1, "small_input": True, "base_width": 4}}


def _backbone(seed: int = 0):
    import torch

    from edgeexit.workstation.models import zoo

    torch.manual_seed(seed)
    return zoo.build_backbone(DESC["arch"], **DESC["options"]).eval()


def _spatial_class_model(exits_after=("layer1", "layer2"), hidden=6):
    import torch

    from edgeexit.workstation.posttrain.classexit import attach_class_exits

    model = attach_class_exits(_backbone(), (1, 28, 28), LABELS, head="spatial", hidden=hidden,
                               exits_after=list(exits_after), backbone_desc=DESC)
    torch.manual_seed(1)
    with torch.no_grad():  # non-default BatchNorm statistics, so a rebuild that dropped them would show
        for stage in model.stages[:-1]:
            bn = stage.head.body[1]
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model


def test_spatial_class_exits_read_the_whole_map_and_rebuild_from_spec_and_checkpoint(tmp_path):
    import torch

    from edgeexit.workstation.catalog.checkpoint import load_checkpoint, save_checkpoint
    from edgeexit.workstation.models.heads import SpatialClassHead
    from edgeexit.workstation.catalog.registry import build

    model = _spatial_class_model()
    x = torch.randn(3, 1, 28, 28)
    feats = model.stages[0].segment(x)
    head = model.stages[0].head
    assert isinstance(head, SpatialClassHead) and head.scores == "sigmoid" and not head.has_confidence
    assert head.body[0].kernel_size == tuple(feats.shape[2:]) and head.body[0].out_channels == 6
    assert model.spec.kwargs["class_head_kind"] == "spatial" and model.spec.kwargs["hidden"] == 6
    save_checkpoint(model, tmp_path / "ce.pt")
    for rebuilt in (build(model.spec), load_checkpoint(tmp_path / "ce.pt")):
        assert [type(s.head) for s in rebuilt.stages[:-1]] == [SpatialClassHead, SpatialClassHead]
        rebuilt.load_state_dict(model.state_dict(), strict=True)
        rebuilt.eval()
        with torch.no_grad():
            for a, b in zip(model(x), rebuilt(x)):
                assert torch.equal(a["logits"], b["logits"])


@pytest.mark.parametrize("hidden", [0, -3, 2.5, "16", True], ids=["zero", "negative", "float", "str", "bool"])
def test_bad_hidden_width_is_a_one_line_usage_error(hidden):
    from edgeexit.workstation.posttrain.classexit import attach_class_exits

    with pytest.raises(UsageError, match="hidden") as info:
        attach_class_exits(_backbone(), (1, 28, 28), LABELS, head="spatial", hidden=hidden, exits_after=["layer1"])
    assert "\n" not in str(info.value)


def test_hidden_or_an_unknown_kind_on_a_pooled_class_head_is_refused():
    from edgeexit.workstation.posttrain.classexit import attach_class_exits

    with pytest.raises(UsageError, match="hidden=8 applies only"):
        attach_class_exits(_backbone(), (1, 28, 28), LABELS, head="pool", hidden=8, exits_after=["layer1"])
    with pytest.raises(UsageError, match="unknown class head kind 'conv'"):
        attach_class_exits(_backbone(), (1, 28, 28), LABELS, head="conv", exits_after=["layer1"])


def test_post_train_cli_builds_spatial_class_exits(tmp_path):
    import subprocess
    import sys

    import torch
    from click.testing import CliRunner

    from edgeexit.workstation.catalog.checkpoint import load_checkpoint
    from edgeexit.workstation.models.heads import SpatialClassHead
    from edgeexit.workstation.cli.posttrain import post_train
    from synthetic import synthetic_digits

    images, labels = synthetic_digits(160, seed=5)
    np.savez(tmp_path / "tiny.npz", images=images, labels=labels)
    torch.save(_backbone().state_dict(), tmp_path / "bb.pth")
    common = ["--backbone", "resnet18", "--backbone-weights", str(tmp_path / "bb.pth"),
              "--backbone-option", "small_input=true", "--backbone-option", "base_width=4",
              "--dataset", str(tmp_path / "tiny.npz"), "--exits-after", "layer1", "--branch", "class",
              "--class-head", "spatial", "--epochs", "1", "--batch-size", "64"]
    result = CliRunner().invoke(post_train, common + ["--hidden", "5", "-o", str(tmp_path / "ce.pt")])
    assert result.exit_code == 0, result.output
    model = load_checkpoint(tmp_path / "ce.pt")
    assert isinstance(model.stages[0].head, SpatialClassHead) and model.stages[0].head.body[0].out_channels == 5
    # a bad width, as a user runs it: one line on stderr, the usage exit code, no traceback
    proc = subprocess.run([sys.executable, "-m", "edgeexit", "post-train", *common, "--hidden", "0",
                           "-o", str(tmp_path / "bad.pt")], capture_output=True, text=True)
    assert proc.returncode == UsageError.exit_code
    assert proc.stderr.strip().startswith("error: --hidden 0 must be a positive integer")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # two real stage conversions: well over 30 s on a 2-core machine
def test_spatial_class_exits_convert_and_run_on_the_device_path(tmp_path):
    pytest.importorskip("onnx2tf")
    import torch

    from edgeexit.workstation.posttrain.classexit import tune_bundle_betas
    from edgeexit.workstation.conversion.pipeline import convert
    from edgeexit.runtime.runner import Runner
    from synthetic import synthetic_digits

    model = _spatial_class_model(exits_after=("layer2",), hidden=8)
    calib, _ = synthetic_digits(32, seed=3)
    images, labels = synthetic_digits(40, seed=4)
    convert(model, calib, tmp_path / "bundle", verify_images=images, verify_labels=labels, monolithic=False,
            exit_rule="class_exclusion", thresholds=[0.5], name="classexit-spatial-test")
    runner = Runner(tmp_path / "bundle", power_sensor=None)
    assert [s.scores for s in runner.manifest.stages] == ["sigmoid", "softmax"]
    trace = runner.trace(list(images), labels)
    with torch.no_grad():
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
        float_early = torch.sigmoid(model(x)[0]["logits"]).numpy()
    int8_early = 1 / (1 + np.exp(-trace.logits[0]))
    # the int8 spatial class exit answers like the float one (per-class sigmoid scores within a few steps)
    assert np.max(np.abs(int8_early - float_early)) < 0.1
    assert np.mean(int8_early.argmax(1) == float_early.argmax(1)) >= 0.9
    result, _ = tune_bundle_betas(tmp_path / "bundle", images, labels)
    assert Runner(tmp_path / "bundle", power_sensor=None).manifest.exit_rule.thresholds == result.betas
