"""Cut any traceable ``nn.Module`` into consecutive stages at the outputs of named submodules.

The module is traced once with ``torch.fx``; while tracing, the output node of every submodule call is
recorded (top-level and nested names, in execution order). A cut after submodule ``name`` is valid when
nothing after it uses a value computed before it other than the cut value itself (a residual connection
that jumps over the cut makes it invalid). Each piece becomes a ``torch.fx.GraphModule`` that shares the
original module's parameters, so composing the pieces reproduces the original forward bit for bit::

    x ── segment_0 ──► f_0 ── segment_1 ──► ... ── segment_n ──► f_n (features_end) ── tail ──► logits
            (cut after exits_after[0])                                                 (e.g. avgpool+flatten+fc)

:func:`split_module` returns the pieces; :func:`cut_points` lists every valid cut with its output shape
and the MACs spent before it (used for cost-based exit placement).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from edgeexit.errors import ConversionError, UsageError

from ..models.costs import layer_macs
from ..models.staged import ExitHead, ModelSpec, Stage, StagedModel

log = logging.getLogger(__name__)

#: Modules after which an automatic placement never cuts (the value is about to be normalised/activated).
_NOT_A_BOUNDARY = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d, nn.Dropout, nn.Identity)
_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class CutPoint:
    """A place where a module can be cut.

    Attributes:
        name: qualified submodule name whose output is the cut value (outermost name for that value).
        shape: the cut value's shape for the example input, e.g. (1, C, H, W).
        macs_before: multiply-accumulates (Conv/Linear) spent from the input up to this cut.
        boundary: False when the submodule is a conv/linear/BN/dropout/identity (not a block boundary).
    """

    name: str
    shape: tuple[int, ...]
    macs_before: int
    boundary: bool


class _NotASubmodule(Exception):
    """A module called in forward() that is not a registered submodule (torch.fx cannot name it)."""

    def __init__(self, module: nn.Module):
        super().__init__("module is not installed as a submodule")
        self.module = module


class _RecordingTracer(fx.Tracer):
    """A tracer that records, for every submodule call, the graph node of its output."""

    def __init__(self, leaf_modules: Sequence[str] = ()) -> None:
        super().__init__()
        self.leaf_names = set(leaf_modules)
        self.order: list[str] = []              # qualified names in call order (pre-order)
        self.outputs: dict[str, fx.Node] = {}   # name -> output node
        self.calls: dict[str, int] = {}         # name -> number of calls

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        try:
            name = self.path_of_module(m)
        except NameError:
            raise _NotASubmodule(m) from None
        if name not in self.calls:
            self.order.append(name)
        self.calls[name] = self.calls.get(name, 0) + 1
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy):
            self.outputs[name] = out.node
        return out

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaf_names or super().is_leaf_module(m, module_qualified_name)


@dataclass
class _Trace:
    module: nn.Module
    graph: fx.Graph
    tracer: _RecordingTracer
    index: dict[fx.Node, int]

    @property
    def names(self) -> list[str]:
        return [n for n in self.tracer.order if n]


def _holder(root: nn.Module, m: nn.Module) -> tuple[str, nn.Module, str, str] | None:
    """(qualified name of the owner, the owner, its attribute, "list"/"tuple"/"dict") of the plain Python container
    that holds ``m``, if any."""
    def flat(v: Any) -> list[Any]:
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, (list, tuple)):
            return [x for item in v for x in ([item] if isinstance(item, nn.Module) else flat(item))]
        return []

    for qual, owner in root.named_modules():
        for attr, value in vars(owner).items():
            if not attr.startswith("_") and isinstance(value, (list, tuple, dict)) and any(
                    x is m for x in flat(value)):
                return qual, owner, attr, type(value).__name__
    return None


def _not_a_submodule(root: nn.Module, m: nn.Module) -> str:
    net = type(root).__name__
    held = _holder(root, m)
    if held is None:
        return (f"cannot trace {net}.forward: it calls a {type(m).__name__} that is not a registered submodule "
                f"(created inside forward(), or kept where nn.Module does not register it); create it in __init__ as "
                "an attribute, in an nn.ModuleList or an nn.ModuleDict")
    qual, owner, attr, kind = held
    container = "nn.ModuleDict" if kind == "dict" else "nn.ModuleList"
    where = f" (at {qual + '.' + attr!r})" if qual else ""
    leaf = (f", or name {qual!r} in leaf_modules (--leaf-modules {qual}) so that torch.fx calls it whole"
            if qual else "")
    return (f"cannot trace {net}.forward: `{type(owner).__name__}.{attr}`{where} is a plain Python {kind}, so its "
            f"layers are not registered submodules (torch.fx cannot follow them, and their weights are not in "
            f"state_dict()): register it as {container}(...){leaf}")


def _user_frame(exc: BaseException, root: nn.Module) -> str:
    """" in Block.forward (file.py line 12; submodule 'blocks.0')": the innermost frame of the user's code."""
    import traceback

    torch_dir = str(Path(torch.__file__).parent)
    here = str(Path(__file__).parent.parent)
    frames = [f for f, _ in traceback.walk_tb(exc.__traceback__)
              if not f.f_code.co_filename.startswith((torch_dir, here)) and "<" not in f.f_code.co_filename]
    if not frames:
        return ""
    frame = frames[-1]
    owner = frame.f_locals.get("self")
    where = f"{Path(frame.f_code.co_filename).name} line {frame.f_lineno}"
    if not isinstance(owner, nn.Module):
        return f" in {frame.f_code.co_name} ({where})"
    qual = next((q for q, mod in root.named_modules() if mod is owner), None)
    sub = f"; submodule {qual!r}" if qual else ""
    return f" in {type(owner).__name__}.{frame.f_code.co_name} ({where}{sub})"


def _trace(module: nn.Module, leaf_modules: Sequence[str] = ()) -> _Trace:
    """Trace ``module`` with torch.fx, not tracing into the submodules named in ``leaf_modules``."""
    from edgeexit.errors import clip

    known = {name for name, _ in module.named_modules()}
    unknown = [n for n in leaf_modules if n not in known]
    if unknown:
        raise UsageError(f"leaf_modules names {unknown[0]!r}, which is not a submodule of {type(module).__name__}; "
                         "give qualified names as in named_modules(), e.g. 'blocks.2'")
    tracer = _RecordingTracer(leaf_modules)
    try:
        graph = tracer.trace(module)
    except _NotASubmodule as exc:
        raise ConversionError(_not_a_submodule(module, exc.module)) from None
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError... on data-dependent control flow
        where = _user_frame(exc, module)
        qual = re.search(r"submodule '([^']+)'", where)
        leaf = (f"name {qual.group(1)!r} in leaf_modules" if qual
                else "name the submodule that holds them in leaf_modules")
        raise ConversionError(f"cannot trace {type(module).__name__}.forward with torch.fx{where} "
                              f"({type(exc).__name__}: {clip(str(exc), 160)}); remove if/loops on tensor values from "
                              "forward() (compute every exit; the device applies the exit rule), or "
                              f"{leaf} (--leaf-modules; it must still export to ONNX)") from None
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise UsageError(f"{type(module).__name__}.forward takes {len(inputs)} inputs; only single-input "
                         "networks can be split into stages")
    return _Trace(module, graph, tracer, {n: i for i, n in enumerate(graph.nodes)})


def _violation(tr: _Trace, cut: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The first (user, value) pair where a node after ``cut`` reads a value from before it, else None."""
    pos = tr.index[cut]
    for node in tr.graph.nodes:
        if tr.index[node] <= pos:
            continue
        for arg in node.all_input_nodes:
            if arg is not cut and arg.op != "get_attr" and tr.index[arg] <= pos:
                return node, arg
    return None


def _valid_names(tr: _Trace) -> list[str]:
    """Submodule names (top-level and nested, execution order) after which a cut is valid."""
    return [n for n in tr.names if tr.tracer.calls[n] == 1 and n in tr.tracer.outputs
            and _violation(tr, tr.tracer.outputs[n]) is None]


def _resolve(tr: _Trace, name: str, role: str) -> fx.Node:
    if name not in tr.tracer.calls:
        names = _valid_names(tr)
        shown = ", ".join(names[:80]) + (f", ... ({len(names)} in all)" if len(names) > 80 else "")
        raise UsageError(f"{role} {name!r} is not a submodule called by {type(tr.module).__name__}.forward; "
                         f"valid cut points in execution order: {shown}")
    if tr.tracer.calls[name] > 1:
        raise UsageError(f"{role} {name!r} is called {tr.tracer.calls[name]} times in forward(); the cut is "
                         "ambiguous: name its parent block or another submodule called once")
    if name not in tr.tracer.outputs:
        raise UsageError(f"{role} {name!r} does not return a single tensor; cut after a module that does")
    node = tr.tracer.outputs[name]
    bad = _violation(tr, node)
    returned = next(n for n in tr.graph.nodes if n.op == "output").args[0]
    if bad is not None and isinstance(returned, (tuple, list, dict)):
        raise UsageError(f"cannot cut {type(tr.module).__name__} after {name!r}: {type(tr.module).__name__}.forward "
                         f"returns {len(returned)} outputs (exits of its own?): stage it with "
                         "edgeexit.workstation.own.user_network.stage_network, which cuts at its exits")
    if bad is not None:
        raise UsageError(f"cannot cut after {name!r}: '{bad[0].name}' after the cut uses '{bad[1].name}' from "
                         "before it (a skip connection crosses the cut); cut after the enclosing block instead")
    return node


def _subgraph(tr: _Trace, start: fx.Node, end_pos: int, output: Any) -> fx.GraphModule:
    """Nodes strictly after ``start`` up to position ``end_pos``, fed by one placeholder standing for ``start``."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: g.placeholder("x")}

    def arg(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op != "get_attr":  # excluded by _violation
                raise ConversionError(f"internal split error: '{n.name}' is not available in this stage")
            env[n] = g.node_copy(n)
        return env[n]

    lo = tr.index[start]
    for node in tr.graph.nodes:
        pos = tr.index[node]
        if lo < pos <= end_pos and node.op not in ("placeholder", "output"):
            env[node] = g.node_copy(node, arg)
    g.output(fx.map_arg(output, arg))
    gm = fx.GraphModule(tr.module, g)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def split_module(module: nn.Module, exits_after: list[str], features_end: str | None = None,
                 example_input: torch.Tensor | None = None) -> list[nn.Module]:
    """Cut ``module`` into segments at the outputs of the named submodules.

    Args:
        module: any single-input network torch.fx can trace (e.g. a zoo backbone).
        exits_after: names of submodules (top-level like "layer2" or nested like "layer3.1") after whose
            output an exit is attached, in execution order.
        features_end: the submodule where the feature extractor ends; what follows (pooling, flatten,
            classifier) becomes the tail. None: the last cut whose value is a feature map (needs
            ``example_input``).
        example_input: an input batch, only used to find ``features_end`` when it is None.

    Returns:
        ``len(exits_after) + 2`` modules: segment_0 .. segment_n (segment_i ends at exits_after[i], segment_n
        at features_end) then the tail (features -> the original output). Composing them reproduces
        ``module(x)`` exactly; they share ``module``'s parameters.

    Raises:
        UsageError: a name that is not a submodule (the message lists the valid ones), is called more than
            once, or whose output is crossed by a skip connection; points out of execution order;
            ``features_end`` not after every exit.
        ConversionError: the module cannot be traced.
    """
    if features_end is None:
        if example_input is None:
            raise UsageError("split_module needs features_end (the submodule where the features end, e.g. "
                             "'layer4') or an example_input to find it")
        # the last feature map before global pooling
        points = [p for p in cut_points(module, example_input)
                  if not isinstance(module.get_submodule(p.name), _GLOBAL_POOLS)]
        if not points:
            raise UsageError(f"{type(module).__name__} has no valid cut with a feature-map output; pass features_end")
        features_end = points[-1].name
        log.info("features end at %r", features_end)
    tr = _trace(module)
    cuts = [(_resolve(tr, n, "exit point"), n) for n in exits_after]
    ordered = sorted(cuts, key=lambda c: tr.index[c[0]])
    if len({c for c, _ in cuts}) != len(cuts):
        raise UsageError(f"exit points {list(exits_after)} name the same value more than once; give distinct points")
    if ordered != cuts:
        raise UsageError(f"exit points {list(exits_after)} are not in execution order; give them as "
                         f"{[n for _, n in ordered]}")
    out_node = next(n for n in tr.graph.nodes if n.op == "output")
    end = _resolve(tr, features_end, "features_end")
    if cuts and tr.index[end] <= tr.index[cuts[-1][0]]:
        raise UsageError(f"features_end {features_end!r} must come after the last exit point {cuts[-1][1]!r}; "
                         "drop that exit point or name a later features_end")
    placeholder = next(n for n in tr.graph.nodes if n.op == "placeholder")
    bounds = [placeholder] + [c for c, _ in cuts] + [end]
    pieces: list[nn.Module] = [_subgraph(tr, a, tr.index[b], b) for a, b in zip(bounds[:-1], bounds[1:])]
    pieces.append(_subgraph(tr, end, tr.index[out_node], out_node.args[0]))
    log.debug("split %s into %d segments + tail", type(module).__name__, len(pieces) - 1)
    return pieces


def cut_points(module: nn.Module, example_input: torch.Tensor) -> list[CutPoint]:
    """Every valid cut of ``module`` whose value is a feature map, in execution order.

    Args:
        module: a traceable single-input network (eval mode for stable shapes).
        example_input: one input batch, e.g. torch.zeros(1, C, H, W).

    Returns:
        one CutPoint per distinct value (the outermost submodule name that produces it); the last entries
        are usually the final feature map. MACs: :func:`~edgeexit.workstation.models.costs.layer_macs` of every module call.
    """
    tr = _trace(module)
    gm = fx.GraphModule(module, tr.graph)
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    modules = dict(module.named_modules())
    macs_at: dict[fx.Node, int] = {}
    total = 0
    for node in tr.graph.nodes:
        if node.op == "call_module":
            meta = node.meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape"):
                total += layer_macs(modules[node.target], meta.shape)
        macs_at[node] = total
    seen: set[fx.Node] = set()
    points = []
    for name in tr.names:
        node = tr.tracer.outputs.get(name)
        if node is None or node in seen or tr.tracer.calls[name] > 1:
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape") or len(meta.shape) != 4 or _violation(tr, node):
            continue
        seen.add(node)
        points.append(CutPoint(name, tuple(meta.shape), macs_at[node],
                               not isinstance(modules[name], _NOT_A_BOUNDARY)))
    points.sort(key=lambda p: tr.index[tr.tracer.outputs[p.name]])
    return points


class TailHead(ExitHead):
    """The original network's classifier (what follows ``features_end``) as the final exit head.

    Returns ``{"logits": tail(features)}`` with softmax scores and no confidence. It stays in eval mode
    (``train()`` does not switch it) because it belongs to the original, possibly frozen, network.
    """

    scores = "softmax"
    has_confidence = False

    def __init__(self, tail: nn.Module):
        super().__init__()
        self.tail = tail

    def train(self, mode: bool = True) -> "TailHead":
        super().train(False)
        return self

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.tail(features)}  # [N, K]


def staged_from_split(pieces: list[nn.Module], heads: list[ExitHead], spec: ModelSpec) -> StagedModel:
    """Assemble :func:`split_module`'s pieces and one head per early exit into a StagedModel.

    Args:
        pieces: segment_0..segment_n then the tail, as returned by :func:`split_module`.
        heads: ``n`` exit heads, head i reads segment i's output.
        spec: the model's spec (builder, input shape, labels...).

    Returns:
        ``n + 1`` stages; the last stage's head is the original classifier (:class:`TailHead`).
    """
    if len(heads) != len(pieces) - 2:
        raise UsageError(f"{len(heads)} exit heads given for {len(pieces) - 2} exit points; give one per point")
    stages = [Stage(seg, head) for seg, head in zip(pieces[:-2], heads)]
    stages.append(Stage(pieces[-2], TailHead(pieces[-1])))
    return StagedModel(stages, spec)
