"""Synthetic image tasks for tests: numpy only, so the device-only environments can use them too."""

from __future__ import annotations

import numpy as np

from edgeexit.runtime.trace import Trace

TINY_SIZE = 28
TINY_CLASSES = 10
TINY_MEAN = [0.1307]
TINY_STD = [0.3081]


def synthetic_digits(n: int, seed: int = 0, size: int = TINY_SIZE,
                     noise: float = 50.0) -> tuple[np.ndarray, np.ndarray]:
    """Oriented gratings (one orientation, frequency and contrast per class) plus Gaussian noise, as uint8 images.

    Contrast alone separates some classes (a shallow exit gets part of the task right), orientation the rest.

    Returns:
        images [n, size, size, 1] uint8 and labels [n] int64. The gratings depend only on ``size``,
        so different seeds give different samples of the same task.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angles = np.arange(TINY_CLASSES) * np.pi / TINY_CLASSES
    freqs = 0.35 + 0.25 * (np.arange(TINY_CLASSES) % 3)
    templates = np.stack([127.5 + 127.5 * np.sin(f * (np.cos(a) * xx + np.sin(a) * yy))
                          for a, f in zip(angles, freqs)])[..., None]  # [K, size, size, 1] oriented gratings
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, TINY_CLASSES, size=n).astype(np.int64)
    contrast = 0.3 + 0.07 * labels[:, None, None, None] + rng.uniform(-0.03, 0.03, size=(n, 1, 1, 1))
    images = templates[labels] * contrast + rng.normal(0, noise, (n, size, size, 1))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def synthetic_trace(n: int = 3000, exits: int = 4, classes: int = 10, seed: int = 0) -> Trace:
    """Exits that get better with depth; int8-like logits (steps of 1/8); confidences that track correctness."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    hard = rng.uniform(0, 1, n)
    logits, conf = [], []
    for i in range(exits):
        skill = 3.0 * (i + 1) / exits
        good = rng.uniform(0, 1, n) < 0.45 + 0.5 * (i + 1) / exits - 0.3 * hard
        z = rng.normal(0, 1, (n, classes))
        z[np.arange(n), labels] += np.where(good, 2 * skill, 0.0)
        logits.append((np.round(z * 8) / 8).astype(np.float32))
        conf.append((np.where(good, 1.0, -1.0) * skill + rng.normal(0, 1.5, n)).astype(np.float32))
    lat = np.tile(np.array([0.1, 0.12, 0.15, 0.2])[:exits], (n, 1))
    return Trace(tuple(logits), tuple(conf), ("softmax",) * exits, lat, labels)
