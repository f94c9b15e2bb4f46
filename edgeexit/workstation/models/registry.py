"""Model names -> builders, so that a :class:`~edgeexit.workstation.models.staged.ModelSpec` (stored in every checkpoint)
rebuilds its model: ``build(spec)`` calls ``BUILDERS[spec.builder](**spec.kwargs)``."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from edgeexit.errors import UsageError

from .eenet import build_cifar_resnet, build_eenet_small, build_imagenet_resnet
from .staged import ModelSpec, StagedModel



def _pteenet(**kwargs: Any) -> StagedModel:
    """PTEENet: a (frozen) backbone with exit branches; see :mod:`edgeexit.workstation.posttrain.pteenet` (imported when used)."""
    from ..posttrain.pteenet import build_pteenet

    return build_pteenet(**kwargs, rebuild=build)


BUILDERS: dict[str, Callable[..., StagedModel]] = {
    "eenet-small": build_eenet_small,
    **{f"resnet{d}": partial(build_cifar_resnet, depth=d) for d in (20, 32, 44, 56, 110)},
    **{f"resnet{d}": partial(build_imagenet_resnet, depth=d) for d in (18, 34, 50)},
    "pteenet": _pteenet,
}


def create(name: str, **kwargs: Any) -> StagedModel:
    """Build a fresh model by registry name (e.g. ``create("resnet20", num_classes=10, exits=3)``).

    Raises:
        UsageError: unknown name (the message lists the valid ones).
    """
    if name not in BUILDERS:
        raise UsageError(f"unknown model '{name}'; expected one of {', '.join(BUILDERS)}")
    kwargs.pop("depth", None)  # fixed by the name
    return BUILDERS[name](**kwargs)


def build(spec: ModelSpec) -> StagedModel:
    """Rebuild the (untrained) model a spec describes; the returned model carries ``spec`` itself."""
    model = create(spec.builder, **spec.kwargs)
    model.spec = spec
    return model
