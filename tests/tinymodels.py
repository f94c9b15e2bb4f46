"""Tiny seeded early-exit networks for tests: small enough to train in seconds and convert in under a minute.

They are built from :mod:`edgeexit.workstation.models.staged` only, so tests do not depend on the model family in
:mod:`edgeexit.workstation.models.eenet`. Data is synthetic: each class is an oriented grating plus noise, which gives
exits that are neither all-correct nor random after a few seconds of training.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeexit.workstation.models.staged import ExitHead, ModelSpec, Stage, StagedModel
from synthetic import TINY_CLASSES, TINY_MEAN, TINY_SIZE, TINY_STD, synthetic_digits  # noqa: F401 (re-exported)


class TinyHead(ExitHead):
    """Global average pool, then a linear classifier and (optionally) a linear confidence logit."""

    def __init__(self, channels: int, num_classes: int, confidence: bool = True, scores: str = "softmax"):
        super().__init__()
        self.has_confidence = confidence
        self.scores = scores
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.confidence = nn.Linear(channels, 1) if confidence else None

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.flatten(self.pool(features), 1)  # [N, C]
        out = {"logits": self.classifier(z)}
        if self.confidence is not None:
            out["confidence"] = self.confidence(z)
        return out


def conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    """3x3 conv + BatchNorm + ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


def tiny_staged_model(seed: int = 0, widths: tuple[int, ...] = (8, 16, 16), confidence: bool = True,
                      size: int = TINY_SIZE, depthwise: bool = False) -> StagedModel:
    """A seeded StagedModel with one conv block per stage and a confidence head on every exit.

    Args:
        seed: torch seed for the initial weights.
        widths: output channels of each stage (one stage per entry).
        confidence: give every head a confidence logit (EENet style).
        size: input height and width (1 channel).
        depthwise: add a depthwise 3x3 conv to each later stage (exercises DEPTHWISE_CONV_2D counting).
    """
    torch.manual_seed(seed)
    stages = []
    cin = 1
    for i, w in enumerate(widths):
        layers: list[nn.Module] = [conv_block(cin, w, stride=1 if i == 0 else 2)]
        if depthwise and i > 0:
            layers += [nn.Conv2d(w, w, 3, padding=1, groups=w, bias=True), nn.ReLU()]
        stages.append(Stage(nn.Sequential(*layers), TinyHead(w, TINY_CLASSES, confidence=confidence)))
        cin = w
    spec = ModelSpec(builder="tiny-test", kwargs={"seed": seed, "widths": list(widths)},
                     input_shape=(1, size, size), labels=[str(i) for i in range(TINY_CLASSES)],
                     mean=list(TINY_MEAN), std=list(TINY_STD), color_mode="L",
                     extra={"method": "tiny-test", "loss": "sum of per-exit cross-entropy"})
    return StagedModel(stages, spec).eval()


def to_tensor(images: np.ndarray, model: StagedModel) -> torch.Tensor:
    """uint8 NHWC images -> normalized float NCHW tensor, as the model's spec says."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(model.spec.mean, np.float32)) / np.asarray(model.spec.std, np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def train_tiny(model: StagedModel, steps: int = 120, batch: int = 64, seed: int = 0, lr: float = 0.01) -> StagedModel:
    """A few Adam steps on synthetic digits: per-exit cross-entropy plus a BCE on each confidence logit
    (target: the exit's prediction is correct), so confidences spread over (0, 1). Returns the model in eval mode.
    """
    torch.manual_seed(seed)
    images, labels = synthetic_digits(steps * batch, seed=seed + 100)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        sl = slice(step * batch, (step + 1) * batch)
        x, y = to_tensor(images[sl], model), torch.from_numpy(labels[sl])
        loss = exits_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def exits_loss(outputs, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every exit's logits, plus each confidence head's BCE against "this exit is right"."""
    loss = torch.zeros(())
    for out in outputs:
        loss = loss + nn.functional.cross_entropy(out["logits"], y)
        if "confidence" in out:
            correct = (out["logits"].argmax(1) == y).float().unsqueeze(1)
            loss = loss + nn.functional.binary_cross_entropy_with_logits(out["confidence"], correct)
    return loss


CALIBRATION_SAMPLES = 48
VERIFY_SAMPLES = 200


def convert_tiny(out_dir, **kwargs):
    """Train the seeded tiny model and convert it into a bundle at ``out_dir`` (stages + monolithic).

    The one recipe behind the ``tiny_bundle`` fixture and ``tests/make_test_bundle.py``. Returns the
    ConversionReport.
    """
    from edgeexit.workstation.conversion.pipeline import convert

    model = train_tiny(tiny_staged_model(seed=0), steps=120)
    calib, _ = synthetic_digits(CALIBRATION_SAMPLES, seed=3)
    images, labels = synthetic_digits(VERIFY_SAMPLES, seed=7)
    return convert(model, calib, out_dir, verify_images=images, verify_labels=labels, monolithic=True,
                   name="tiny-test", **kwargs)


#: How much larger the crushing channel is than the others (see :func:`with_crushed_channel`).
CRUSH = 400.0


def with_crushed_channel(model: StagedModel, stage: int = 1) -> StagedModel:
    """``model`` with two 1x1 convolutions appended to ``stage``'s segment that cancel out in float but not in int8:
    ``blowup`` multiplies channel 0 by :data:`CRUSH` (the others by 1), ``restore`` divides it back. The float
    network is unchanged (to float rounding); in int8 the tensor between them has one scale for a channel
    ``CRUSH`` times larger than the rest, which crushes every other channel to a few int8 steps. The failing
    layer is known: ``blowup``'s output."""
    import copy

    model = copy.deepcopy(model)
    seg = model.stages[stage].segment
    c = model.stages[stage].head.classifier.in_features
    blowup, restore = nn.Conv2d(c, c, 1, bias=False), nn.Conv2d(c, c, 1, bias=False)
    scale = torch.ones(c)
    scale[0] = CRUSH
    with torch.no_grad():
        blowup.weight.copy_(torch.diag(scale)[:, :, None, None])
        restore.weight.copy_(torch.diag(1.0 / scale)[:, :, None, None])
    model.stages[stage].segment = nn.Sequential(*seg, blowup, restore)
    model.spec.builder = "tiny-crushed"
    return model.eval()
