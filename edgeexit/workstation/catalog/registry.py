"""Model names -> builders, so that a :class:`~edgeexit.workstation.models.staged.ModelSpec` (stored in every checkpoint)
rebuilds its model: ``build(spec)`` calls ``BUILDERS[spec.builder](**spec.kwargs)``."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from edgeexit.errors import UsageError

from ..models.eenet import build_cifar_resnet, build_eenet_small, build_imagenet_resnet
from ..models.staged import ModelSpec, StagedModel



def _pteenet(**kwargs: Any) -> StagedModel:
    """PTEENet: a (frozen) backbone with exit branches; see :mod:`edgeexit.workstation.posttrain.pteenet` (imported when used)."""
    from ..posttrain.pteenet import build_pteenet

    return build_pteenet(**kwargs, rebuild=build)


BUILDERS: dict[str, Callable[..., StagedModel]] = {
    "eenet-small": build_eenet_small,
    **{f"eenet-resnet{d}": partial(build_cifar_resnet, depth=d) for d in (20, 32, 44, 56, 110)},
    **{f"eenet-resnet{d}": partial(build_imagenet_resnet, depth=d) for d in (18, 34, 50)},
    "pteenet": _pteenet,
}

#: The EENet ResNets' ids before they were renamed: checkpoints trained then store them as their builder, so
#: :func:`create` (and with it :func:`build`) still accepts them. ``resnet18``/``resnet50`` elsewhere mean
#: torchvision's layout (``post-train --backbone``, :mod:`edgeexit.workstation.models.zoo`), which is why these were
#: renamed.
RENAMED: dict[str, str] = {f"resnet{d}": f"eenet-resnet{d}" for d in (20, 32, 44, 56, 110, 18, 34, 50)}


def create(name: str, **kwargs: Any) -> StagedModel:
    """Build a fresh model by registry name (e.g. ``create("eenet-resnet20", num_classes=10, exits=3)``); an old id
    of :data:`RENAMED` builds the model it named.

    Raises:
        UsageError: unknown name (the message lists the valid ones).
    """
    name = RENAMED.get(name, name)
    if name not in BUILDERS:
        raise UsageError(f"unknown model '{name}'; expected one of {', '.join(BUILDERS)}")
    kwargs.pop("depth", None)  # fixed by the name
    return BUILDERS[name](**kwargs)


def build(spec: ModelSpec) -> StagedModel:
    """Rebuild the (untrained) model a spec describes; the returned model carries ``spec`` itself."""
    model = create(spec.builder, **spec.kwargs)
    model.spec = spec
    return model
