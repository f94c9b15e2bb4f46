"""Bring your own early-exit network: a complete example (tests/test_user_network.py runs it).

A VGG-style network written without edgeexit (three exits, each: global average pool -> sigmoid confidence
and class logits), trained briefly on MNIST, cut at its exits, converted to an int8 bundle and run on the
device Runner::

    .venv/bin/python docs/examples/own_network.py runs/own-bundle --steps 300
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import edgeexit
from edgeexit.datasets import ImageSet, load_dataset
from edgeexit.workstation import convert, stage_network

MEAN, STD = 0.5, 0.5  # the network sees (pixel / 255 - 0.5) / 0.5


class Exit(nn.Module):
    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.confidence = nn.Linear(channels, 1)
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x):
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return torch.sigmoid(self.confidence(pooled)), self.classifier(pooled)  # (confidence, logits)


class Net(nn.Module):
    """forward returns one (confidence, logits) pair per exit, the final classifier last."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.blocks = nn.ModuleList([block(1, 8), block(8, 16), block(16, 32)])
        self.exits = nn.ModuleList([Exit(8, classes), Exit(16, classes), Exit(32, classes)])

    def forward(self, x):
        outputs = []
        for block, exit_head in zip(self.blocks, self.exits):
            x = block(x)
            outputs.append(exit_head(x))
        return outputs


def to_tensor(images) -> torch.Tensor:
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


def train(net: Net, data: ImageSet, steps: int, batch: int = 64) -> Net:
    """Cross-entropy at every exit + binary cross-entropy of each confidence against "this exit is right"."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch,))
        x, y = to_tensor(data.images[idx.numpy()]), torch.from_numpy(data.labels[idx.numpy()])
        loss = torch.zeros(())
        for confidence, logits in net(x):
            right = (logits.argmax(1) == y).float().unsqueeze(1)
            loss = loss + F.cross_entropy(logits, y) + F.binary_cross_entropy(confidence, right)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="bundle directory to create (replaced if it exists)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (a stand-in for your own training)")
    args = parser.parse_args(argv)

    train_set, test_set = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    torch.manual_seed(0)
    net = train(Net(), train_set, args.steps)  # yours: net = Net(); net.load_state_dict(torch.load("net.pt"))

    staged = stage_network(net, input_shape=(1, 28, 28), mean=MEAN, std=STD, confidence="probability",
                           labels=train_set.classes)
    # int8 is checked against float on held-out images with the default tolerances (README "Conversion
    # checks"); with strict=True convert() raises if one is missed (without, it warns and writes the bundle
    # marked unverified). The first exit (global average of 8 channels, about 40 % accurate) has many near-tied
    # logits that int8 may flip; the check does not count those.
    report = convert(staged, train_set.images[:256], args.out, verify_images=test_set.images[:500],
                     verify_labels=test_set.labels[:500], thresholds=[0.9, 0.9], force=True, strict=True)
    print(report.summary())

    runner = edgeexit.Runner(args.out)
    held_out = test_set.subset(range(500, 1000))
    results = [runner(image) for image in held_out.images]
    accuracy = sum(r.label == y for r, y in zip(results, held_out.labels)) / len(results)
    mean_macs = sum(r.macs for r in results) / len(results)
    print(f"Runner on {len(results)} held-out images: accuracy {accuracy:.3f}, mean MACs {mean_macs:,.0f} "
          f"of {runner.manifest.full_macs:,}")
    return {"accuracy": accuracy, "mean_macs": mean_macs, "full_macs": runner.manifest.full_macs,
            "verification": report.verification}


if __name__ == "__main__":
    main()
