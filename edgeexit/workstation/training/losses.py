"""Training losses of the early-exit methods: EENets (*EENets: Early Exit Convolutional Neural Networks*) and
class-based early exit (*Early Classification for Dynamic Inference of Neural Networks*).

EENet losses are built backwards from the last exit ``N`` with p_i = softmax(logits_i),
c_i = sigmoid(confidence_i) and kappa_i the exit's cost fraction (:meth:`ModelCosts.kappa`):

    Y_N = p_N,  K_N = kappa_N (= 1)
    Y_i = c_i * p_i + (1 - c_i) * Y_{i+1}
    K_i = c_i * kappa_i + (1 - c_i) * K_{i+1}

* ``v0``: sum_i NLL(p_i, y)                        (warm-up; no confidence training)
* ``v1``: NLL(Y_0, y) + lambda * mean(K_0)
* ``v2``: sum_i [NLL(Y_i, y) + lambda * mean(K_i)]  (the authors' default)

NLL(Y, y) = mean over the batch of -log(Y[y]). The class-based loss is
CE(final logits, y) + sum_k w_k * BCEWithLogits(z_k, onehot(y), pos_weight).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from edgeexit.errors import UsageError

EENET_LOSSES = ("v0", "v1", "v2")
#: smallest probability fed to log() in the EENet NLL (keeps -log finite when a mixture underflows).
PROB_FLOOR = 1e-12


def _mixtures(outputs: Sequence[dict[str, torch.Tensor]], kappa: Sequence[float]) -> tuple[list, list]:
    """Y_i [N, K] and K_i [N] for every exit, built backwards from the last one."""
    if len(kappa) != len(outputs):
        raise UsageError(f"{len(kappa)} cost fractions given for {len(outputs)} exits; give one kappa per exit")
    last = outputs[-1]["logits"]
    y_next = F.softmax(last, dim=1)                                   # [N, K]
    k_next = torch.full((last.shape[0],), float(kappa[-1]), dtype=last.dtype, device=last.device)
    ys, ks = [y_next], [k_next]
    for i in range(len(outputs) - 2, -1, -1):
        if "confidence" not in outputs[i]:
            raise UsageError(f"exit {i} has no confidence output; EENet losses v1/v2 need EENet heads "
                             "(use --loss v0 or the class-based loss for other heads)")
        c = torch.sigmoid(outputs[i]["confidence"]).reshape(-1)      # [N]
        p = F.softmax(outputs[i]["logits"], dim=1)                    # [N, K]
        y_next = c[:, None] * p + (1 - c[:, None]) * y_next
        k_next = c * float(kappa[i]) + (1 - c) * k_next
        ys.append(y_next)
        ks.append(k_next)
    return ys[::-1], ks[::-1]


def _nll(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -torch.log(probs.gather(1, target[:, None]).clamp_min(PROB_FLOOR)).mean()


def eenet_loss(outputs: Sequence[dict[str, torch.Tensor]], target: torch.Tensor, kappa: Sequence[float],
               version: str = "v2", lam: float = 1.0) -> torch.Tensor:
    """EENet training loss.

    Args:
        outputs: one head dict per exit ({"logits": [N, K], "confidence": [N, 1]}), last = final exit.
        target: [N] int64 class indices.
        kappa: cost fraction of each exit (EENet's kappa; the last is 1).
        version: "v0", "v1" or "v2".
        lam: lambda, the weight of the cost term (v1, v2).

    Returns:
        A scalar tensor.
    """
    if version not in EENET_LOSSES:
        raise UsageError(f"unknown EENet loss '{version}'; expected one of {', '.join(EENET_LOSSES)}")
    if version == "v0":
        return sum(F.cross_entropy(o["logits"], target) for o in outputs)  # type: ignore[return-value]
    ys, ks = _mixtures(outputs, kappa)
    if version == "v1":
        return _nll(ys[0], target) + lam * ks[0].mean()
    return sum(_nll(y, target) + lam * k.mean() for y, k in zip(ys, ks))  # type: ignore[return-value]


def used_outputs(loss: str, num_exits: int) -> list[frozenset[str]]:
    """The head outputs ``loss`` reads, per exit: logits everywhere, confidences of the early exits for v1/v2.

    Distributed training drops the other outputs before the loss (their parameters get no gradient).
    """
    if loss in ("v1", "v2"):
        return [frozenset({"logits", "confidence"})] * (num_exits - 1) + [frozenset({"logits"})]
    if loss in ("v0", "class"):
        return [frozenset({"logits"})] * num_exits
    raise UsageError(f"unknown loss '{loss}'; expected one of {', '.join(EENET_LOSSES + ('class',))}")


def class_based_loss(outputs: Sequence[dict[str, torch.Tensor]], target: torch.Tensor,
                     weights: Sequence[float] | None = None, pos_weight: float = 9.0) -> torch.Tensor:
    """Class-based early-exit loss: CE on the final exit + sum_k w_k * BCEWithLogits(z_k, onehot(y)).

    Args:
        outputs: head dicts; exits 0..N-1 give per-class sigmoid logits, exit N softmax logits.
        target: [N] int64.
        weights: w_k per early exit (default: (k+1)/N, smaller for earlier exits).
        pos_weight: weight of the positive class in the BCE (K-1 balances one positive against K-1 negatives).
    """
    early = outputs[:-1]
    if weights is None:
        weights = [(k + 1) / len(outputs) for k in range(len(early))]
    if len(weights) != len(early):
        raise UsageError(f"{len(weights)} class-loss weights given for {len(early)} early exits; give one per exit")
    loss = F.cross_entropy(outputs[-1]["logits"], target)
    for w, out in zip(weights, early):
        z = out["logits"]
        onehot = F.one_hot(target, z.shape[1]).to(z.dtype)
        pw = torch.full((z.shape[1],), float(pos_weight), dtype=z.dtype, device=z.device)
        loss = loss + float(w) * F.binary_cross_entropy_with_logits(z, onehot, pos_weight=pw)
    return loss
