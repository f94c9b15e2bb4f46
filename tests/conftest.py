"""Session fixtures shared by every test: a tiny trained early-exit network and its converted bundle.

``tiny_model``       -- a seeded 3-stage StagedModel (28x28x1 input, 10 classes, confidence heads), trained a
                        few seconds on synthetic gratings so that its exits are not degenerate.
``tiny_data``        -- held-out synthetic images and labels of the same task (uint8 NHWC, int64).
``tiny_bundle``      -- the model converted once per session (stages + monolithic.tflite), verified.
``tiny_bundle_copy`` -- a fresh copy of that bundle per test, free to corrupt.
``bundle_without_monolithic`` -- a copy of the tiny bundle whose manifest lists no monolithic model (file removed).

Runtime tests (marker ``runtime``: numpy, Pillow, click and a TFLite interpreter only) get the bundle from
``$EDGEEXIT_TEST_BUNDLE`` or convert it here; where neither is possible the run fails with one line instead of
skipping every test and passing empty.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

VERIFY_SAMPLES = 200  # same held-out images as tinymodels.convert_tiny verifies on
BUNDLE_ENV = "EDGEEXIT_TEST_BUNDLE"


@pytest.fixture(scope="session")
def tiny_model():
    """A seeded, briefly trained 3-stage StagedModel with confidence heads (eval mode)."""
    pytest.importorskip("torch")
    from tinymodels import tiny_staged_model, train_tiny

    return train_tiny(tiny_staged_model(seed=0), steps=120)


@pytest.fixture(scope="session")
def tiny_data():
    """(images [N, 28, 28, 1] uint8, labels [N] int64): held-out synthetic images, distinct from calibration."""
    from synthetic import synthetic_digits

    return synthetic_digits(VERIFY_SAMPLES, seed=7)


@pytest.fixture(scope="session")
def tiny_conversion(tmp_path_factory):
    """The ConversionReport of converting the tiny model once per session (bundle with monolithic)."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx2tf")
    from tinymodels import convert_tiny

    return convert_tiny(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle(request) -> Path:
    """Path of the session's converted tiny bundle (do not modify it; use ``tiny_bundle_copy``).

    ``$EDGEEXIT_TEST_BUNDLE`` names a bundle made beforehand by ``tests/make_test_bundle.py`` (scripts/test.sh
    does that once, in the workstation environment), so the device-only environments can run the runtime tests
    without torch; otherwise the tiny model is converted here.
    """
    env = os.environ.get(BUNDLE_ENV)
    if env:
        if not (Path(env) / "manifest.json").is_file():
            pytest.fail(f"${BUNDLE_ENV}={env} is not a bundle directory; run tests/make_test_bundle.py {env}")
        return Path(env)
    missing = [m for m in ("torch", "onnx2tf") if importlib.util.find_spec(m) is None]
    if missing:  # a device-only environment: no bundle would mean every runtime test skipped and a green run
        pytest.fail(f"no test bundle: ${BUNDLE_ENV} is not set and {', '.join(missing)} (needed to convert one) "
                    f"{'is' if len(missing) == 1 else 'are'} not installed; run tests/make_test_bundle.py DIR in the workstation environment and set "
                    f"${BUNDLE_ENV}=DIR", pytrace=False)
    return request.getfixturevalue("tiny_conversion").out_dir


@pytest.fixture(scope="session")
def bundle_dir(tiny_bundle) -> Path:
    """The converted bundle the runtime tests run against (alias of ``tiny_bundle``)."""
    return tiny_bundle


@pytest.fixture
def tiny_bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A per-test copy of the tiny bundle that the test may modify or corrupt."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.fixture(scope="session")
def bundle_without_monolithic(tiny_bundle, tmp_path_factory) -> Path:
    """A copy of the tiny bundle without its monolithic model: the entry dropped from the manifest, the file gone."""
    dst = tmp_path_factory.mktemp("no-monolithic") / "bundle"
    shutil.copytree(tiny_bundle, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    (dst / manifest.pop("monolithic")["file"]).unlink()
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return dst
