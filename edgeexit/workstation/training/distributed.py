"""Data-parallel training over several processes: PyTorch DistributedDataParallel launched by ``torchrun``.

``edgeexit train``, ``sweep`` and ``post-train`` join the process group that ``torchrun`` describes in the
environment (:func:`session`); outside torchrun nothing changes. The training loop asks :func:`current` for
its rank and world size, so one loop serves 1 and N processes:

* Global batch = ``--batch-size``: every rank takes ``batch_size / world_size`` images per step from a
  :class:`~torch.utils.data.DistributedSampler` (seeded, reshuffled with ``set_epoch``); the ranks' shards of
  step k together are exactly the single-process batch k, and DDP's gradient average is then its gradient.
* BatchNorm statistics are computed over the global batch (:func:`sync_batchnorm`: ``torch.nn.SyncBatchNorm``
  on CUDA, :class:`GlooSyncBatchNorm` on CPU, where torch's one does not run), augmentation offsets are drawn
  for the global batch on every rank, so N processes compute what one process computes (up to float
  rounding).
* Validation is sharded and reduced (:func:`all_sum`, :func:`gather_rows`); every rank picks the same best
  epoch. Only rank 0 writes files and shows progress (:attr:`Dist.is_main`).
* Collectives time out after ``EDGEEXIT_DIST_TIMEOUT`` seconds (default 600), so a rank whose peer died
  never waits forever; torchrun itself stops the other ranks when one exits with an error.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from edgeexit.errors import UsageError

log = logging.getLogger(__name__)

#: environment variable: seconds a collective may wait for the other ranks before the run fails.
TIMEOUT_ENV = "EDGEEXIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """More than one process: gradients, statistics and results are reduced across ranks."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes files, prints results and shows progress."""
        return self.rank == 0

    def device(self, name: str | None) -> torch.device:
        """The training device: ``name``, else this rank's GPU (LOCAL_RANK) when CUDA is available, else CPU."""
        if name is None:
            if torch.cuda.is_available():
                return torch.device("cuda", self.local_rank if self.backend else torch.cuda.current_device())
            return torch.device("cpu")
        device = torch.device(name)
        if self.backend == "nccl" and device.type != "cuda":
            raise UsageError(f"the process group uses NCCL (GPUs) but training was asked to run on {name}; "
                             "train on the GPUs or launch on a machine without CUDA (gloo on CPU)")
        return device

    def local_batch(self, batch_size: int) -> int:
        """Images per rank and step for a global ``batch_size``."""
        if batch_size % self.world_size:
            raise UsageError(f"--batch-size {batch_size} is not divisible by the {self.world_size} processes; the global "
                             f"batch is split evenly over them: use a multiple of {self.world_size}")
        return batch_size // self.world_size


def current() -> Dist:
    """This process's :class:`Dist` (from the initialised default process group, if any)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_backend())
    return Dist()


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting RANK/WORLD_SIZE/MASTER_ADDR) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UsageError(f"${TIMEOUT_ENV}={raw!r} must be a number of seconds > 0, e.g. {DEFAULT_TIMEOUT_S}")
    return datetime.timedelta(seconds=seconds)


@contextmanager
def session() -> Iterator[Dist]:
    """Join torchrun's process group for the duration of a command (a no-op outside torchrun).

    NCCL when CUDA is available (one GPU per process, ``LOCAL_RANK``), gloo otherwise. Ranks other than 0 log
    warnings and errors only. The group is left on success; on an error the process exits without waiting
    for its peers (torchrun then stops them, or their collectives time out).

    Leaving on success: a garbage collection first, then a barrier, then ``destroy_process_group``. A
    ``DistributedDataParallel`` sits in reference cycles, so without the collection it outlived the group and
    was torn down while the interpreter exited, where gloo aborted the process ("terminate called without an
    active exception", exit -6) in 4 of 60 two-process post-train runs on this CPU, and torchrun then killed
    the peer that was writing the checkpoint.
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed; install the pinned torch to train under torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): start at most "
                             f"{torch.cuda.device_count()} processes per machine (--nproc-per-node)")
        torch.cuda.set_device(local_rank)
    kwargs: dict[str, Any] = {"device_id": torch.device("cuda", local_rank)} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=_timeout(), **kwargs)
    info = current()
    if not info.is_main:
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    log.info("distributed training: %d processes, backend %s", info.world_size, backend)
    yield info
    gc.collect()  # the command's DistributedDataParallel goes now, while its group is alive
    dist.barrier()
    dist.destroy_process_group()


def all_sum(values: list[float], info: Dist, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64; the same result on every rank)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device if info.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def shard(n: int, info: Dist) -> slice:
    """This rank's rows of an unshuffled set of ``n`` (rows rank, rank + W, ...): evaluation shards."""
    return slice(info.rank, n, info.world_size)


def gather_rows(parts: list[np.ndarray], axes: list[int], n: int, info: Dist) -> list[np.ndarray]:
    """Undo :func:`shard`: every rank's arrays (rows along ``axes[i]`` of ``parts[i]``) back in the original
    order of the ``n`` rows, on every rank."""
    if not info.enabled:
        return parts
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, parts)
    out = []
    for i, (first, axis) in enumerate(zip(parts, axes)):
        shape = list(first.shape)
        shape[axis] = n
        full = np.empty(shape, dtype=first.dtype)
        for rank, rank_parts in enumerate(gathered):
            index = [slice(None)] * first.ndim
            index[axis] = shard(n, Dist(rank, info.world_size))
            full[tuple(index)] = rank_parts[i]
        out.append(full)
    return out


def same_on_every_rank(text: str, info: Dist) -> list[str]:
    """Every rank's ``text`` (e.g. a digest), in rank order."""
    if not info.enabled:
        return [text]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, text)
    return [str(v) for v in gathered]


# --------------------------------------------------------------------------------------- BatchNorm

class _GlobalBatchNorm(torch.autograd.Function):
    """Training-mode batch normalisation over the union of every rank's batch (two all-reduces forward, one
    backward). Gradients of weight and bias are this rank's; DDP averages them like any parameter's."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, eps: float,
                factor: float) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        stats = torch.cat([x.sum(dims, dtype=torch.float64),
                           torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64)])
        dist.all_reduce(stats)
        n = float(stats[-1])
        mean = (stats[:-1] / n).to(x.dtype)
        centred = x - mean.view(shape)
        sq = (centred * centred).sum(dims, dtype=torch.float64)
        dist.all_reduce(sq)
        var = (sq / n).to(x.dtype)
        invstd = torch.rsqrt(var + eps)
        xhat = centred * invstd.view(shape)
        y = xhat if weight is None else xhat * weight.view(shape) + bias.view(shape)
        if running_mean is not None and running_var is not None:
            running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            running_var.mul_(1 - factor).add_(var.detach() * (n / max(n - 1, 1)), alpha=factor)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.n = n
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        xhat, invstd, weight = ctx.saved_tensors
        dims = [0] + list(range(2, dy.dim()))
        shape = [1, -1] + [1] * (dy.dim() - 2)
        dbias = dy.sum(dims)
        dweight = (dy * xhat).sum(dims)
        sums = torch.cat([dbias, dweight]).double()
        dist.all_reduce(sums)
        sum_dy, sum_dy_xhat = sums.to(dy.dtype).chunk(2)
        scale = invstd if weight is None else weight * invstd
        dx = (dy - (sum_dy / ctx.n).view(shape) - xhat * (sum_dy_xhat / ctx.n).view(shape)) * scale.view(shape)
        if weight is None:
            return dx, None, None, None, None, None, None
        return dx, dweight, dbias, None, None, None, None


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span every rank's batch, for CPU processes (gloo).

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this is its CPU counterpart with the same state (weight,
    bias, running_mean, running_var, num_batches_tracked), so checkpoints do not change. Outside training,
    or in a single process, it is plain BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        track = self.track_running_stats and self.running_mean is not None
        return _GlobalBatchNorm.apply(x, self.weight, self.bias, self.running_mean if track else None,
                                      self.running_var if track else None, self.eps, factor)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm computing statistics over the global batch (in place; shares the
    parameters and buffers of the BatchNorms it replaces)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlooSyncBatchNorm):
            new = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module
