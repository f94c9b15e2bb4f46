"""Early-exit networks that arrive as multi-output ONNX files, written, trained and exported as their users would.

* ``Plain`` (logits-only exits; exported by the TorchScript exporter with a fixed batch of 1): conv blocks,
  exits 0 and 1 on global average pools, the final classifier on the flattened last map.
* ``Confident`` (exported by the dynamo exporter with a dynamic batch): early exits return
  (sigmoid confidence, logits), the final one logits only.
* ``KerasLike`` (NHWC input, as Keras exports it): the input is transposed to NCHW first, dense layers are
  ``x @ W + b`` (MatMul + Add), the exits end in softmax, the last one flattens the NHWC map.

Everything is checked against the ONNX files run by onnxruntime, the MACs against a count of the networks' own
layers.
"""

from __future__ import annotations

import json

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from edgeexit.errors import ConversionError, UsageError  # noqa: E402
from edgeexit.workstation.own.onnx_network import onnx_to_torch, stage_onnx  # noqa: E402
from test_user_network import (CALIB, DECISIONS, MEAN, SHAPE, STD, TOP1, VERIFY, _check_on_runner, _cli,  # noqa: E402
                               _npz, _thresholds, check_scores, digits, exits_of, macs_by_module, research, seeded,
                               to_tensor, total, train)

pytestmark = pytest.mark.workstation


class Plain(nn.Module):
    def __init__(self, k: int = 10):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.b2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.b3 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.e1, self.e2, self.e3 = nn.Linear(8, k), nn.Linear(16, k), nn.Linear(16 * 4 * 4, k)

    def forward(self, x):
        h1 = self.b1(x)
        h2 = self.b2(h1)
        h3 = self.b3(h2)
        return self.e1(h1.mean((2, 3))), self.e2(F.adaptive_avg_pool2d(h2, 1).flatten(1)), self.e3(h3.flatten(1))


class Confident(nn.Module):
    def __init__(self, k: int = 10):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.b2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.b3 = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.c1, self.l1 = nn.Linear(8, 1), nn.Linear(8, k)
        self.c2, self.l2 = nn.Linear(16, 1), nn.Linear(16, k)
        self.l3 = nn.Linear(24, k)

    def forward(self, x):
        h1 = self.b1(x)
        p1 = h1.mean((2, 3))
        h2 = self.b2(h1)
        p2 = h2.mean((2, 3))
        return (torch.sigmoid(self.c1(p1)), self.l1(p1)), (torch.sigmoid(self.c2(p2)), self.l2(p2)), \
            self.l3(self.b3(h2).mean((2, 3)))


class KerasLike(nn.Module):
    """What a Keras model looks like in ONNX: NHWC in, a transpose to NCHW, Dense = x @ W + b, softmax outputs."""

    def __init__(self, k: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        g = torch.Generator().manual_seed(3)
        self.w1, self.b1 = nn.Parameter(torch.randn(8, k, generator=g) * 0.3), nn.Parameter(torch.zeros(k))
        self.w2, self.b2 = nn.Parameter(torch.randn(12, k, generator=g) * 0.3), nn.Parameter(torch.zeros(k))
        self.w3, self.b3 = nn.Parameter(torch.randn(4 * 4 * 16, k, generator=g) * 0.05), nn.Parameter(torch.zeros(k))
        self.softmax = False  # the exported model ends every exit in a softmax (Dense(K, activation="softmax"))

    def forward(self, x):  # x: [N, H, W, C]
        h = torch.relu(self.conv1(x.permute(0, 3, 1, 2)))
        h = F.max_pool2d(h, 2, 2)
        o1 = h.mean((2, 3)) @ self.w1 + self.b1
        h = torch.relu(self.conv2(h))
        o2 = h.mean((2, 3)) @ self.w2 + self.b2
        h = torch.relu(self.conv3(h))
        o3 = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1) @ self.w3 + self.b3  # Keras' Flatten on NHWC
        outs = (o1, o2, o3)
        return tuple(o.softmax(1) for o in outs) if self.softmax else outs


class NCHWToNHWC(nn.Module):
    """Training wrapper: the data comes NCHW, the Keras-like network takes NHWC."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.permute(0, 2, 3, 1))


def export(net: nn.Module, path: Path, output_names: list[str], *, nhwc: bool = False, dynamo: bool = False,
           dynamic: dict | None = None) -> Path:
    x = torch.zeros(1, *((28, 28, 1) if nhwc else SHAPE))
    kwargs: dict = {"dynamo": dynamo}
    if dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    elif dynamic:
        kwargs["dynamic_axes"] = dynamic
    torch.onnx.export(net.eval(), (x,), str(path), input_names=["image"], output_names=output_names, **kwargs)
    return path


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """The three trained networks and their ONNX files."""
    d = tmp_path_factory.mktemp("onnx")
    plain = train(seeded(Plain), steps=60)
    # 100 steps: after 60-80 its exit-0 confidences crowd into a band ~1.4 logits wide where int8 rounding flips
    # ~8 % of the decisions at a median threshold; after 100, 98.5 % agree
    confident = train(seeded(Confident), steps=100)
    keras = seeded(KerasLike)
    train(NCHWToNHWC(keras), steps=60)
    keras.softmax = True
    return {
        "plain": (plain, export(plain, d / "plain.onnx", ["exit0", "exit1", "final"])),
        "confident": (confident, export(confident, d / "confident.onnx", ["conf0", "logits0", "conf1", "logits1",
                                                                          "final"], dynamo=True)),
        "keras": (keras, export(keras, d / "keras.onnx", ["p0", "p1", "p2"], nhwc=True)),
    }


def ort_exits(path: Path, images: np.ndarray, keras: bool = False) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(logits, confidence or None) per exit, from onnxruntime on the normalised images, one image at a time.

    The Keras-like model's softmax outputs (and NHWC input) are turned back into logits (log p: the same softmax
    and top-1).
    """
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = to_tensor(images)
    x = (x.permute(0, 2, 3, 1) if keras else x).contiguous().numpy()
    name = session.get_inputs()[0].name
    runs = [session.run(None, {name: x[i:i + 1]}) for i in range(len(x))]
    outs = [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]
    exits, i = [], 0
    while i < len(outs):
        if outs[i].shape[1] == 1:
            exits.append((outs[i + 1], outs[i].reshape(-1)))
            i += 2
        else:
            with np.errstate(divide="ignore"):  # a probability of exactly 0 is a logit of -inf
                exits.append((np.log(outs[i]) if keras else outs[i], None))
            i += 1
    return exits


def keras_macs(net: KerasLike) -> list[tuple[int, int]]:
    """(segment, head) MACs per stage of the Keras-like network, counted from its layers by hand."""
    c1 = 28 * 28 * 8 * 9          # 28x28 output, 8 channels, 1 input channel, 3x3
    c2 = 7 * 7 * 12 * 8 * 9       # after the 2x2 pool: 14x14 -> stride 2 -> 7x7
    c3 = 4 * 4 * 16 * 12 * 9      # 7x7 -> stride 2 -> 4x4
    return [(c1, net.w1.numel()), (c2, net.w2.numel()), (c3, net.w3.numel())]


def p_max(logits: np.ndarray) -> np.ndarray:
    return 1 / np.exp(logits - logits.max(1, keepdims=True)).sum(1)


# ---- the rebuild: the same numbers as onnxruntime, standard layers, the same cuts as the torch network --------------

@pytest.mark.parametrize("which", ["plain", "confident", "keras"])
def test_rebuild_matches_onnxruntime_and_stages_like_the_torch_network(which, nets):
    from edgeexit.workstation.models.costs import model_costs

    net, path = nets[which]
    conv = onnx_to_torch(path)
    assert conv.input_layout == ("NHWC" if which == "keras" else "NCHW") and conv.input_shape == SHAPE
    x = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(9))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = (x.permute(0, 2, 3, 1) if which == "keras" else x).contiguous().numpy()
    name = session.get_inputs()[0].name
    want = [np.concatenate(o) for o in zip(*[session.run(None, {name: feed[i:i + 1]}) for i in range(6)])]
    with torch.no_grad():
        got = conv.module(x)
        mine = net(x.permute(0, 2, 3, 1) if which == "keras" else x)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=1e-5)
    # the layers MACs are counted on: one nn.Conv2d / nn.Linear per convolution / dense layer of the network
    layers = [type(m).__name__ for m in conv.module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers.count("Conv2d") == sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert layers.count("Linear") == (3 if which == "keras" else sum(isinstance(m, nn.Linear) for m in net.modules()))
    if which == "keras":  # x @ W + b: the bias added after the MatMul is the Linear's own
        assert all(m.bias is not None for m in conv.module.modules() if isinstance(m, nn.Linear))
        assert "add" not in conv.module.code
    confidence = "probability" if which == "confident" else None
    staged = stage_onnx(path, mean=MEAN, std=STD, confidence=confidence)
    with torch.no_grad():
        out = staged(x)
    torch_exits = exits_of(mine) if which != "keras" else [(o.log(), None) for o in mine]
    for (logits, prob), o in zip(torch_exits, out):
        if which == "keras":  # the staged exits are the logits before the softmax: the same softmax
            torch.testing.assert_close(o["logits"].softmax(1), logits.exp(), rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(o["logits"], logits, rtol=1e-4, atol=1e-5)
        if prob is not None:
            torch.testing.assert_close(torch.sigmoid(o["confidence"]), prob, rtol=1e-4, atol=1e-6)
        else:
            assert "confidence" not in o
    costs = model_costs(staged)
    if which == "keras":
        expected = keras_macs(net)
        # the NHWC input's transpose and the network's own transpose back cancel: stage 0 is conv, relu, pool
        assert "permute" not in staged.stages[0].segment.code
    else:
        macs = macs_by_module(net)
        heads = {"plain": [("e1",), ("e2",), ("e3",)], "confident": [("c1", "l1"), ("c2", "l2"), ("l3",)]}[which]
        expected = [(total(macs, f"b{k + 1}."), total(macs, *heads[k])) for k in range(3)]
    assert list(zip(costs.segment_macs, costs.head_macs)) == expected
    assert staged.spec.extra["source"] == "onnx file" and staged.spec.builder == which


class Assorted(nn.Module):
    """Layers of common CNNs beyond the three networks: depthwise and dilated convs, asymmetric zero padding,
    ReLU6, hardswish, leaky ReLU, ELU, GELU, tanh, average and global max pools, squeeze-excitation, concat,
    layer norm, dropout, scalar arithmetic, clamp."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.dw, self.pw = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 24, 1)
        self.pad, self.c2 = nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(24, 24, 3, stride=2)
        self.se1, self.se2 = nn.Linear(24, 6), nn.Linear(6, 24)
        self.c3, self.ln = nn.Conv2d(48, 32, 3, padding=2, dilation=2), nn.LayerNorm(32)
        self.h0, self.h1, self.drop = nn.Linear(24, 5), nn.Linear(32, 5), nn.Dropout(0.2)

    def forward(self, x):
        h = F.relu6(self.bn(self.stem(x)))
        h = F.hardswish(self.pw(F.leaky_relu(self.dw(h), 0.1)))
        h = F.avg_pool2d(h + 0.5 * h.sigmoid(), 2)
        h2 = self.c2(self.pad(h))
        h2 = h2 * torch.sigmoid(self.se2(F.relu(self.se1(h2.mean((2, 3))))))[:, :, None, None]
        e0 = self.h0(self.drop(F.adaptive_max_pool2d(h2, 1).flatten(1)))
        h3 = F.elu(self.c3(torch.cat([h2, torch.tanh(h2)], 1)))
        return e0, (self.h1(F.gelu(self.ln(h3.mean((2, 3))))) / 2.0 - 1).clamp(-50, 50)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_rebuild_covers_the_layers_of_common_cnns(dynamo, tmp_path):
    net = seeded(Assorted).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "assorted.onnx"
    x = torch.zeros(1, 3, 32, 32)
    kwargs = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamo else {"dynamic_axes": {"image": {0: "n"}}}
    torch.onnx.export(net, (x,), str(path), input_names=["image"], output_names=["e0", "e1"], dynamo=dynamo, **kwargs)
    conv = onnx_to_torch(path)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = session.run(None, {"image": x.numpy()})  # a batch of 5: the rebuild keeps the batch dynamic
    with torch.no_grad():
        got, mine = conv.module(x), net(x)
    for w, g, m in zip(want, got, mine):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g.numpy(), m.numpy(), rtol=1e-4, atol=1e-5)
    staged = stage_onnx(path, mean=[0.5] * 3, std=[0.25] * 3)
    with torch.no_grad():
        out = staged(x)
    for o, m in zip(out, mine):
        torch.testing.assert_close(o["logits"], m, rtol=1e-4, atol=1e-5)


# ---- errors: one line, what is wrong and how to fix it ------------------------------------------------------------

class _Features(nn.Module):
    """Exports an exit's logits and a feature map as outputs."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.e0, self.e1 = nn.Linear(4, 10), nn.Linear(4, 10)

    def forward(self, x):
        h = torch.relu(self.c(x))
        return self.e0(h.mean((2, 3))), h, self.e1(h.amax((2, 3)))


class _Upsampling(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.e0, self.e1 = nn.Linear(4, 10), nn.Linear(4, 10)

    def forward(self, x):
        h = torch.relu(self.c(x))
        return self.e0(h.mean((2, 3))), self.e1(F.interpolate(h, scale_factor=2.0).mean((2, 3)))


class _BatchScaled(nn.Module):
    """An exit multiplied by the batch size: a graph whose numbers depend on the batch (the rebuild fixes it at 1)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.e0, self.e1 = nn.Linear(4, 10), nn.Linear(4, 10)

    def forward(self, x):
        h = torch.relu(self.c(x))
        return self.e0(h.mean((2, 3))), self.e1(h.amax((2, 3))) * x.shape[0]


def test_onnx_errors_are_one_line(nets, tmp_path):
    plain, confident, keras = (nets[k][1] for k in ("plain", "confident", "keras"))
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage that is not a protobuf \xff\xfe" * 4)
    features = export(seeded(_Features), tmp_path / "features.onnx", ["a", "h", "b"])
    dynamic_hw = export(seeded(Plain), tmp_path / "dyn.onnx", ["a", "b", "c"],
                        dynamic={"image": {0: "n", 2: "h", 3: "w"}})
    upsampling = export(seeded(_Upsampling), tmp_path / "up.onnx", ["a", "b"])
    batch_scaled = export(seeded(_BatchScaled), tmp_path / "scaled.onnx", ["a", "b"], dynamic={"image": {0: "n"}})
    cases = [
        (tmp_path / "none.onnx", {}, UsageError, r"ONNX file .*none.onnx does not exist"),
        (tmp_path / "junk.onnx", {}, UsageError, r"cannot read .*junk.onnx as an ONNX model \(\w+"),
        (plain, {"input_shape": (3, 32, 32)}, UsageError,
         r"input 'image' is \[1, 1, 28, 28\], which input_shape \[3, 32, 32\] does not fit: expected \[N, 3, 32, 32\] "
         r"\(NCHW\) nor \[N, 32, 32, 3\] \(NHWC\)"),
        (keras, {"input_layout": "NCHW"}, UsageError, r"input 'image' \[1, 28, 28, 1\] read as NCHW has 28 channels, "
                                                 r"not 1 or 3; if it is NHWC, say so: input_layout='NHWC'"),
        (keras, {"input_shape": (1, 28, 28), "input_layout": "nchw"}, UsageError,
         r"input 'image' is \[1, 28, 28, 1\], which input_shape \[1, 28, 28\] does not fit: expected \[N, 1, 28, 28\] "
         r"\(NCHW\);"),
        (dynamic_hw, {}, UsageError, r"input 'image' has the dynamic shape \[\?, 1, \?, \?\]; give the shape it takes"),
        (plain, {"outputs": ["exit0"]}, UsageError, r"outputs exit0 make 1 exit; an early-exit network has at least 2"),
        (plain, {"outputs": ["exit0", "exit9"]}, UsageError, r"outputs names 'exit9', which plain.onnx does not "
                                                              r"compute; its outputs: exit0, exit1, final"),
        (plain, {"confidence": "probability"}, UsageError, r"confidence='probability' declared, but plain.onnx's "
                                                            r"outputs exit0, exit1, final are the logits of 3 exits"),
        (confident, {}, UsageError, r"output 'conf0' is an exit's confidence; declare what it is"),
        (confident, {"confidence": "probability", "outputs": ["conf0", "logits0", "conf1"]}, UsageError,
         r"output 'conf1' is a confidence \[\?, 1\] that is the last output; a confidence comes right before"),
        (confident, {"confidence": "probability", "outputs": ["logits0", "conf0", "logits1", "conf1", "final"]},
         UsageError, r"output 'conf0' comes right before 'logits1', but is computed where 'logits0' is \(the output "
                     r"before it\)"),
        (confident, {"confidence": "logit"}, UsageError, r"comes out of a sigmoid but was declared confidence='logit'"),
        (features, {}, UsageError, r"output 'h' has shape \[\?, 4, 28, 28\]; every exit output is logits"),
        (plain, {"labels": ["a", "b"]}, UsageError, r"2 labels given but .* 10 classes"),
        (upsampling, {}, ConversionError, r"up.onnx uses ONNX operators edgeexit cannot convert: Resize \(node "),
        (batch_scaled, {}, ConversionError, r"output 'b': the torch rebuild differs from onnxruntime by [0-9.]+ "
                                            r"\(relative; allowed 0.0001\)"),
    ]
    for path, kwargs, error, match in cases:
        with pytest.raises(error, match=match) as info:
            stage_onnx(path, mean=MEAN, std=STD, **kwargs)
        assert "\n" not in str(info.value), str(info.value)
    # a dynamic height and width are fine once the shape is given
    assert stage_onnx(dynamic_hw, input_shape=SHAPE, mean=MEAN, std=STD).num_exits == 3


def test_cli_onnx_errors_are_one_line_and_write_nothing(nets, tmp_path, capsys):
    plain, keras = nets["plain"][1], nets["keras"][1]
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx file")
    data = str(_npz(tmp_path, 16, 8))
    out = str(tmp_path / "b")
    dynamic_hw = export(seeded(Plain), tmp_path / "dyn.onnx", ["a", "b", "c"],
                        dynamic={"image": {0: "n", 2: "h", 3: "w"}})
    for argv, code, match in [
        ([str(tmp_path / "none.onnx"), "--mean", "0.5", "--std", "0.5"], 2, r"none.onnx does not exist"),
        ([str(tmp_path / "junk.onnx"), "--mean", "0.5", "--std", "0.5"], 2, r"cannot read .* as an ONNX model"),
        ([str(plain)], 2, r"converting an ONNX file needs --mean, --std"),
        ([str(plain), "--mean", "0.5", "--std", "0.5", "--weights", "w.pt"], 2,
         r"--weights applies to a network file \(FILE.py:NAME\), not to the ONNX file"),
        ([str(plain), "--mean", "0.5", "--std", "0.5", "--outputs", "exit0"], 2, r"make 1 exit"),
        ([str(plain), "--mean", "0.5", "--std", "0.5", "--input-shape", "1,32,32"], 2, r"does not fit"),
        ([str(dynamic_hw), "--mean", "0.5", "--std", "0.5"], 2, r"dynamic shape .*--input-shape C,H,W"),
        ([str(keras), "--mean", "0.5", "--std", "0.5", "--input-layout", "nchw"], 2, r"--input-layout nhwc\)$"),
        ([str(tmp_path / "m.pt"), "--input-layout", "nhwc"], 2, r"--input-layout applies to an ONNX file"),
    ]:
        rc, _, err = _cli(capsys, "convert", *argv, "--calib", data, "--out", out)
        assert rc == code and err.startswith("error: ") and err.count("\n") == 1, err
        assert re.search(match, err), err
        assert not Path(out).exists()


# ---- real conversions: int8 on the Runner against onnxruntime ------------------------------------------------------

@pytest.mark.slow
def test_cli_converts_an_onnx_file_with_logits_exits(nets, tmp_path, capsys):
    import edgeexit

    net, path = nets["plain"]
    (tmp_path / "labels.txt").write_text("".join(f"grating {i}\n" for i in range(10)))
    data = _npz(tmp_path, CALIB, VERIFY)
    images = np.load(data)["x_test"][..., None]
    flt = ort_exits(path, images)
    thresholds = _thresholds([p_max(lg) for lg, _ in flt[:-1]])
    code, out, err = _cli(capsys, "convert", str(path), "--mean", str(MEAN), "--std", str(STD), "--labels",
                          str(tmp_path / "labels.txt"), "--calib", str(data), "--calib-size", str(CALIB),
                          "--exit-rule", "max_softmax", "--thresholds", ",".join(f"{t:.6f}" for t in thresholds),
                          "--out", str(tmp_path / "b"))
    assert code == 0, err
    verification = json.loads((tmp_path / "b" / "manifest.json").read_text())["verification"]
    assert verification["passed"], verification["failures"]       # the plain network converts within the limits
    assert "PASSED" in out and "FAILED" not in out                 # and the summary says so

    def stop(logits, conf):
        return [p_max(lg) >= t for lg, t in zip(logits[:-1], [float(f"{t:.6f}") for t in thresholds])]

    macs = macs_by_module(net)
    expected = [(total(macs, "b1."), macs["e1"]), (total(macs, "b2."), macs["e2"]), (total(macs, "b3."), macs["e3"])]
    manifest = _check_on_runner(tmp_path / "b", flt, images, stop, expected)
    assert manifest.labels[3] == "grating 3"
    assert manifest.full_macs == total(macs, "b", "e3")
    training = edgeexit.Runner(tmp_path / "b").manifest.training
    assert training["source"] == "onnx file" and training["onnx"] == "plain.onnx"


@pytest.mark.slow
def test_confidence_pairs_convert_and_run(nets, tmp_path):
    from edgeexit.workstation.conversion.pipeline import convert
    from edgeexit.workstation.conversion.verify import Tolerances

    net, path = nets["confident"]
    calib, _ = digits(CALIB, seed=3)
    images, labels = digits(VERIFY, seed=7)
    flt = ort_exits(path, images)
    thresholds = _thresholds([c for _, c in flt[:-1]])
    staged = stage_onnx(path, mean=MEAN, std=STD, confidence="probability")
    convert(staged, calib, tmp_path / "b", verify_images=images, verify_labels=labels, thresholds=thresholds,
            monolithic=False, tolerances=Tolerances(TOP1, DECISIONS, 3.0))

    def stop(logits, conf):  # sigmoid(c) > T, i.e. c > log(T / (1 - T))
        return [c > np.log(t / (1 - t)) for c, t in zip(conf[:-1], thresholds)]

    macs = macs_by_module(net)
    expected = [(total(macs, "b1."), macs["c1"] + macs["l1"]), (total(macs, "b2."), macs["c2"] + macs["l2"]),
                (total(macs, "b3."), macs["l3"])]
    _check_on_runner(tmp_path / "b", flt, images, stop, expected)


@pytest.mark.slow
def test_cli_converts_an_nhwc_onnx_file_with_softmax_exits(nets, tmp_path, capsys):
    net, path = nets["keras"]
    data = _npz(tmp_path, CALIB, VERIFY)
    images = np.load(data)["x_test"][..., None]
    flt = ort_exits(path, images, keras=True)
    thresholds = _thresholds([p_max(lg) for lg, _ in flt[:-1]])
    code, _out, err = _cli(capsys, "convert", str(path), "--input-shape", "1,28,28", "--input-layout", "nhwc",
                          "--mean", str(MEAN), "--std", str(STD), "--calib", str(data), "--calib-size", str(CALIB),
                          "--exit-rule", "max_softmax", "--thresholds", ",".join(f"{t:.6f}" for t in thresholds),
                          "--no-monolithic", "--out", str(tmp_path / "b"))
    assert code == 0, err

    def stop(logits, conf):
        return [p_max(lg) >= t for lg, t in zip(logits[:-1], [float(f"{t:.6f}") for t in thresholds])]

    _check_on_runner(tmp_path / "b", flt, images, stop, keras_macs(net))


# ---- torch's default exporter on research code (issue 27): GatherND for non-dividing adaptive pools ---------------

@pytest.fixture(scope="module")
def research_onnx(research, tmp_path_factory):
    """The research network (softmax heads, F.adaptive_avg_pool2d 7x7 -> 2x2 and 3x3) exported by torch's default
    (dynamo) exporter with a dynamic batch."""
    net, _ = research
    return net, export(net, tmp_path_factory.mktemp("research-onnx") / "research.onnx", ["p0", "p1", "p2"],
                       dynamo=True)


class _BatchLast(nn.Module):
    """Moves the batch to the back and sums over it: a transpose that is not a lowered pool."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.e0, self.e1 = nn.Linear(4, 10), nn.Linear(4, 10)

    def forward(self, x):
        h = torch.relu(self.c(x))
        return self.e0(h.mean((2, 3))), self.e1(h.permute(2, 3, 1, 0).mean((0, 1)).t())


def test_torch_lowering_of_adaptive_pools_is_rebuilt_as_pools(research_onnx, tmp_path):
    import onnx

    net, path = research_onnx
    assert "GatherND" in {n.op_type for n in onnx.load(str(path)).graph.node}  # what torch's exporter writes
    conv = onnx_to_torch(path)
    pools = [m.output_size for m in conv.module.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    assert sorted(pools) == [(2, 2), (3, 3)]
    x = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(9))
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    with torch.no_grad():
        got = conv.module(x)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=1e-6)
    staged = stage_onnx(path, mean=MEAN, std=STD)
    with torch.no_grad():
        for p, o in zip(net(x), staged(x)):  # the exits' softmaxes removed: the device's softmax gives p back
            torch.testing.assert_close(o["logits"].softmax(1), p, rtol=1e-4, atol=1e-6)
    other = export(seeded(_BatchLast), tmp_path / "batch_last.onnx", ["a", "b"], dynamo=True)
    with pytest.raises(ConversionError, match=r"batch_last.onnx: node '[\w]+' \(Transpose\) cannot be converted: perm "
                                              r"\[2, 3, 1, 0\] moves the batch dimension"):
        stage_onnx(other, mean=MEAN, std=STD)


@pytest.mark.slow
def test_research_onnx_from_the_default_exporter_converts_with_its_own_scores(research_onnx, tmp_path):
    from edgeexit.workstation.conversion.pipeline import convert

    net, path = research_onnx
    calib, _ = digits(CALIB, seed=3)
    images, labels = digits(VERIFY, seed=7)
    probs = [p for p, _ in ort_exits(path, images)]  # onnxruntime on the file: softmax outputs
    thresholds = _thresholds([p.max(1) for p in probs[:-1]])
    staged = stage_onnx(path, mean=MEAN, std=STD)
    report = convert(staged, calib, tmp_path / "b", verify_images=images, verify_labels=labels,
                     exit_rule="max_softmax", thresholds=thresholds, monolithic=False)
    assert report.verification.passed, report.verification.failures
    check_scores(tmp_path / "b", probs, images)
