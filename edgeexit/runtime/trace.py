"""Every exit's outputs for a set of inputs, recorded once (``Runner.trace``) and replayed by the exit rules,
the tuner and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError


@dataclass(frozen=True)
class Trace:
    """Every exit's outputs for N inputs, recorded by running every stage (``Runner.trace``).

    ``logits[i]`` is ``[N, K]`` float32 (dequantized), ``confidence[i]`` is ``[N]`` float32 (the pre-sigmoid
    confidence logit) or None when exit i has no confidence output, ``scores[i]`` is "softmax" or "sigmoid",
    ``stage_latency_ms`` is ``[N, E]`` float64 (per-stage invoke + hand-off time) or None, ``labels`` is
    ``[N]`` int64 ground truth or None.
    """

    logits: tuple[np.ndarray, ...]
    confidence: tuple[np.ndarray | None, ...]
    scores: tuple[str, ...]
    stage_latency_ms: np.ndarray | None = None
    labels: np.ndarray | None = None

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
