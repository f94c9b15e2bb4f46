"""Class-based early exit: the authors' beta search and exclusion statistics on hand-made traces."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")  # workstation-only tests: skipped in the device environments

from converters.classexit import beta_search, exclusion_stats
from edgeexit.errors import UsageError
from edgeexit.rules import Trace

K = 3
N = 1000


def _trace(early: np.ndarray, labels: np.ndarray) -> Trace:
    final = np.full((len(labels), K), -5.0, np.float32)
    final[np.arange(len(labels)), labels] = 5.0  # the final classifier is always right: baseline 100%
    return Trace(logits=(early.astype(np.float32), final), confidence=(None, None), scores=("sigmoid", "softmax"),
                 labels=labels)


def _confident_exit(labels: np.ndarray) -> np.ndarray:
    z = np.full((len(labels), K), -10.0, np.float32)
    z[np.arange(len(labels)), labels] = 10.0
    return z


def test_beta_rises_to_the_cap_when_exclusion_never_hurts():
    labels = np.arange(N) % K
    result = beta_search(_trace(_confident_exit(labels), labels))
    assert result.betas == (0.99,)
    assert result.accuracy == result.baseline_accuracy == 1.0
    assert result.exit_fractions == [1.0, 0.0]  # one class left after the first exit for every input


def test_beta_backs_off_two_steps_from_the_first_failing_value():
    labels = np.arange(N) % K
    z = _confident_exit(labels)
    # 5 inputs (0.5 pp): a wrong class scores sigmoid(10) ~ 1, the right one sigmoid(0) = 0.5. The right class
    # is excluded once beta * 0.99995 >= 0.5, i.e. from beta = 0.51: the search must stop at 0.51 - 0.02.
    for i in range(5):
        wrong = (labels[i] + 1) % K
        z[i, labels[i]], z[i, wrong] = 0.0, 10.0
    result = beta_search(_trace(z, labels))
    assert result.betas == (0.49,)
    assert result.accuracy == 1.0
    tried = dict(result.history[0])
    assert tried[0.5] == 1.0 and tried[0.51] == pytest.approx(1.0 - 5 / N)
    assert max(tried) == 0.51  # nothing tried after the first failure


def test_tolerance_of_a_tenth_of_a_point_is_allowed():
    labels = np.arange(N) % K
    z = _confident_exit(labels)
    wrong = (labels[0] + 1) % K
    z[0, labels[0]], z[0, wrong] = 0.0, 10.0  # one input = 0.1 pp: not below baseline - 0.1 pp
    result = beta_search(_trace(z, labels), tolerance=0.0015)
    assert result.betas == (0.99,)


def test_beta_clamps_to_the_minimum_when_the_first_step_fails():
    labels = np.arange(N) % K
    z = _confident_exit(labels)
    z[:20] = _confident_exit((labels[:20] + 1) % K)  # confidently wrong: excluded at any beta
    result = beta_search(_trace(z, labels))
    assert result.betas == (0.01,)


def test_exclusion_stats_count_removed_classes():
    labels = np.arange(N) % K
    z = np.zeros((N, K), np.float32)  # all classes tie at the first exit: nothing excluded, nobody exits
    stats = exclusion_stats(_trace(z, labels), [0.5])
    assert stats.excluded_mean[0] == 0.0 and stats.remaining_mean[0] == K and stats.exited == [0.0, 1.0]
    stats = exclusion_stats(_trace(_confident_exit(labels), labels), [0.5])
    assert stats.excluded_mean[0] == K - 1 and stats.exited == [1.0, 0.0] and stats.reached == [1.0, 0.0]


def test_search_needs_labels():
    labels = np.arange(10) % K
    trace = _trace(_confident_exit(labels), labels)
    with pytest.raises(UsageError, match="labelled"):
        beta_search(Trace(trace.logits, trace.confidence, trace.scores, labels=None))
