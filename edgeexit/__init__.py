"""edgeexit: early-exit neural networks on edge devices (device runtime).

Imports only the standard library, numpy, Pillow (lazily, for image files) and a TFLite interpreter
(when a Runner is created)::

    import edgeexit
    runner = edgeexit.Runner("bundle/")
    result = runner("image.png")   # label, exit_index, macs, latency_ms, energy
"""

from .runtime.bundle import Bundle, load_bundle, write_manifest_atomic
from .energy import Energy, EnergyModel
from .errors import (BundleError, EdgeExitError, InputError, InterpreterError, TuningError, UsageError)
from .runtime.manifest import Manifest
from .runtime.rules import (ClassExclusionRule, ConfidenceRule, EntropyRule, ExitRule, FinalExitRule, FixedExitRule,
                            MaxSoftmaxRule, rule_from_spec)
from .runtime.trace import Trace
from .runtime.runner import MonolithicResult, Result, Runner

__version__ = "0.1.0"

__all__ = [
    "Runner", "Result", "MonolithicResult", "Energy", "EnergyModel", "load_bundle", "write_manifest_atomic", "Bundle", "Manifest",
    "ExitRule", "ConfidenceRule", "MaxSoftmaxRule", "EntropyRule", "ClassExclusionRule", "FinalExitRule",
    "FixedExitRule", "rule_from_spec", "Trace",
    "EdgeExitError", "UsageError", "BundleError", "InputError", "InterpreterError", "TuningError", "__version__",
]
