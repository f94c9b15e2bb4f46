"""PTEENet: early-exit branches post-trained on a frozen, already trained backbone (*PTEENet: Post-Trained
Early-Exit Neural Networks Augmentation for Inference Cost Optimization*).

The backbone (a zoo network with torchvision weights, an edgeexit checkpoint, or any traceable module)
is cut at named submodules (:mod:`edgeexit.workstation.own.split`); its pieces become the segments of a
:class:`~edgeexit.workstation.models.staged.StagedModel`, its own classifier becomes the final exit, and a convolutional
EENet branch (1-3 x [conv3x3 + BN + ReLU], global average pool, sigmoid confidence + softmax classifier)
is attached at every cut. Only the branches are trained, with the EENet cost-aware loss (v2, lambda 0.9);
the backbone's parameters and buffers are hashed before and after and must be bit-identical::

    backbone = zoo.load_weights(zoo.resnet18(num_classes=10), "resnet18.pth")
    model = attach_branches(backbone, input_shape=(3, 32, 32), labels=CIFAR10_CLASSES,
                            exits_after=["layer1", "layer2"], branch="conv1",
                            backbone_desc={"arch": "resnet18", "options": {"num_classes": 10}})
    result = train_branches(model, train_set, val_set)

``build_pteenet`` (registry name "pteenet") rebuilds the same model from its spec's kwargs, the
backbone's description nested in them, so a checkpoint alone restores it.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable, Sequence

import torch
from torch import nn

from edgeexit.datasets import ImageSet
from edgeexit.progress import Progress
from edgeexit.errors import EdgeExitError, UsageError

from ..models import zoo
from ..models.heads import CLASS_HEAD_KINDS, EENET_HEAD_KINDS, EENetHead, check_hidden, class_head
from ..models.placement import SCHEMES, place_exits
from ..own.split import CutPoint, cut_points, split_module, staged_from_split
from ..models.staged import ModelSpec, MonolithicExport, StagedModel

log = logging.getLogger(__name__)

#: "conv1".."conv3" are PTEENet's branches, "pool"/"bnpool" lighter EENet exits, "spatial" an EENet exit that
#: reads the whole feature map, "class" the class-based exit (per-class sigmoid logits, pooled or
#: whole-map: ``class_head``; see :mod:`edgeexit.workstation.posttrain.classexit`).
BRANCH_KINDS = EENET_HEAD_KINDS + ("class",)


class BackboneChangedError(EdgeExitError):
    """The frozen backbone's weights or statistics changed while the branches were trained."""


def backbone_digest(model: StagedModel) -> str:
    """SHA-256 over every parameter and buffer of the frozen parts (all segments and the final head).

    Values are hashed in a fixed (contiguous, CPU) layout with their names, dtypes and shapes, so a change of
    memory format or device does not change the digest but any changed bit does.
    """
    h = hashlib.sha256()
    parts = [(f"stages.{i}.segment", s.segment) for i, s in enumerate(model.stages)]
    parts.append((f"stages.{len(model.stages) - 1}.head", model.stages[-1].head))
    for prefix, module in parts:
        tensors = list(module.named_parameters()) + list(module.named_buffers())
        for name, t in sorted(tensors, key=lambda kv: kv[0]):
            h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def freeze(model: StagedModel) -> None:
    """Freeze the backbone parts of a PTEENet model: no gradients, BatchNorm in eval mode."""
    frozen = [s.segment for s in model.stages] + [model.stages[-1].head]
    for module in frozen:
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)


def _depth(name: str) -> int:
    return name.count(".") + 1


def exit_candidates(backbone: nn.Module, example: torch.Tensor, features_end: str) -> list[CutPoint]:
    """Block boundaries where a branch may go, up to and including ``features_end``.

    Valid cuts with a feature-map output that are block boundaries (not right after a conv/BN), at most one
    level deeper than ``features_end`` (e.g. "layer2" and "layer2.1" for ResNet's "layer4"; "features.7" for
    VGG's "features").
    """
    points = cut_points(backbone, example)
    names = [p.name for p in points]
    if features_end not in names:
        raise UsageError(f"features_end {features_end!r} is not a valid cut of {type(backbone).__name__}; "
                         f"valid: {', '.join(names)}")
    end = names.index(features_end)
    limit = _depth(features_end) + 1
    return [p for p in points[:end] if p.boundary and _depth(p.name) <= limit and p.macs_before > 0] + [points[end]]


def place_branches(backbone: nn.Module, example: torch.Tensor, features_end: str, num_exits: int,
                   scheme: str = "fine") -> list[str]:
    """Exit points chosen by cost fraction (EENet placement schemes) among :func:`exit_candidates`.

    Args:
        backbone: the network (eval mode).
        example: one input, [1, C, H, W].
        features_end: where the features end.
        num_exits: exits including the final classifier.
        scheme: "fine", "pareto", "linear" or "gold_ratio".

    Returns:
        ``num_exits - 1`` submodule names in execution order.
    """
    if scheme not in SCHEMES:
        raise UsageError(f"unknown placement '{scheme}'; expected one of {', '.join(SCHEMES)}")
    cands = exit_candidates(backbone, example, features_end)
    costs = [c.macs_before - (cands[i - 1].macs_before if i else 0) for i, c in enumerate(cands)]
    idx = place_exits(costs, num_exits, scheme)
    return [cands[i].name for i in idx[:-1]]


def build_backbone_module(desc: dict[str, Any], rebuild: Callable[[ModelSpec], StagedModel]) -> nn.Module:
    """Build the (untrained) backbone a description names.

    Args:
        desc: ``{"arch": zoo name, "options": {...}}`` or ``{"spec": ModelSpec dict}`` for a network trained
            with edgeexit (it becomes a single-output module: every segment, then its final head).
        rebuild: rebuilds a StagedModel from its spec (the registry's ``build``, which passes itself in).
    """
    if "arch" in desc:
        return zoo.build_backbone(desc["arch"], **desc.get("options", {}))
    if "spec" in desc:
        return MonolithicExport(rebuild(ModelSpec.from_dict(desc["spec"])))
    raise UsageError(f"backbone description {sorted(desc)} names neither 'arch' nor 'spec'")


def default_features_end(backbone: nn.Module, desc: dict[str, Any] | None, example: torch.Tensor) -> str:
    """Where the backbone's features end: the zoo's table, else the last feature map before global pooling."""
    if desc and desc.get("arch") in zoo.FEATURES_END:
        return zoo.FEATURES_END[desc["arch"]]
    if desc and "spec" in desc:
        return f"segments.{len(backbone.segments) - 1}"
    from ..own.split import _GLOBAL_POOLS
    points = [p for p in cut_points(backbone, example)
              if not isinstance(backbone.get_submodule(p.name), _GLOBAL_POOLS)]
    if not points:
        raise UsageError(f"{type(backbone).__name__} has no feature-map cut; pass features_end")
    return points[-1].name


def attach_branches(backbone: nn.Module, input_shape: Sequence[int], labels: Sequence[str],
                    exits_after: Sequence[str] | None = None, placement: str = "pareto", num_exits: int = 3,
                    branch: str = "conv1", features_end: str | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    color_mode: str | None = None, backbone_desc: dict[str, Any] | None = None, class_head_kind: str = "pool",
                    hidden: int | None = None) -> StagedModel:
    """Freeze ``backbone``, cut it into segments and attach a PTEENet branch at every exit point.

    Args:
        backbone: a trained, traceable single-input classifier (its weights are never changed).
        input_shape: (C, H, W) it takes.
        labels: class names; ``len(labels)`` = the backbone's number of outputs.
        exits_after: submodule names to branch after (e.g. ["layer1", "layer2"]); None: place
            ``num_exits - 1`` branches with ``placement``.
        placement: cost-fraction scheme when ``exits_after`` is None.
        num_exits: exits including the backbone's classifier, when placing automatically.
        branch: "conv1", "conv2", "conv3" (PTEENet's 1-3 conv blocks), "pool"/"bnpool", or "class"
            (class-based exits, trained with the class loss).
        features_end: where the features end (default: from the zoo table or found by tracing).
        mean, std, color_mode: preprocessing stored in the spec, one mean/std per input channel (None: 0.5 for
            every channel; color_mode from C if None).
        backbone_desc: how to rebuild the backbone (see :func:`build_backbone_module`); without it the model
            works but a checkpoint of it cannot rebuild itself.
        class_head_kind: for ``branch="class"``: "pool" (global pool + per-class logits) or "spatial" (a
            whole-map convolution of ``hidden`` channels first; :class:`edgeexit.workstation.models.heads.SpatialClassHead`).
        hidden: width of a whole-map head (branch "spatial", or class head "spatial"); None: the feature
            map's channels. Recorded in the spec, so the model rebuilds with it.

    Raises:
        UsageError: unknown branch or class head kind, ``hidden`` for a head without a whole-map convolution,
            a bad ``hidden``, or a backbone whose output does not match ``labels``.

    Returns:
        A StagedModel (eval mode) whose segments and final head are the frozen backbone pieces.
    """
    if branch not in BRANCH_KINDS:
        raise UsageError(f"unknown branch '{branch}'; expected one of {', '.join(BRANCH_KINDS)}")
    if class_head_kind not in CLASS_HEAD_KINDS:
        raise UsageError(f"unknown class head kind '{class_head_kind}'; expected one of {', '.join(CLASS_HEAD_KINDS)}")
    whole_map = branch == "spatial" or (branch == "class" and class_head_kind == "spatial")
    check_hidden(hidden)
    if hidden is not None and not whole_map:
        raise UsageError(f"hidden={hidden} applies only to whole-map heads (branch 'spatial', or branch 'class' with "
                         f"class head 'spatial'), got branch '{branch}'" + (f" with class head '{class_head_kind}'"
                                                                             if branch == "class" else ""))
    channels = int(input_shape[0])
    mean = [0.5] * channels if mean is None else list(mean)
    std = [0.5] * channels if std is None else list(std)
    if len(mean) != channels or len(std) != channels:
        raise UsageError(f"mean {mean} and std {std} must give one value per input channel ({channels} for input "
                         f"shape {list(input_shape)}); e.g. mean={[0.5] * channels}")
    backbone.eval()
    example = torch.zeros(1, *input_shape)
    with torch.no_grad():
        out = backbone(example)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != len(labels):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"the backbone returns {shape} for an input of shape {tuple(example.shape)}; expected "
                         f"logits [1, {len(labels)}] (one per label): build it with num_classes={len(labels)}")
    end = features_end or default_features_end(backbone, backbone_desc, example)
    points = list(exits_after) if exits_after is not None else place_branches(backbone, example, end, num_exits, placement)
    pieces = split_module(backbone, points, end)
    heads = []
    x = example
    with torch.no_grad():
        for seg in pieces[:-2]:
            x = seg(x)
            ch = int(x.shape[1])
            size = (int(x.shape[2]), int(x.shape[3])) if whole_map else None  # the head sees the whole map
            heads.append(class_head(ch, len(labels), class_head_kind, spatial_size=size, hidden=hidden)
                         if branch == "class" else
                         EENetHead(ch, len(labels), kind=branch, spatial_size=size, hidden=hidden))
    channels = int(input_shape[0])
    kwargs: dict[str, Any] = {"backbone": backbone_desc or {}, "input_shape": [int(v) for v in input_shape],
                              "labels": list(labels), "exits_after": points, "features_end": end, "branch": branch}
    if branch == "class":
        kwargs["class_head_kind"] = class_head_kind
    if hidden is not None:
        kwargs["hidden"] = int(hidden)
    extra = {"method": "classexit" if branch == "class" else "pteenet", "branch": branch, "exits_after": points}
    if branch == "class":
        extra["class_head_kind"] = class_head_kind
    if whole_map:
        extra["hidden"] = int(hidden) if hidden is not None else None
    spec = ModelSpec(builder="pteenet", kwargs=kwargs, input_shape=tuple(int(v) for v in input_shape),
                     labels=list(labels), mean=list(mean), std=list(std),
                     color_mode=color_mode or ("L" if channels == 1 else "RGB"), extra=extra)
    model = staged_from_split(pieces, heads, spec).eval()
    freeze(model)
    spec.extra["backbone_sha256"] = backbone_digest(model)
    log.info("PTEENet: %d branches (%s) after %s, features end at %s", len(heads), branch, ", ".join(points), end)
    return model


def build_pteenet(backbone: dict[str, Any], input_shape: Sequence[int], labels: Sequence[str],
                  exits_after: Sequence[str], features_end: str, branch: str = "conv1",
                  class_head_kind: str = "pool", hidden: int | None = None, *,
                  rebuild: Callable[[ModelSpec], StagedModel]) -> StagedModel:
    """Registry builder "pteenet": rebuild an (untrained) PTEENet model from its spec's kwargs (``rebuild``:
    the registry's ``build``, for a backbone that is itself an edgeexit model).

    Specs written before ``class_head_kind``/``hidden`` existed rebuild with the defaults they were made with.
    """
    if not backbone:
        raise UsageError("this PTEENet spec does not say how to rebuild its backbone (no backbone description); "
                         "re-create it with attach_branches(..., backbone_desc=...)")
    module = build_backbone_module(backbone, rebuild)
    return attach_branches(module, input_shape, labels, exits_after=exits_after, branch=branch,
                           features_end=features_end, backbone_desc=backbone, class_head_kind=class_head_kind,
                           hidden=hidden)


def train_branches(model: StagedModel, train_set: ImageSet, val_set: ImageSet, config: Any = None,
                   progress: Progress | None = None) -> Any:
    """Train only the branches of a PTEENet model and check that the backbone did not change.

    Args:
        model: from :func:`attach_branches`.
        train_set, val_set: uint8 image sets (normalised with ``model.spec``).
        config: a :class:`edgeexit.workstation.training.train.TrainConfig`; default: EENet loss v2, lambda 0.9, 3 epochs (the
            class loss for "class" branches). Its ``freeze_trunk`` is forced on.
        progress: see :func:`edgeexit.workstation.training.train.train`.

    Returns:
        The :class:`edgeexit.workstation.training.train.TrainResult` (model with the best epoch's branch weights).

    Raises:
        BackboneChangedError: a backbone parameter or buffer differs after training (under torchrun: in any
            process).
    """
    from ..training import distributed
    from ..training.train import TrainConfig, train

    class_heads = model.stages[0].head.scores == "sigmoid"
    cfg = config or TrainConfig(loss="class" if class_heads else "v2", lam=0.9, epochs=3)
    cfg.freeze_trunk = True
    before = backbone_digest(model)
    freeze(model)
    result = train(model, train_set, val_set, cfg, progress=progress)
    freeze(result.model)
    # under torchrun every process checks its own copy and all of them learn every result
    digests = distributed.same_on_every_rank(backbone_digest(result.model), distributed.current())
    changed = [rank for rank, digest in enumerate(digests) if digest != before]
    if changed:
        where = f" in process(es) {changed}" if len(digests) > 1 else ""
        raise BackboneChangedError(f"the frozen backbone changed during branch training{where} (sha256 {before[:12]} "
                                   f"-> {digests[changed[0]][:12]}); this is a bug: report it with the command that "
                                   "caused it")
    after = before
    result.model.spec.extra.update(backbone_sha256=after, loss=cfg.loss, lam=cfg.lam, frozen_backbone=True)
    log.info("branches trained; backbone unchanged (sha256 %s)", after[:12])
    return result
