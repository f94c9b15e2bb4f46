"""What every exit said for a set of inputs: the data that tuning, sweeps and tests decide exits from.

A :class:`Trace` comes from :meth:`edgeexit.Runner.trace` (every stage run for every input) or from a float
network (the workstation's float evaluation). A Runner's trace also keeps the exits' raw integer outputs
(:class:`RawOutputs`): the exit rules decide on those bytes on the device, so deciding on a trace's raw outputs
gives exactly the device's decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import UsageError


@dataclass(frozen=True)
class ExitQuant:
    """How one exit's integer outputs map to real values: ``x = scale * (q - zero_point)``.

    ``dtype`` is "int8", "uint8" or "int16" (int16-activation bundles). ``confidence`` is None when the exit has no
    confidence output.
    """

    scale: float
    zero_point: int
    dtype: str
    num_classes: int
    scores: str                                        # "softmax" or "sigmoid": the exit's class scores
    confidence: tuple[float, int, str] | None = None   # (scale, zero_point, dtype) of the confidence logit

    @property
    def levels(self) -> int:
        """How many integer values a logit output can take: 256 (int8/uint8) or 65536 (int16)."""
        return levels(self.dtype)

    def byte_values(self) -> np.ndarray:
        """[levels] float64: the real logit value of every output value, indexed by its unsigned view
        (:func:`unsigned`: the uint8 view of an int8 byte, the uint16 view of an int16 value)."""
        return _byte_values(self.scale, self.zero_point, self.dtype)

    def confidence_byte_values(self) -> np.ndarray:
        """[levels] float64: the real confidence logit of every confidence value (unsigned view)."""
        if self.confidence is None:
            raise UsageError("this exit has no confidence output")
        return _byte_values(*self.confidence)


def levels(dtype: str) -> int:
    """256 for 8-bit outputs, 65536 for int16 outputs."""
    return 65536 if dtype == "int16" else 256


def unsigned(q: np.ndarray) -> np.ndarray:
    """The unsigned view of raw integer outputs (uint8 for int8/uint8, uint16 for int16): the index of a value in
    the tables over all its levels. A negative value -x indexes entry levels - x, as Python's negative indexing
    of a table of ``levels`` entries does."""
    return q.view(np.uint16 if q.dtype.itemsize == 2 else np.uint8)


def _byte_values(scale: float, zero_point: int, dtype: str) -> np.ndarray:
    n = levels(dtype)
    b = np.arange(n, dtype=np.int64)
    q = np.where(b >= n // 2, b - n, b) if dtype in ("int8", "int16") else b
    return float(scale) * (q - int(zero_point)).astype(np.float64)


@dataclass(frozen=True)
class RawOutputs:
    """The exits' integer outputs as the interpreter wrote them.

    ``logits[i]`` is ``[N, K]`` and ``confidence[i]`` is ``[N]`` (or None), both of the tensor's own dtype
    (int8, uint8 or int16); ``quant[i]`` says how to read them.
    """

    logits: tuple[np.ndarray, ...]
    confidence: tuple[np.ndarray | None, ...]
    quant: tuple[ExitQuant, ...]

    def select(self, exits: Sequence[int], rows: np.ndarray | slice = slice(None)) -> "RawOutputs":
        return RawOutputs(logits=tuple(self.logits[i][rows] for i in exits),
                          confidence=tuple(None if self.confidence[i] is None else self.confidence[i][rows]
                                           for i in exits),
                          quant=tuple(self.quant[i] for i in exits))


@dataclass(frozen=True)
class Trace:
    """Every exit's outputs for N inputs.

    ``logits[i]`` is ``[N, K]`` float32 (dequantized, or a float network's), ``confidence[i]`` is ``[N]`` float32
    (the pre-sigmoid confidence logit) or None when exit i has none, ``scores[i]`` is "softmax" or "sigmoid",
    ``stage_latency_ms`` is ``[N, E]`` float64 (each stage's invoke + hand-off time) or None, ``labels`` is
    ``[N]`` int64 ground truth or None, and ``raw`` the integer outputs the device decides on (None for a
    float network).
    """

    logits: tuple[np.ndarray, ...]
    confidence: tuple[np.ndarray | None, ...]
    scores: tuple[str, ...]
    stage_latency_ms: np.ndarray | None = None
    labels: np.ndarray | None = None
    raw: RawOutputs | None = None

    @property
    def num_exits(self) -> int:
        return len(self.logits)

    @property
    def num_inputs(self) -> int:
        return int(self.logits[0].shape[0])

    def accuracy(self, prediction: np.ndarray) -> float:
        """Top-1 accuracy of ``prediction`` [N] against ``labels``; UsageError without labels."""
        if self.labels is None:
            raise UsageError("this trace has no ground-truth labels; pass labels to Runner.trace(images, labels)")
        return float(np.mean(prediction == self.labels))

    def select(self, exits: Sequence[int], rows: np.ndarray | slice = slice(None)) -> "Trace":
        """The trace of some exits (in the given order) and optionally some inputs."""
        exits = list(exits)
        return Trace(logits=tuple(self.logits[i][rows] for i in exits),
                     confidence=tuple(None if self.confidence[i] is None else self.confidence[i][rows]
                                      for i in exits),
                     scores=tuple(self.scores[i] for i in exits),
                     stage_latency_ms=None if self.stage_latency_ms is None else self.stage_latency_ms[rows][:, exits],
                     labels=None if self.labels is None else self.labels[rows],
                     raw=None if self.raw is None else self.raw.select(exits, rows))
