"""ImageSet (uint8 NHWC) -> normalised float32 NCHW torch tensors, batches and light augmentation."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from edgeexit.datasets import ImageSet
from edgeexit.errors import DatasetError

from ..models.staged import ModelSpec

#: ITU-R 601 luma weights used when an RGB set meets a grey model.
LUMA = (0.299, 0.587, 0.114)


def to_tensors(data: ImageSet, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as the model sees them: x = (uint8 / 255 - mean) / std.

    Grey images meeting an RGB model are repeated over 3 channels; RGB images meeting a grey model are
    converted with the ITU-R 601 luma weights.

    Returns:
        (x [N, C, H, W] float32, y [N] int64).

    Raises:
        DatasetError: image size or class count that does not fit the model.
    """
    c, h, w = spec.input_shape
    n, ih, iw, ic = data.images.shape
    if (ih, iw) != (h, w):
        raise DatasetError(f"{data.name} has {iw}x{ih} images but the model takes {w}x{h}; "
                           "resize the dataset or build the model with a matching input_shape")
    if len(data.classes) > len(spec.labels):
        raise DatasetError(f"{data.name} has {len(data.classes)} classes but the model has {len(spec.labels)} outputs")
    x = torch.from_numpy(np.ascontiguousarray(data.images)).permute(0, 3, 1, 2).float() / 255.0  # [N, C, H, W]
    if ic == 1 and c == 3:
        x = x.expand(-1, 3, -1, -1)
    elif ic == 3 and c == 1:
        x = (x * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif ic != c:
        raise DatasetError(f"{data.name} has {ic}-channel images but the model takes {c} channels")
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, c, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, c, 1, 1)
    x = ((x - mean) / std).contiguous()
    return x, torch.from_numpy(data.labels.astype(np.int64))


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Shift every image of a batch [N, C, H, W] by up to ``max_shift`` pixels (one random offset per batch
    row via padding and cropping); ``fill`` [1, C, 1, 1] is the padding value (default 0)."""
    if max_shift <= 0:
        return x
    dx, dy = shift_offsets(x.shape[0], max_shift, generator)
    return shift(x, dx, dy, max_shift, fill)


def shift_offsets(n: int, max_shift: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random offsets (dx [n], dy [n]) in [0, 2 * max_shift] for :func:`shift`."""
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    return dx, dy


def shift(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, max_shift: int,
          fill: torch.Tensor | None = None) -> torch.Tensor:
    """Shift image i of [N, C, H, W] by (dx[i] - max_shift, dy[i] - max_shift) pixels, padding with ``fill``."""
    n, c, h, w = x.shape
    pad_value = fill if fill is not None else torch.zeros(1, c, 1, 1)
    padded = F.pad(x - pad_value, (max_shift,) * 4) + pad_value  # [N, C, H+2s, W+2s]
    rows = (dy[:, None] + torch.arange(h)[None, :])               # [N, H]
    cols = (dx[:, None] + torch.arange(w)[None, :])               # [N, W]
    idx_n = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) mini-batches, optionally in a seeded random order (no worker processes)."""
    n = int(y.shape[0])
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]
