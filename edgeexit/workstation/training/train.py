"""Training and evaluation of early-exit networks.

:func:`train` fits a :class:`~edgeexit.workstation.models.staged.StagedModel` with an EENet loss (v0, v1, v2 or
"two-stage" = v0 warm-up epochs then v2) or the class-based loss, validates after every epoch on a
held-out set and keeps the best epoch. :func:`evaluate` is the reusable per-exit summary (accuracy of
every exit alone, share of inputs leaving at each exit for a threshold, average cost, accuracy of the
early-exit decision).
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from edgeexit.bench.datasets import ImageSet
from edgeexit.errors import UsageError

from ..convert.costs import ModelCosts, model_costs
from .data import batches, random_shift, to_tensors
from .losses import EENET_LOSSES, class_based_loss, eenet_loss
from ..models.staged import StagedModel

log = logging.getLogger(__name__)

LOSSES = EENET_LOSSES + ("two-stage", "class")


@dataclass
class TrainConfig:
    """Training hyper-parameters (stored in the checkpoint's ``spec.extra["train"]``)."""

    epochs: int = 2
    batch_size: int = 128
    lr: float = 3e-3                 # peak learning rate of the one-cycle schedule (AdamW)
    weight_decay: float = 5e-4
    seed: int = 0
    loss: str = "two-stage"          # v0 | v1 | v2 | two-stage | class
    lam: float = 0.05                # lambda of the EENet cost term (the authors use 1.0; see the MNIST lambda sweep)
    warmup_epochs: int = 1           # v0 epochs before v2 when loss == "two-stage"
    class_pos_weight: float = 9.0    # class-based loss: BCE positive-class weight
    augment_shift: int = 0           # random shift in pixels (0 = no augmentation)
    freeze_trunk: bool = False       # PTEENet: train only the exit heads
    device: str | None = None        # None = cuda when available, else cpu

    def validate(self) -> None:
        """Raise :class:`UsageError` for values that cannot train."""
        if self.loss not in LOSSES:
            raise UsageError(f"unknown loss '{self.loss}'; expected one of {', '.join(LOSSES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError(f"epochs and batch size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.lam < 0 or not math.isfinite(self.lam):
            raise UsageError(f"lr must be > 0 and lambda >= 0, got lr={self.lr} lambda={self.lam}")
        if self.loss == "two-stage" and not 0 <= self.warmup_epochs < self.epochs:
            raise UsageError(f"two-stage training needs 0 <= warmup epochs < epochs, got {self.warmup_epochs} "
                             f"warm-up of {self.epochs}; raise --epochs")

    def loss_at(self, epoch: int) -> str:
        """The loss used in ``epoch`` (0-based)."""
        if self.loss == "two-stage":
            return "v0" if epoch < self.warmup_epochs else "v2"
        return self.loss


@dataclass
class EvalSummary:
    """Per-exit results of a model on a labelled set at one threshold.

    ``exit_share[i]`` is the share of inputs that leave at exit i (confidence rule: sigmoid(conf_i) > T;
    heads without a confidence: max class score >= T; the last exit takes the rest). Costs are fractions of
    the full network: ``avg_cost`` counts every head an input paid for, ``avg_cost_kappa`` uses EENet's kappa.
    """

    threshold: float
    num_samples: int
    exit_accuracy: list[float]
    exit_share: list[float]
    exit_correct_share: list[float]   # accuracy of the inputs that left at exit i (nan if none)
    early_exit_accuracy: float
    avg_cost: float
    avg_cost_kappa: float
    kappa: list[float]
    cumulative: list[float]

    @property
    def final_accuracy(self) -> float:
        return self.exit_accuracy[-1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exit_correct_share"] = [None if math.isnan(v) else v for v in self.exit_correct_share]
        d["final_accuracy"] = self.final_accuracy
        return d

    def table(self) -> str:
        """A plain-text per-exit table."""
        lines = [f"{'exit':>4} {'accuracy':>9} {'cost':>7} {'kappa':>7} {'exits@T':>8} {'acc(exited)':>11}"]
        for i, (a, s, c, k, ca) in enumerate(zip(self.exit_accuracy, self.exit_share, self.cumulative, self.kappa,
                                                  self.exit_correct_share)):
            acc_exited = "-" if math.isnan(ca) else f"{100 * ca:.2f}%"
            lines.append(f"{i:>4} {100 * a:>8.2f}% {c:>7.3f} {k:>7.3f} {100 * s:>7.1f}% {acc_exited:>11}")
        lines.append(f"early exit at T={self.threshold:g}: accuracy {100 * self.early_exit_accuracy:.2f}% "
                     f"(final exit {100 * self.final_accuracy:.2f}%), average cost {self.avg_cost:.3f} of the full "
                     f"network (kappa-based {self.avg_cost_kappa:.3f}), {self.num_samples} images")
        return "\n".join(lines)


@dataclass
class ExitTrace:
    """Every exit's outputs on a set: logits [E, N, K] float32, scores [E, N] (the value the exit rule
    compares with T: sigmoid(confidence), or the max class score when a head has no confidence), labels [N]."""

    logits: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


@dataclass
class TrainResult:
    """What :func:`train` returns: the model (best epoch's weights, eval mode) and its history."""

    model: StagedModel
    costs: ModelCosts
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    val_summary: EvalSummary | None = None
    seconds: float = 0.0


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _loss(cfg: TrainConfig, name: str, outputs: Sequence[dict[str, torch.Tensor]], y: torch.Tensor,
          kappa: Sequence[float]) -> torch.Tensor:
    if name == "class":
        return class_based_loss(outputs, y, pos_weight=cfg.class_pos_weight)
    return eenet_loss(outputs, y, kappa, version=name, lam=cfg.lam)


@torch.no_grad()
def collect_outputs(model: StagedModel, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> ExitTrace:
    """Run every exit on ``x`` [N, C, H, W] (eval mode) and gather logits and exit scores."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, scores = [], []
    try:
        for xb, _ in batches(x, y, batch_size, shuffle=False):
            outs = model(xb.to(device))
            logits.append(torch.stack([o["logits"].float().cpu() for o in outs]))   # [E, B, K]
            s = []
            for stage, o in zip(model.stages, outs):
                if "confidence" in o:
                    s.append(torch.sigmoid(o["confidence"].float().cpu()).reshape(-1))
                elif stage.head.scores == "sigmoid":
                    s.append(torch.sigmoid(o["logits"].float().cpu()).amax(1))
                else:
                    s.append(torch.softmax(o["logits"].float().cpu(), 1).amax(1))
            scores.append(torch.stack(s))                                            # [E, B]
    finally:
        model.train(was_training)
    return ExitTrace(torch.cat(logits, 1).numpy(), torch.cat(scores, 1).numpy(), y.numpy().astype(np.int64))


def summarize(trace: ExitTrace, costs: ModelCosts, threshold: float = 0.5) -> EvalSummary:
    """Per-exit summary of a trace at one threshold (see :class:`EvalSummary`)."""
    e, n = trace.scores.shape
    pred = trace.logits.argmax(2)                                   # [E, N]
    correct = pred == trace.labels[None, :]                         # [E, N]
    leaves = trace.scores > threshold                               # [E, N]
    leaves[-1] = True
    exit_idx = leaves.argmax(0)                                     # [N] first exit taken
    taken_correct = correct[exit_idx, np.arange(n)]
    cum, kap = np.array(costs.cumulative()), np.array(costs.kappa())
    share = np.bincount(exit_idx, minlength=e) / n
    exited_acc = [float(taken_correct[exit_idx == i].mean()) if (exit_idx == i).any() else float("nan")
                  for i in range(e)]
    return EvalSummary(threshold=float(threshold), num_samples=int(n),
                       exit_accuracy=[float(v) for v in correct.mean(1)], exit_share=[float(v) for v in share],
                       exit_correct_share=exited_acc, early_exit_accuracy=float(taken_correct.mean()),
                       avg_cost=float(cum[exit_idx].mean()), avg_cost_kappa=float(kap[exit_idx].mean()),
                       kappa=[float(v) for v in kap], cumulative=[float(v) for v in cum])


def evaluate(model: StagedModel, data: ImageSet, threshold: float = 0.5, batch_size: int = 512) -> EvalSummary:
    """Evaluate ``model`` on a labelled image set at one exit threshold.

    Args:
        model: a trained StagedModel (it is run in eval mode; its mode is restored afterwards).
        data: uint8 images; they are normalised with ``model.spec``.
        threshold: T of the exit rule (sigmoid(confidence) > T, or max score >= T without a confidence).
        batch_size: evaluation batch size.

    Returns:
        An :class:`EvalSummary`.
    """
    x, y = to_tensors(data, model.spec)
    return summarize(collect_outputs(model, x, y, batch_size), model_costs(model), threshold)


def _set_trainable(model: StagedModel, freeze_trunk: bool) -> None:
    model.train()
    if freeze_trunk:
        for stage in model.stages:
            stage.segment.eval()  # frozen BatchNorm statistics too
            for p in stage.segment.parameters():
                p.requires_grad_(False)


def train(model: StagedModel, train_set: ImageSet, val_set: ImageSet, config: TrainConfig,
          progress: bool | None = None) -> TrainResult:
    """Train ``model`` in place and return it with the weights of its best validation epoch.

    The best epoch has the lowest validation loss among the epochs that use the final loss (after the
    warm-up of two-stage training). Seeded: the same seed, data and config give the same weights on CPU.

    Args:
        model: a fresh or pre-trained StagedModel.
        train_set, val_set: uint8 image sets (normalised with ``model.spec``).
        config: hyper-parameters.
        progress: show a tqdm bar on stderr (None = only when stderr is a terminal).

    Raises:
        UsageError: invalid config; DatasetError: data that does not fit the model.
    """
    config.validate()
    if config.loss != "class" and config.loss != "v0" and not all(s.head.has_confidence for s in model.stages[:-1]):
        raise UsageError(f"loss '{config.loss}' needs EENet heads with a confidence output; use --loss class "
                         "for class-based heads")
    from tqdm import tqdm  # workstation dependency, only needed here

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    device = _device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    show = sys.stderr.isatty() if progress is None else progress
    costs = model_costs(model)
    kappa = costs.kappa()
    x_tr, y_tr = to_tensors(train_set, model.spec)
    x_va, y_va = to_tensors(val_set, model.spec)
    fill = ((0 - torch.tensor(model.spec.mean)) / torch.tensor(model.spec.std)).view(1, -1, 1, 1)  # black pixels
    memory_format = torch.channels_last if device.type == "cpu" else torch.preserve_format
    model.to(device=device, memory_format=memory_format)
    params = [p for p in model.parameters() if p.requires_grad] if not config.freeze_trunk else \
        [p for s in model.stages for p in s.head.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(y_tr) / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.2)
    final_loss = config.loss_at(config.epochs - 1)
    best_state, best_loss, best_epoch, history = None, math.inf, -1, []
    start = time.perf_counter()
    for epoch in range(config.epochs):
        name = config.loss_at(epoch)
        _set_trainable(model, config.freeze_trunk)
        total, count = 0.0, 0
        bar = tqdm(total=len(y_tr), desc=f"epoch {epoch + 1}/{config.epochs} ({name})", unit="img",
                   disable=not show, file=sys.stderr, leave=False)
        for xb, yb in batches(x_tr, y_tr, config.batch_size, shuffle=True, generator=gen):
            xb = random_shift(xb, config.augment_shift, gen, fill)
            xb = xb.to(device=device, memory_format=memory_format)
            yb = yb.to(device)
            loss = _loss(config, name, model(xb), yb, kappa)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(yb)
            count += len(yb)
            bar.update(len(yb))
            bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        val_loss = _validation_loss(model, x_va, y_va, config, final_loss, kappa, device)
        summary = summarize(collect_outputs(model, x_va, y_va), costs)
        row = dict(epoch=epoch + 1, loss=name, train_loss=total / count, val_loss=val_loss,
                   val_final_accuracy=summary.final_accuracy, val_early_exit_accuracy=summary.early_exit_accuracy,
                   val_avg_cost=summary.avg_cost, seconds=time.perf_counter() - start)
        history.append(row)
        log.info("epoch %d/%d %s: train loss %.4f, val loss %.4f, final acc %.4f, early-exit acc %.4f at cost %.3f",
                 epoch + 1, config.epochs, name, row["train_loss"], val_loss, summary.final_accuracy,
                 summary.early_exit_accuracy, summary.avg_cost)
        if name == final_loss and val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to(device="cpu", memory_format=torch.contiguous_format)
    model.eval()
    seconds = time.perf_counter() - start
    val_summary = summarize(collect_outputs(model, x_va, y_va), costs)
    return TrainResult(model, costs, best_epoch, history, val_summary, seconds)


@torch.no_grad()
def _validation_loss(model: StagedModel, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, name: str,
                     kappa: Sequence[float], device: torch.device) -> float:
    model.eval()
    total = 0.0
    for xb, yb in batches(x, y, 512, shuffle=False):
        total += float(_loss(cfg, name, model(xb.to(device)), yb.to(device), kappa)) * len(yb)
    return total / max(1, len(y))
