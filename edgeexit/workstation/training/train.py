"""Training and evaluation of early-exit networks.

:func:`train` fits a :class:`~edgeexit.workstation.models.staged.StagedModel` with an EENet loss (v0, v1, v2 or
"two-stage" = v0 warm-up epochs then v2) or the class-based loss, validates after every epoch on a
held-out set and keeps the best epoch. :func:`evaluate` is the reusable per-exit summary (accuracy of
every exit alone, share of inputs leaving at each exit for a threshold, average cost, accuracy of the
early-exit decision).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from edgeexit.datasets import ImageSet
from edgeexit.errors import UsageError
from edgeexit.progress import Progress
from edgeexit.runtime.atomic import write_file_atomic

from ..models.costs import ModelCosts, model_costs
from . import distributed
from .data import batches, shift, shift_offsets, to_tensors
from .losses import EENET_LOSSES, class_based_loss, eenet_loss, used_outputs
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
    device: str | None = None        # None = cuda when available (this rank's GPU under torchrun), else cpu
    amp: bool = False                # CUDA: torch.autocast mixed precision (bfloat16, else float16); CPU: float32

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


def _loss(cfg: TrainConfig, name: str, outputs: Sequence[dict[str, torch.Tensor]], y: torch.Tensor,
          kappa: Sequence[float]) -> torch.Tensor:
    if name == "class":
        return class_based_loss(outputs, y, pos_weight=cfg.class_pos_weight)
    return eenet_loss(outputs, y, kappa, version=name, lam=cfg.lam)


class _LossInputs(nn.Module):
    """The model with only the outputs the current loss reads (``keys[i]`` of exit i).

    Under DDP an output that is computed but not used by the loss would leave its parameters waiting for a
    gradient forever; dropped here, ``find_unused_parameters`` sees them unused and skips them.
    """

    def __init__(self, model: StagedModel):
        super().__init__()
        self.model = model
        self.keys: list[frozenset[str]] | None = None

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        outs = self.model(x)
        if self.keys is None:
            return outs
        return [{k: v for k, v in o.items() if k in keep} for o, keep in zip(outs, self.keys)]


def _autocast(device: torch.device, enabled: bool) -> Any:
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _float(outputs: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Outputs of a mixed-precision forward in float32 for the loss (others as they are)."""
    return [{k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in o.items()} for o in outputs]


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
    return summarize(_trace(model, x, y, distributed.current(), batch_size), model_costs(model), threshold)


def _trace(model: StagedModel, x: torch.Tensor, y: torch.Tensor, info: distributed.Dist,
           batch_size: int = 512) -> ExitTrace:
    """:func:`collect_outputs` on this rank's shard, gathered: the whole set's trace on every rank."""
    if not info.enabled:
        return collect_outputs(model, x, y, batch_size)
    if len(y) < info.world_size:
        raise UsageError(f"{len(y)} evaluation images cannot be shared by {info.world_size} processes; use a larger "
                         "validation set (--val-fraction) or fewer processes")
    rows = distributed.shard(len(y), info)
    part = collect_outputs(model, x[rows], y[rows], batch_size)
    logits, scores, labels = distributed.gather_rows([part.logits, part.scores, part.labels], [1, 1, 0], len(y), info)
    return ExitTrace(logits, scores, labels)


def _set_trainable(model: StagedModel, freeze_trunk: bool) -> None:
    model.train()
    if freeze_trunk:
        for stage in model.stages:
            stage.segment.eval()  # frozen BatchNorm statistics too
            for p in stage.segment.parameters():
                p.requires_grad_(False)


def train(model: StagedModel, train_set: ImageSet, val_set: ImageSet, config: TrainConfig,
          progress: Progress | None = None, state_path: str | os.PathLike | None = None) -> TrainResult:
    """Train ``model`` in place and return it with the weights of its best validation epoch.

    The best epoch has the lowest validation loss among the epochs that use the final loss (after the
    warm-up of two-stage training). Seeded: the same seed, data and config give the same weights on CPU.

    Under ``torchrun`` (an initialised process group, :mod:`.distributed`) every rank calls this with the
    same arguments: each trains on its shard of every global batch of ``config.batch_size`` images with
    DistributedDataParallel, BatchNorm statistics span the global batch, and validation is reduced over the
    ranks, so the result equals a single-process run up to float rounding, on every rank.

    Args:
        model: a fresh or pre-trained StagedModel.
        train_set, val_set: uint8 image sets (normalised with ``model.spec``).
        config: hyper-parameters.
        progress: ``progress("epoch E/N (loss)", images done, images per epoch)`` (see :mod:`edgeexit.progress`);
            only rank 0 reports.
        state_path: resumable training. After every finished epoch the whole training state (weights, optimiser,
            schedule, random generators, best epoch so far, history) is written there atomically; a later call
            with the same path, model, data and config continues from the last finished epoch and ends with the
            same weights as an uninterrupted run (CPU, bit for bit). The file is left in place at the end; delete
            it to train anew. A state written with other settings is refused.

    Raises:
        UsageError: invalid config, or a ``state_path`` written with other settings; DatasetError: data that
        does not fit the model.
    """
    config.validate()
    if config.loss != "class" and config.loss != "v0" and not all(s.head.has_confidence for s in model.stages[:-1]):
        raise UsageError(f"loss '{config.loss}' needs EENet heads with a confidence output; use --loss class "
                         "for class-based heads")
    info = distributed.current()
    local_batch = info.local_batch(config.batch_size)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)  # augmentation; the same draws on every rank
    device = info.device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    amp = config.amp and device.type == "cuda"
    if config.amp and not amp:
        log.warning("mixed precision (--amp) applies to CUDA only; training on %s in float32", device)
    report = progress if info.is_main else None
    costs = model_costs(model)
    kappa = costs.kappa()
    x_tr, y_tr = to_tensors(train_set, model.spec)
    x_va, y_va = to_tensors(val_set, model.spec)
    if len(y_tr) < info.world_size:
        raise UsageError(f"{len(y_tr)} training images cannot be shared by {info.world_size} processes")
    fill = ((0 - torch.tensor(model.spec.mean)) / torch.tensor(model.spec.std)).view(1, -1, 1, 1)  # black pixels
    memory_format = torch.channels_last if device.type == "cpu" else torch.preserve_format
    phases = [config.loss_at(e) for e in range(config.epochs)]
    keys = {name: used_outputs(name, len(model.stages)) for name in set(phases)}
    # the module that trains: under DDP a copy with global-batch BatchNorm (same parameter names and buffers)
    inner = distributed.sync_batchnorm(copy.deepcopy(model), device) if info.enabled else model
    inner.to(device=device, memory_format=memory_format)
    _set_trainable(inner, config.freeze_trunk)  # before DDP: it exchanges the gradients of trainable parameters
    view = _LossInputs(inner)
    net: nn.Module = view
    if info.enabled:
        produced = [frozenset(o) for o in _output_keys(inner)]
        unused = any(produced[i] - keep[i] for keep in keys.values() for i in range(len(produced)))
        net = nn.parallel.DistributedDataParallel(view, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=unused)
        log.info("DistributedDataParallel over %d processes (%s), %d images per process and step, "
                 "find_unused_parameters=%s", info.world_size, info.backend, local_batch, unused)
    params = [p for p in inner.parameters() if p.requires_grad] if not config.freeze_trunk else \
        [p for s in inner.stages for p in s.head.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and not torch.cuda.is_bf16_supported())
    sampler = DistributedSampler(range(len(y_tr)), num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=config.seed, drop_last=False)
    steps_per_epoch = math.ceil(len(sampler) / local_batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch,
                                                pct_start=0.2)
    final_loss = config.loss_at(config.epochs - 1)
    best_state, best_loss, best_epoch, history = None, math.inf, -1, []
    start = time.perf_counter()
    resumable = _Resumable(state_path, config, model, len(y_tr), len(y_va)) if state_path is not None else None
    first_epoch = 0
    if resumable is not None and (saved := resumable.load()) is not None:
        inner.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["schedule"])
        scaler.load_state_dict(saved["scaler"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        best_state, best_loss, best_epoch = saved["best_state"], saved["best_loss"], saved["best_epoch"]
        history, first_epoch = saved["history"], saved["epoch"]
        start -= history[-1]["seconds"] if history else 0.0
        log.info("resuming from %s after epoch %d/%d", state_path, first_epoch, config.epochs)
    for epoch in range(first_epoch, config.epochs):
        name = phases[epoch]
        view.keys = keys[name]
        _set_trainable(inner, config.freeze_trunk)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long)
        total, count = 0.0, 0
        phase = f"epoch {epoch + 1}/{config.epochs} ({name})"
        for begin in range(0, len(order), local_batch):
            idx = order[begin:begin + local_batch]
            xb, yb = x_tr[idx], y_tr[idx]
            if config.augment_shift > 0:
                # offsets for the whole global batch, this rank's positions in it: the same images get the
                # same shifts as in a single process
                dx, dy = shift_offsets(len(idx) * info.world_size, config.augment_shift, gen)
                xb = shift(xb, dx[info.rank::info.world_size], dy[info.rank::info.world_size], config.augment_shift,
                           fill)
            xb = xb.to(device=device, memory_format=memory_format)
            yb = yb.to(device)
            with _autocast(device, amp):
                outputs = net(xb)
            loss = _loss(config, name, _float(outputs), yb, kappa)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += float(loss.detach()) * len(yb)
            count += len(yb)
            if report is not None:
                report(phase, min(count * info.world_size, len(y_tr)), len(y_tr))
        total, count = distributed.all_sum([total, count], info, device)
        val_loss = _validation_loss(inner, x_va, y_va, config, final_loss, kappa, device, info, amp)
        summary = summarize(_trace(inner, x_va, y_va, info), costs)
        row = dict(epoch=epoch + 1, loss=name, train_loss=total / count, val_loss=val_loss,
                   val_final_accuracy=summary.final_accuracy, val_early_exit_accuracy=summary.early_exit_accuracy,
                   val_avg_cost=summary.avg_cost, seconds=time.perf_counter() - start)
        history.append(row)
        log.info("epoch %d/%d %s: train loss %.4f, val loss %.4f, final acc %.4f, early-exit acc %.4f at cost %.3f",
                 epoch + 1, config.epochs, name, row["train_loss"], val_loss, summary.final_accuracy,
                 summary.early_exit_accuracy, summary.avg_cost)
        if name == final_loss and val_loss < best_loss:  # the same reduced value on every rank
            best_loss, best_epoch = val_loss, epoch + 1
            best_state = copy.deepcopy(inner.state_dict())
        if resumable is not None and info.is_main:
            resumable.save(epoch=epoch + 1, model=inner.state_dict(), optimizer=opt.state_dict(),
                           schedule=sched.state_dict(), scaler=scaler.state_dict(), generator=gen.get_state(),
                           torch_rng=torch.get_rng_state(), best_state=best_state, best_loss=best_loss,
                           best_epoch=best_epoch, history=history)
        if resumable is not None and info.enabled:
            torch.distributed.barrier()  # every rank sees the state of this epoch before any can stop
    model.load_state_dict(best_state if best_state is not None else inner.state_dict())
    model.to(device="cpu", memory_format=torch.contiguous_format)
    model.eval()
    seconds = time.perf_counter() - start
    val_summary = summarize(_trace(model, x_va, y_va, info), costs)
    return TrainResult(model, costs, best_epoch, history, val_summary, seconds)


class _Resumable:
    """The per-epoch training state file of :func:`train` (``torch.save`` of a dict, written atomically).

    A state belongs to one run: its key is the config, the model's spec and the sizes of the training and
    validation sets; a state with another key is refused rather than silently mixed into this run.
    """

    FORMAT = "edgeexit-training-state"

    def __init__(self, path: str | os.PathLike, config: TrainConfig, model: StagedModel, n_train: int, n_val: int):
        self.path = Path(path)
        self.key = {"config": asdict(config), "spec": model.spec.to_dict(), "train_images": n_train,
                    "val_images": n_val}

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch's unpickler raises any of a dozen types on junk bytes
            raise UsageError(f"training state {self.path} is not readable (torch.load failed: {type(exc).__name__}); "
                             "delete it to train from the start") from None
        if not isinstance(saved, dict) or saved.get("format") != self.FORMAT:
            raise UsageError(f"{self.path} is not an edgeexit training state; delete it or choose another path")
        if saved.get("key") != self.key:
            raise UsageError(f"training state {self.path} was written by a run with other settings (config, model "
                             "or data); delete it to train anew with these settings, or resume with the same ones")
        return saved

    def save(self, **state: Any) -> None:
        payload = {"format": self.FORMAT, "key": self.key, **state}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(self.path, lambda f: torch.save(payload, f))


@torch.no_grad()
def _output_keys(model: StagedModel) -> list[list[str]]:
    """The keys every exit of ``model`` returns (one eval-mode forward of a single example)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        return [sorted(o) for o in model(model.example_input(1).to(device))]
    finally:
        model.train(was_training)


@torch.no_grad()
def _validation_loss(model: StagedModel, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, name: str,
                     kappa: Sequence[float], device: torch.device, info: distributed.Dist, amp: bool) -> float:
    """Mean loss over the validation set (this rank's shard, summed over the ranks)."""
    model.eval()
    rows = distributed.shard(len(y), info)
    x, y = x[rows], y[rows]
    total = 0.0
    for xb, yb in batches(x, y, 512, shuffle=False):
        with _autocast(device, amp):
            outputs = model(xb.to(device))
        total += float(_loss(cfg, name, _float(outputs), yb.to(device), kappa)) * len(yb)
    total, count = distributed.all_sum([total, len(y)], info, device)
    return total / max(1, count)
