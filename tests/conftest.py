"""Session fixtures shared by every test: a tiny trained early-exit network and its converted bundle.

``tiny_model``       -- a seeded 3-stage StagedModel (28x28x1 input, 10 classes, confidence heads), trained a
                        few seconds on synthetic gratings so that its exits are not degenerate.
``tiny_data``        -- held-out synthetic images and labels of the same task (uint8 NHWC, int64).
``tiny_bundle``      -- the model converted once per session (stages + monolithic.tflite), verified.
``tiny_bundle_copy`` -- a fresh copy of that bundle per test, free to corrupt.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

CALIBRATION_SAMPLES = 48
VERIFY_SAMPLES = 200


@pytest.fixture(scope="session")
def tiny_model():
    """A seeded, briefly trained 3-stage StagedModel with confidence heads (eval mode)."""
    pytest.importorskip("torch")
    from tinymodels import tiny_staged_model, train_tiny

    return train_tiny(tiny_staged_model(seed=0), steps=120)


@pytest.fixture(scope="session")
def tiny_data():
    """(images [N, 28, 28, 1] uint8, labels [N] int64): held-out synthetic images, distinct from calibration."""
    from tinymodels import synthetic_digits

    return synthetic_digits(VERIFY_SAMPLES, seed=7)


@pytest.fixture(scope="session")
def tiny_conversion(tiny_model, tiny_data, tmp_path_factory):
    """The ConversionReport of converting ``tiny_model`` once per session (bundle with monolithic)."""
    pytest.importorskip("onnx2tf")
    from converters.convert import convert
    from tinymodels import synthetic_digits

    calib, _ = synthetic_digits(CALIBRATION_SAMPLES, seed=3)
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    images, labels = tiny_data
    return convert(tiny_model, calib, out, verify_images=images, verify_labels=labels, monolithic=True,
                   name="tiny-test")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_conversion) -> Path:
    """Path of the session's converted tiny bundle (do not modify it; use ``tiny_bundle_copy``)."""
    return tiny_conversion.out_dir


@pytest.fixture
def tiny_bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A per-test copy of the tiny bundle that the test may modify or corrupt."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst
