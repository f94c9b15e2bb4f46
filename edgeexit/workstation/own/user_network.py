"""Bring your own early-exit network: any ``nn.Module`` whose forward returns one output per exit -> StagedModel.

The head contract (what ``forward(x)`` must return), for a network with exits 0..E-1 (the last one is the
final classifier):

* a tuple or list with one entry per exit, in exit order, or a dict (its insertion order is the exit order);
* each entry: the exit's class logits ``[N, K]``; or a pair ``(confidence, logits)``; or a dict
  ``{"logits": [N, K], "confidence": [N, 1] or [N]}``;
* a confidence is declared once for the network: ``confidence="probability"`` (it comes out of a sigmoid;
  the sigmoid is removed and the device compares ``sigmoid(logit) > T``, the same number) or
  ``confidence="logit"`` (the pre-sigmoid value); exits without one are decided on their logits (max
  softmax, entropy, class exclusion);
* ``scores="softmax"`` (one class per input) or ``"sigmoid"`` (independent per-class scores);
* forward must be traceable by ``torch.fx``: no ``if``/loops on tensor values (compute every exit; the
  device applies the exit rule), one image tensor in.

:func:`stage_network` traces the module once and cuts it where the exits are: stage k holds what exit k
needs beyond exits 0..k-1, plus exit k's head. Exactly one feature map may pass from stage k to stage k+1;
when several do (a skip connection around an exit), the cut moves down the trunk to the first point that one
feature map alone crosses, and exit k's head reads its inputs inside that stage. An exit's own outputs are
not a hand-off. Cuts may also be named (``split_after``: one submodule per early exit). The user's
parameters are shared, not copied: the heads stay exactly as trained. Before anything is returned, every
exit of the staged model is compared with ``module(x)`` on random inputs.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

from edgeexit.errors import CheckpointError, ConversionError, UsageError, clip

from ..conversion.export import adaptive_bins, divides, slice_mean_pool2d
from ..models.staged import ExitHead, ModelSpec, Stage, StagedModel
from .split import _trace

log = logging.getLogger(__name__)

CONFIDENCE_KINDS = ("probability", "logit")
SCORE_KINDS = ("softmax", "sigmoid")

#: Ops that only change a tensor's shape (followed back from a confidence to its sigmoid).
_SHAPE_METHODS = ("view", "reshape", "squeeze", "unsqueeze", "flatten", "contiguous")
_SHAPE_FUNCTIONS = (torch.reshape, torch.squeeze, torch.unsqueeze, torch.flatten)
_SIGMOIDS = (torch.sigmoid, torch.nn.functional.sigmoid)
#: Softmax over the classes at the end of an exit's logits: removed (the device applies softmax to the logits).
_SOFTMAX_FUNCTIONS = {torch.softmax: "softmax", F.softmax: "softmax", torch.special.softmax: "softmax",
                      torch.log_softmax: "log_softmax", F.log_softmax: "log_softmax",
                      torch.special.log_softmax: "log_softmax"}
_SOFTMAX_MODULES = {nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax"}
#: Functional adaptive average pooling (the module form is handled at export).
_ADAPTIVE_AVG_POOLS = (F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d)

#: Relative / absolute tolerance of the staged model against ``module(x)`` (float32, same ops).
CHECK_RTOL, CHECK_ATOL = 1e-4, 1e-5


@dataclass(frozen=True)
class _Exit:
    name: str                  # "0", "1"... or the dict key
    logits: fx.Node
    confidence: fx.Node | None


@dataclass(frozen=True)
class _Strip:
    """An activation removed from the end of an exit output: the output is ``kind(source's input)`` through
    the shape ops ``chain``; the staged head returns that input through the same shape ops."""

    kind: str                  # "sigmoid", "softmax" or "log_softmax"
    source: fx.Node            # the activation's node
    chain: tuple[fx.Node, ...]  # shape-only ops from it to the output

    @property
    def input(self) -> fx.Node:
        return self.source.args[0] if self.source.args else self.source.kwargs["input"]

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """The removed activation on the staged head's [N, K] output (what the network returns)."""
        return {"sigmoid": torch.sigmoid, "softmax": lambda v: torch.softmax(v, 1),
                "log_softmax": lambda v: torch.log_softmax(v, 1)}[self.kind](t)


class GraphHead(ExitHead):
    """Exit head cut out of a user's network: ``forward(features, *taps) -> {"logits", ["confidence"]}``.

    ``taps`` are values of the same stage the head reads besides the stage's output features (present only
    when a skip connection forced the cut below the exit). ``confidence`` is the pre-sigmoid logit [N, 1].
    """

    def __init__(self, body: fx.GraphModule, scores: str, has_confidence: bool):
        super().__init__()
        self.body = body
        self.scores = scores
        self.has_confidence = has_confidence

    def forward(self, features: torch.Tensor, *taps: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.body(features, *taps)


class TappedStage(Stage):
    """A stage whose head reads values inside the segment as well as its output (``taps``).

    ``segment`` computes the features alone (MonolithicExport, cost counting); ``body`` computes the features
    and the taps in one pass (the same modules) for :meth:`forward`.
    """

    def __init__(self, segment: fx.GraphModule, head: GraphHead, body: fx.GraphModule):
        super().__init__(segment, head)
        self.body = body

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features, *taps = self.body(x)
        return features, self.head(features, *taps)


# ---- reading the traced graph --------------------------------------------------------------------------------

def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _describe(node: fx.Node) -> str:
    """A name the user recognises: the submodule path for module calls, else the graph node's name."""
    return str(node.target) if node.op == "call_module" else node.name


def _parse_exits(out: Any, net: str) -> list[_Exit]:
    """The per-exit (logits, confidence) nodes of a traced forward's return value."""
    if isinstance(out, fx.Node) or out is None:
        raise UsageError(f"{net}.forward returns one value; an early-exit network returns one output per exit "
                         "(a tuple, list or dict of logits or of (confidence, logits) pairs): return every exit's "
                         "output")
    items = list(out.items()) if isinstance(out, Mapping) else list(enumerate(out)) if isinstance(
        out, (tuple, list)) else None
    if items is None:
        raise UsageError(f"{net}.forward returns {type(out).__name__}; expected a tuple, list or dict with one "
                         "output per exit")
    if len(items) < 2:
        raise UsageError(f"{net}.forward returns {len(items)} exit output(s); an early-exit network needs at least "
                         "2 (the early exits and the final classifier)")
    exits = []
    for key, value in items:
        name = str(key)
        value = _split_pair(value)
        if isinstance(value, fx.Node):
            exits.append(_Exit(name, value, None))
        elif isinstance(value, Mapping) and "logits" in value and set(value) <= {"logits", "confidence"}:
            exits.append(_Exit(name, value["logits"], value.get("confidence")))
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            exits.append(_Exit(name, value[1], value[0]))
        else:
            raise UsageError(f"{net}.forward: exit {name!r} returns {type(value).__name__}"
                             f"{f' of {len(value)}' if isinstance(value, (tuple, list)) else ''}; expected logits, "
                             "a (confidence, logits) pair or a dict with 'logits' and optional 'confidence'")
        for role, node in (("logits", exits[-1].logits), ("confidence", exits[-1].confidence)):
            if node is not None and not isinstance(node, fx.Node):
                raise UsageError(f"{net}.forward: exit {name!r} {role} is a constant ({node!r}), not a tensor "
                                 "computed from the input")
    return exits


def _split_pair(value: Any) -> Any:
    """A node that returns a (confidence, logits) pair as a whole (a leaf module's output) -> two getitem nodes."""
    meta = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
    if not isinstance(meta, (tuple, list)) or len(meta) != 2 or not all(hasattr(m, "shape") for m in meta):
        return value
    items = []
    with value.graph.inserting_after(value):
        for i in (1, 0):
            item = value.graph.call_function(operator.getitem, (value, i))
            item.meta["tensor_meta"] = meta[i]
            items.insert(0, item)
    return tuple(items)


def _check_exit_shapes(exits: list[_Exit], net: str, num_labels: int | None) -> int:
    """UsageError unless every exit has logits [N, K] (same K) and confidence [N, 1] / [N]; returns K."""
    classes = set()
    for e in exits:
        ls, cs = _shape(e.logits), None if e.confidence is None else _shape(e.confidence)
        if e.confidence is not None and ls is not None and cs is not None and len(ls) == 2 and ls[1] == 1 \
                and len(cs) == 2 and cs[1] > 1:
            raise UsageError(f"{net}.forward: exit {e.name!r} returns (logits {list(ls)}, confidence {list(cs)}) in "
                             "that order; the contract is (confidence, logits): swap them, or return "
                             "{'logits': ..., 'confidence': ...}")
        if ls is None or len(ls) != 2:
            raise UsageError(f"{net}.forward: exit {e.name!r} logits have shape {None if ls is None else list(ls)}; "
                             "expected [N, K] class logits (flatten pooled features before the last linear layer)")
        if e.confidence is not None and (cs is None or not (len(cs) == 1 or (len(cs) == 2 and cs[1] == 1))):
            raise UsageError(f"{net}.forward: exit {e.name!r} confidence has shape {None if cs is None else list(cs)}; "
                             "expected [N, 1] or [N] (one confidence per input)")
        classes.add(ls[1])
    if len(classes) != 1:
        raise UsageError(f"{net}.forward: the exits have different class counts {sorted(classes)}; every exit must "
                         "score the same K classes")
    k = classes.pop()
    if num_labels is not None and num_labels != k:
        raise UsageError(f"{num_labels} labels given but {net}'s exits score {k} classes; give {k} labels")
    return k


def _unshape(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Follow shape-only ops back from ``node``: (the first other node, the shape ops from it to ``node``)."""
    chain = []
    while ((node.op == "call_method" and node.target in _SHAPE_METHODS)
           or (node.op == "call_function" and node.target in _SHAPE_FUNCTIONS)):
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def _is_sigmoid(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    return ((node.op == "call_function" and node.target in _SIGMOIDS)
            or (node.op == "call_method" and node.target == "sigmoid")
            or (node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Sigmoid)))


def _hidden_in(node: fx.Node, modules: Mapping[str, nn.Module]) -> str | None:
    """The qualified name of the user's submodule ``node`` comes out of when torch.fx did not trace into it."""
    if node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]
    if node.op != "call_module":
        return None
    mod = modules.get(str(node.target))
    return None if mod is None or type(mod).__module__.startswith("torch.") else str(node.target)


def _confidence_logit(e: _Exit, kind: str | None, net: str, modules: Mapping[str, nn.Module]) -> _Strip | None:
    """For a probability confidence: the sigmoid to remove (and the shape ops after it); None for a logit."""
    if e.confidence is None:
        return None
    if kind is None:
        raise UsageError(f"{net}.forward: exit {e.name!r} returns a confidence; declare what it is: "
                         "confidence='probability' (a sigmoid output) or confidence='logit' (pre-sigmoid)")
    source, chain = _unshape(e.confidence)
    sigmoid = _is_sigmoid(source, modules)
    if kind == "logit":
        if sigmoid:
            raise UsageError(f"{net}.forward: exit {e.name!r} confidence comes out of a sigmoid but was declared "
                             "confidence='logit'; declare confidence='probability'")
        return None
    hidden = None if sigmoid else _hidden_in(source, modules)
    if hidden is not None:
        raise UsageError(f"{net}.forward: exit {e.name!r} confidence comes out of {hidden!r}, which torch.fx did not "
                         "trace into (a leaf module), so edgeexit cannot find the sigmoid to remove: let it be traced "
                         "(keep its layers in nn.Sequential / nn.ModuleList, not a plain list, and do not name it in "
                         "leaf_modules), or return the pre-sigmoid value and declare confidence='logit'")
    if not sigmoid:
        raise UsageError(f"{net}.forward: exit {e.name!r} confidence is declared a probability but is not the "
                         f"output of a sigmoid (it comes from {_describe(source)!r}); return the pre-sigmoid value "
                         "and declare confidence='logit', or end the confidence with torch.sigmoid")
    others = [u for u in source.users if u not in chain and u.op != "output"]
    for n in chain:
        others += [u for u in n.users if u not in chain and u.op != "output"]
    if others:
        raise UsageError(f"{net}.forward: exit {e.name!r}: the confidence sigmoid is also used by "
                         f"{_describe(others[0])!r}; compute the probability only for the confidence output")
    return _Strip("sigmoid", source, tuple(chain))


def _class_axis_softmax(node: fx.Node, modules: Mapping[str, nn.Module]) -> str | None:
    """"softmax" / "log_softmax" when ``node`` normalises over the class axis (dim 1 of [N, K] or of
    [N, K, 1, 1]...), else None."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        kind = next((k for cls, k in _SOFTMAX_MODULES.items() if isinstance(mod, cls)), None)
        dim = getattr(mod, "dim", None)
    elif node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS:
        kind = _SOFTMAX_FUNCTIONS[node.target]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    elif node.op == "call_method" and node.target in ("softmax", "log_softmax"):
        kind = str(node.target)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    else:
        return None
    shape = _shape(node)
    if kind is None or shape is None or len(shape) < 2 or not isinstance(dim, (int, type(None))):
        return None
    axis = 1 if dim is None and len(shape) in (2, 4) else dim if dim is None or dim >= 0 else dim + len(shape)
    return kind if axis == 1 and all(v == 1 for v in shape[2:]) else None


def _logits_activation(e: _Exit, scores: str, net: str, modules: Mapping[str, nn.Module]) -> _Strip | None:
    """A softmax (or log-softmax) at the end of exit ``e``'s logits, to be removed; a sigmoid there too when
    ``scores="sigmoid"`` (UsageError with ``scores="softmax"``: the device would apply softmax to probabilities).

    Softmax(x) and log-softmax(x) give the same softmax scores as x, so the device, which applies softmax to the
    logits it gets, reads the network's own probabilities; a sigmoid read as independent scores likewise.
    """
    source, chain = _unshape(e.logits)
    kind = _class_axis_softmax(source, modules)
    if kind is None and _is_sigmoid(source, modules):
        if scores != "sigmoid":
            raise UsageError(f"{net}.forward: exit {e.name!r} logits come out of a sigmoid ({_describe(source)!r}); "
                             "the device applies softmax to the logits, which would squash those probabilities: "
                             "declare scores='sigmoid' (--scores sigmoid) if they are independent per-class scores "
                             "(edgeexit then removes the sigmoid), or return the values before it")
        kind = "sigmoid"
    if kind is None:
        return None
    if kind != "sigmoid" and scores == "sigmoid":
        raise UsageError(f"{net}.forward: exit {e.name!r} logits come out of a {kind} ({_describe(source)!r}) but "
                         "scores='sigmoid' was declared (independent per-class scores); drop scores='sigmoid' "
                         "(--scores) for one class per input, or return the values before the softmax")
    return _Strip(kind, source, tuple(chain))


def _exact_adaptive_pools(graph: fx.Graph) -> int:
    """Replace functional adaptive average pools whose output size does not divide the input size by exact
    slice means (the ONNX exporter refuses them); returns how many. The module form is swapped at export."""
    count = 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _ADAPTIVE_AVG_POOLS:
            continue
        src = node.args[0] if node.args else node.kwargs.get("input")
        shape_in, shape_out = _shape(src) if isinstance(src, fx.Node) else None, _shape(node)
        if shape_in is None or shape_out is None or len(shape_in) != 4 or len(shape_out) != 4:
            continue
        in_hw, out_hw = (shape_in[2], shape_in[3]), (shape_out[2], shape_out[3])
        if divides(in_hw, out_hw):
            continue
        rows, cols = adaptive_bins(in_hw, out_hw)
        node.target, node.args, node.kwargs = slice_mean_pool2d, (src, rows, cols), {}
        log.info("%s: adaptive average pooling %s -> %s written as exact slice means", node.name, in_hw, out_hw)
        count += 1
    return count


# ---- planning the cuts ---------------------------------------------------------------------------------------

class _Plan:
    """Node sets of every stage and the hand-off node after each early one."""

    def __init__(self, graph: fx.Graph, exits: list[_Exit], net: str):
        self.net = net
        self.nodes = [n for n in graph.nodes if n.op not in ("output", "get_attr")]
        self.index = {n: i for i, n in enumerate(graph.nodes)}
        self.input = next(n for n in graph.nodes if n.op == "placeholder")
        self.exits = exits
        self.needs = [self.ancestors([x for x in (e.logits, e.confidence) if x is not None]) for e in exits]
        self.live = set().union(*self.needs)  # nodes some exit needs (others are dead code)
        self.exit_nodes = {x for e in exits for x in (e.logits, e.confidence) if x is not None}

    @staticmethod
    def ancestors(roots: Sequence[fx.Node], stop: set[fx.Node] | frozenset = frozenset()) -> set[fx.Node]:
        seen: set[fx.Node] = set()
        todo = [r for r in roots if r not in stop]
        while todo:
            n = todo.pop()
            if n in seen or n.op == "get_attr":
                continue
            seen.add(n)
            todo += [a for a in n.all_input_nodes if a not in stop and a not in seen]
        return seen

    def crossing(self, done: set[fx.Node]) -> list[fx.Node]:
        """Nodes of ``done`` read by live nodes outside it (exit outputs read by the network output do not count)."""
        out = [n for n in done if any(u in self.live and u not in done for u in n.users)]
        return sorted(out, key=self.index.__getitem__)

    def cut(self, k: int, done: set[fx.Node], named: fx.Node | None) -> tuple[set[fx.Node], fx.Node]:
        """Stage k's nodes and its hand-off node, given the nodes of stages 0..k-1 (``done``)."""
        stage = self.needs[k] - done
        if named is not None:
            if named in done:
                raise UsageError(f"split_after names {_describe(named)!r} for exit {k}, but it is computed before "
                                 f"exit {k - 1}'s cut; name submodules in execution order")
            stage |= self.ancestors([named], done)
            cross = self.crossing(done | stage)
            if cross != [named]:
                other = [_describe(n) for n in cross if n is not named]
                raise UsageError(f"cannot cut after {_describe(named)!r} for exit {k}: the later exits also read "
                                 f"{', '.join(repr(o) for o in other)} from before the cut (a skip connection or "
                                 "another exit's input crosses it); name a later submodule, or omit split_after to "
                                 "let the cuts be found")
            return stage, named
        cross = self.crossing(done | stage)
        if len(cross) == 1:
            return stage, cross[0]
        if not cross:
            raise UsageError(f"{self.net}: exits after exit {k} do not depend on what exit {k} computes; every exit "
                             "must continue the same trunk")
        # several values cross: move the cut down the trunk to the first value that alone crosses
        rest = [n for n in self.nodes if n in self.live and n not in done and n not in stage]
        for n in rest:
            if n in self.exit_nodes:
                continue
            more = self.ancestors([n], done | stage)
            if more & self.exit_nodes:
                continue
            if self.crossing(done | stage | more) == [n]:
                log.info("exit %d: %d values cross the first cut (%s); cut moved to %s", k, len(cross),
                         ", ".join(_describe(c) for c in cross), _describe(n))
                return stage | more, n
        names = ", ".join(repr(_describe(c)) for c in cross[:4])
        raise UsageError(f"{self.net} cannot be cut after exit {k}: the later exits read {len(cross)} values computed "
                         f"before it ({names}) and no later point is crossed by one value alone (a skip connection "
                         "or several feature maps, as in MSDNet, cross every cut); stages hand one feature map to "
                         f"the next: merge those values into one tensor in forward(), or drop exit {k}")

    def features_end(self, stage: set[fx.Node], start: fx.Node) -> fx.Node:
        """The last stage's segment/head boundary: its last 4-D value that alone feeds the rest of the stage."""
        best, best_pooled = None, None
        for n in sorted(stage, key=self.index.__getitem__):
            shape = _shape(n)
            if shape is None or len(shape) != 4 or n in self.exit_nodes:
                continue
            seg = self.ancestors([n], {start}) | {start}
            head = stage - seg
            reads = {a for h in head for a in h.all_input_nodes if a.op != "get_attr"} - head
            if reads == {n}:
                if shape[2] * shape[3] > 1:
                    best = n
                else:
                    best_pooled = n
        return best or best_pooled or start


# ---- building the stage modules ------------------------------------------------------------------------------

def _copy_nodes(g: fx.Graph, env: dict[fx.Node, fx.Node], nodes: Sequence[fx.Node]) -> None:
    def arg(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op != "get_attr":
                raise ConversionError(f"internal split error: '{n.name}' is not available in this stage")
            env[n] = g.node_copy(n)
        return env[n]

    for node in nodes:
        env[node] = g.node_copy(node, arg)


def _graph_module(root: nn.Module, g: fx.Graph) -> fx.GraphModule:
    gm = fx.GraphModule(root, g)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _head_outputs(g: fx.Graph, env: dict[fx.Node, fx.Node], e: _Exit,
                  strips: Mapping[str, _Strip]) -> dict[str, fx.Node]:
    def value(role: str, node: fx.Node) -> fx.Node:
        strip = strips.get(role)
        if strip is None:
            return env[node]
        # the activation's input through the same shape ops
        local = dict(env)
        local[strip.source] = env[strip.input]
        for n in strip.chain:
            local[n] = g.node_copy(n, lambda a: local[a])
        return local[strip.chain[-1]] if strip.chain else local[strip.source]

    out = {"logits": value("logits", e.logits)}
    if e.confidence is not None:
        out["confidence"] = g.call_method("reshape", (value("confidence", e.confidence), (-1, 1)))  # [N, 1]
    return out


def _stage(root: nn.Module, plan: _Plan, nodes: set[fx.Node], start: fx.Node, end: fx.Node, e: _Exit,
           strips: Mapping[str, _Strip], scores: str) -> Stage:
    order = sorted(nodes, key=plan.index.__getitem__)
    seg_nodes = plan.ancestors([end], {start}) & nodes if end is not start else set()
    head_nodes = [n for n in order if n not in seg_nodes]
    head_set = set(head_nodes)
    taps = sorted({a for h in head_nodes for a in h.all_input_nodes if a.op != "get_attr"} - head_set - {end},
                  key=plan.index.__getitem__)
    for x in (e.logits, e.confidence):  # an exit output computed by the segment itself
        if x is not None and x not in head_set and x is not end and x not in taps:
            taps.append(x)
    for strip in strips.values():  # an activation computed by the segment: its input is read instead
        if strip.source not in head_set and strip.input not in taps and strip.input is not end:
            taps.append(strip.input)
    seg_order = [n for n in order if n in seg_nodes]

    def segment_graph(outputs: list[fx.Node]) -> fx.GraphModule:
        g = fx.Graph()
        env = {start: g.placeholder("x")}
        _copy_nodes(g, env, seg_order)
        values = [env[o] for o in outputs]
        g.output(values[0] if len(values) == 1 else tuple(values))
        return _graph_module(root, g)

    g = fx.Graph()
    env = {end: g.placeholder("features")}
    for i, t in enumerate(taps):
        env[t] = g.placeholder(f"tap_{i}")
    _copy_nodes(g, env, head_nodes)
    g.output(_head_outputs(g, env, e, strips))
    head = GraphHead(_graph_module(root, g), scores, e.confidence is not None)
    segment = segment_graph([end])
    if not taps:
        return Stage(segment, head)
    return TappedStage(segment, head, segment_graph([end, *taps]))


# ---- the API ---------------------------------------------------------------------------------------------------

def _check_args(input_shape: Sequence[int], mean: Sequence[float] | float, std: Sequence[float] | float,
                color_mode: str | None, confidence: str | None, scores: str) -> tuple[tuple[int, int, int],
                                                                                      list[float], list[float], str]:
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1 or shape[0] not in (1, 3):
        raise UsageError(f"input_shape {input_shape!r} is not (C, H, W) with C 1 (grey) or 3 (RGB); "
                         "e.g. (1, 28, 28) or (3, 32, 32)")
    c = shape[0]

    def per_channel(v: Sequence[float] | float, what: str) -> list[float]:
        values = [float(v)] * c if isinstance(v, (int, float)) else [float(x) for x in v]
        if len(values) == 1:
            values = values * c
        if len(values) != c:
            raise UsageError(f"{what} has {len(values)} values for {c} input channels; give 1 or {c}")
        return values

    m, s = per_channel(mean, "mean"), per_channel(std, "std")
    if any(v <= 0 for v in s):
        raise UsageError(f"std {s} must be positive (the network sees (pixel/255 - mean) / std)")
    mode = color_mode or ("L" if c == 1 else "RGB")
    if mode != ("L" if c == 1 else "RGB"):
        raise UsageError(f"color_mode {mode!r} does not fit {c} input channel(s); use {'L' if c == 1 else 'RGB'}")
    if confidence is not None and confidence not in CONFIDENCE_KINDS:
        raise UsageError(f"confidence={confidence!r}; expected one of {', '.join(CONFIDENCE_KINDS)} or None")
    if scores not in SCORE_KINDS:
        raise UsageError(f"scores={scores!r}; expected one of {', '.join(SCORE_KINDS)}")
    return shape, m, s, mode  # type: ignore[return-value]


def _outputs_by_exit(out: Any) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(logits, confidence) per exit of an eager ``module(x)`` result, read the way the trace was."""
    items = list(out.values()) if isinstance(out, Mapping) else list(out)
    result = []
    for value in items:
        if isinstance(value, torch.Tensor):
            result.append((value, None))
        elif isinstance(value, Mapping):
            result.append((value["logits"], value.get("confidence")))
        else:
            result.append((value[1], value[0]))
    return result


def check_split(module: nn.Module, staged: StagedModel, removed: Sequence[Mapping[str, Any]], samples: int = 4,
                seed: int = 0) -> float:
    """Largest difference between ``module(x)`` and the staged model on seeded random inputs; raises when too big.

    Args:
        removed: per exit, the activations removed from its outputs (role -> an object whose ``apply`` puts
            it back, as :class:`_Strip`); outputs are compared as the module returns them (probabilities,
            log-probabilities, logits).

    Raises:
        ConversionError: an exit's logits or confidence differ beyond float32 tolerance.
    """
    x = torch.randn(samples, *staged.spec.input_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = _outputs_by_exit(module(x))
        got = staged(x)
    worst = 0.0
    for k, ((logits, conf), out, strips) in enumerate(zip(expected, got, removed)):
        pairs = [("logits", logits, out["logits"])]
        if conf is not None:
            pairs.append(("confidence", conf, out["confidence"].reshape(conf.shape)))
        for what, want, have in pairs:
            if what in strips:
                have = strips[what].apply(have.reshape(-1, 1) if have.dim() == 1 else have).reshape(want.shape)
            err = float((want - have).abs().max())
            worst = max(worst, err)
            if not torch.allclose(want, have, rtol=CHECK_RTOL, atol=CHECK_ATOL):
                raise ConversionError(f"the staged network's exit {k} {what} differ from {type(module).__name__}"
                                      f"(x) by up to {err:.3g}; forward() must compute the same values every call "
                                      "(no in-place changes of a value another exit reads, no random ops, no state)")
    return worst


def _check_probabilities(module: nn.Module, staged: StagedModel, removed: Sequence[Mapping[str, Any]],
                         net: str, scores: str, seed: int = 1) -> None:
    """UsageError when an exit's logits are probabilities edgeexit could not see being made (every row sums to 1
    over the classes on random inputs: a softmax inside a leaf module, ``exp(log_softmax)``, ``x / x.sum()``...).

    The device applies softmax to what it gets, so probabilities taken as logits would be squashed silently.
    """
    if scores != "softmax":
        return
    x = torch.randn(8, *staged.spec.input_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        outs = staged(x)
    for k, (out, strips) in enumerate(zip(outs, removed)):
        logits = out["logits"]
        if "logits" in strips or logits.shape[1] < 2:
            continue
        if bool((logits >= 0).all()) and torch.allclose(logits.sum(1), torch.ones(len(logits)), atol=1e-4):
            raise UsageError(f"{net}.forward: exit {k} returns probabilities (every row sums to 1 over the classes) "
                             "made where edgeexit cannot see a softmax to remove (inside a leaf module, or not a "
                             "softmax call); the device applies softmax to the logits it gets: return the values "
                             "before the softmax (or end the exit with an nn.Softmax / F.softmax edgeexit can see)")


def _removed_notes(exits: Sequence[_Exit], removed: Sequence[Mapping[str, _Strip]]) -> list[str]:
    notes = []
    for k, (e, strips) in enumerate(zip(exits, removed)):
        for role, strip in strips.items():
            if role == "confidence":
                notes.append(f"exit {k} confidence: sigmoid {_describe(strip.source)!r} removed (the device compares "
                             "the logit before it with the threshold's logit: the same test)")
            elif strip.kind == "sigmoid":
                notes.append(f"exit {k} logits: sigmoid {_describe(strip.source)!r} removed (the device applies "
                             "sigmoid to the values before it: the same scores)")
            else:
                notes.append(f"exit {k} logits: {strip.kind} {_describe(strip.source)!r} removed (the device applies "
                             "softmax to the values before it: the same probabilities)")
    return notes


def stage_network(module: nn.Module, input_shape: Sequence[int], mean: Sequence[float] | float,
                  std: Sequence[float] | float, labels: Sequence[str] | None = None, color_mode: str | None = None,
                  confidence: str | None = None, scores: str = "softmax", split_after: Sequence[str] | None = None,
                  leaf_modules: Sequence[str] = (), name: str | None = None) -> StagedModel:
    """Cut a user's early-exit network into a :class:`StagedModel` ready for ``convert``.

    Args:
        module: the trained network; ``forward(x)`` returns one output per exit, see the module docstring
            (the head contract). It is traced in eval mode; its parameters are shared with the result.
        input_shape: (C, H, W) the network takes, C = 1 (grey) or 3 (RGB).
        mean, std: per-channel (or one) normalisation the network was trained with: it sees
            ``(pixel / 255 - mean) / std``.
        labels: class names, one per logit (default "0".."K-1").
        color_mode: "L" or "RGB" (default from C).
        confidence: how exits' confidences are given: "probability" (after a sigmoid) or "logit"; needed only
            when an exit returns one.
        scores: "softmax" or "sigmoid" (independent per-class scores, class-based exits).
        split_after: one submodule name per early exit whose output is handed to the next stage (default:
            found from the exits' dependencies).
        leaf_modules: submodules torch.fx must not trace into (e.g. ones with data-dependent code inside
            that still export to ONNX).
        name: the model's name in the bundle (default: the module's class name).

    Returns:
        A StagedModel with one stage per exit whose exits equal ``module(x)`` (checked, float32 tolerance).

    Raises:
        UsageError: bad arguments, or a forward that breaks the head contract (one line, with the fix).
        ConversionError: the module cannot be traced or cut, or the split does not reproduce it.
    """
    net = type(module).__name__
    shape, m, s, mode = _check_args(input_shape, mean, std, color_mode, confidence, scores)
    was_training = module.training
    module.eval()
    try:
        tr = _trace(module, leaf_modules)
        gm = fx.GraphModule(module, tr.graph)
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(torch.zeros(2, *shape))
        except Exception as exc:  # a shape mismatch inside the user's network: any torch error type
            raise UsageError(f"{net} does not run on input_shape {shape}: {type(exc).__name__}: "
                             f"{clip(str(exc), 200)}; give the (C, H, W) it was trained on") from None
        pools = _exact_adaptive_pools(tr.graph)
        out_node = next(n for n in tr.graph.nodes if n.op == "output")
        exits = _parse_exits(out_node.args[0], net)
        k = _check_exit_shapes(exits, net, None if labels is None else len(labels))
        modules = dict(module.named_modules())
        removed: list[dict[str, _Strip]] = []
        for e in exits:
            strips = {}
            conf = _confidence_logit(e, confidence, net, modules)
            if conf is not None:
                strips["confidence"] = conf
            act = _logits_activation(e, scores, net, modules)
            if act is not None:
                strips["logits"] = act
            removed.append(strips)
        plan = _Plan(tr.graph, exits, net)
        if split_after is not None and len(split_after) != len(exits) - 1:
            raise UsageError(f"split_after names {len(split_after)} submodules for {len(exits) - 1} early exits; "
                             "name one per early exit, in order")
        named = [None] * (len(exits) - 1) if split_after is None else [_module_output(tr, n) for n in split_after]
        done: set[fx.Node] = {plan.input}
        start = plan.input
        stages, handoffs = [], []
        for i, e in enumerate(exits):
            if i < len(exits) - 1:
                nodes, end = plan.cut(i, done, named[i])
                hshape = _shape(end)
                if hshape is None or len(hshape) != 4:
                    raise UsageError(f"{net}: the value handed from exit {i}'s stage to the next, "
                                     f"{_describe(end)!r}, has shape {None if hshape is None else list(hshape)}; "
                                     "stages hand on feature maps [N, C, H, W]: attach exit "
                                     f"{i} before the trunk flattens")
            else:
                nodes = plan.needs[i] - done
                end = plan.features_end(nodes, start)
            stages.append(_stage(module, plan, nodes, start, end, e, removed[i], scores))
            handoffs.append(_describe(end))
            log.info("stage %d: %d ops, ends at %s %s", i, len(nodes), handoffs[-1], _shape(end))
            done |= nodes
            start = end
        notes = _removed_notes(exits, removed)
        for note in notes:
            log.info("%s: %s", net, note)
        extra = {"source": "user network", "class": f"{type(module).__module__}.{net}", "handoffs": handoffs[:-1],
                 "features_end": handoffs[-1], "confidence": confidence, "scores": scores}
        if notes:
            extra["removed_activations"] = notes
        if pools:
            extra["exact_adaptive_pools"] = pools
        spec = ModelSpec(builder=name or net, kwargs={}, input_shape=shape,
                         labels=[str(v) for v in labels] if labels is not None else [str(c) for c in range(k)],
                         mean=m, std=s, color_mode=mode, extra=extra)
        staged = StagedModel(stages, spec).eval()
        worst = check_split(module, staged, removed)
        _check_probabilities(module, staged, removed, net, scores)
        log.info("staged %s: %d stages, largest difference to forward() %.2g", net, len(stages), worst)
        return staged
    finally:
        module.train(was_training)


def _module_output(tr: Any, name: str) -> fx.Node:
    """The output node of submodule ``name`` (called once, returning one tensor)."""
    if name not in tr.tracer.calls:
        raise UsageError(f"split_after names {name!r}, which {type(tr.module).__name__}.forward does not call; "
                         f"submodules it calls: {', '.join(tr.names[:40])}")
    if tr.tracer.calls[name] > 1 or name not in tr.tracer.outputs:
        raise UsageError(f"split_after names {name!r}, which is called {tr.tracer.calls[name]} times or returns "
                         "more than one tensor; name a submodule called once that returns one feature map")
    return tr.tracer.outputs[name]


# ---- from files (the CLI route) --------------------------------------------------------------------------------

def network_from_file(source: str, weights: str | None = None, trust_pickle: bool = False) -> nn.Module:
    """Build the network ``FILE.py:NAME`` names and load a state_dict into it.

    Args:
        source: ``path/to/file.py:NAME``; NAME is a function or class called without arguments that returns
            the network, or an ``nn.Module`` instance defined in the file.
        weights: a file saved with ``torch.save(model.state_dict(), path)`` (a dict holding it under
            "state_dict", "model_state_dict" or "model" works too; a "module." prefix from DataParallel is removed
            when the network's own keys do not have it); None keeps the weights NAME gives the network.
        trust_pickle: also read a whole pickled model (``torch.save(model)``); unpickling runs code named in
            the file, so only for files one trusts. Its classes are looked up in the network file too.

    Raises:
        UsageError: a missing or unimportable file, an unknown NAME, or weights that do not fit (one line).
    """
    import importlib.util
    import sys
    from pathlib import Path

    path_text, sep, attr = source.rpartition(":")
    if not sep or not path_text.endswith(".py") or not attr.isidentifier():
        raise UsageError(f"network {source!r} is not FILE.py:NAME; name the function or class that builds the "
                         "network, e.g. my_net.py:build")
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"network file {path} does not exist; give the .py file that defines {attr}")
    spec = importlib.util.spec_from_file_location(f"edgeexit_user_{abs(hash(str(path.resolve())))}", path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}; give a Python source file")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))  # the file may import its neighbours
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:  # the user's code: any error, reported in one line
        where = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
        raise UsageError(f"importing {path} failed{where}: {type(exc).__name__}: {clip(str(exc), 200)}; "
                         "fix the file so that `python -c 'import ...'` works") from None
    finally:
        sys.path.remove(str(path.parent.resolve()))
    if not hasattr(mod, attr):
        found = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == mod.__name__)
        raise UsageError(f"{path} defines no {attr!r}; it defines {', '.join(found) or 'nothing callable'}")
    obj = getattr(mod, attr)
    if not isinstance(obj, nn.Module):
        try:
            obj = obj()
        except Exception as exc:  # the user's builder
            raise UsageError(f"{source}() failed: {type(exc).__name__}: {clip(str(exc), 200)}; NAME must build the "
                             "network without arguments") from None
    if not isinstance(obj, nn.Module):
        raise UsageError(f"{source} gave {type(obj).__name__}, not a torch nn.Module; return the network")
    if weights is not None:
        load_weights(obj, weights, trust_pickle, vars(mod))
    return obj


def load_weights(module: nn.Module, weights: str, trust_pickle: bool = False,
                 namespace: Mapping[str, Any] | None = None) -> None:
    """Load the weights in ``weights`` into ``module`` (all keys must fit); UsageError in one line.

    See :func:`edgeexit.workstation.models.weights.load_weights_file` (a bare or wrapped state_dict; wrapper
    prefixes removed only where the network's own keys do not have them; a pickled whole model with
    ``trust_pickle`` only).
    """
    from ..models.weights import load_weights_file

    try:
        load_weights_file(module, weights, trust_pickle, namespace)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
