"""One definition of latency for everything edgeexit reports: the public call a user makes, image in ->
result out, timed from outside the call.

The image is passed as the caller has it (here: a dataset's uint8 ``[H, W, C]`` array); the call does its own
preprocessing, runs, decides and builds its result; the clock is read just before the call and just after it
returns. The early-exit call (``Runner.classify``), the same bundle forced to an exit
(``Runner.classify`` under a :class:`~edgeexit.runtime.rules.ForcedExitRule`: the real rule's decision work at
every exit, never allowed to stop earlier) and the monolithic call (``Runner.run_monolithic``) are timed by
the same harness, :func:`time_calls`, interleaved per input in rotating order so that frequency scaling,
heat and cache effects hit every variant alike.

:func:`measure_exit_costs` times, per rule kind, an input forced to leave at each exit: the whole-call cost
of leaving there. A rule's mean latency on a data set is then estimated as ``sum_k share_k * cost_k``; tuning
and the benchmark's threshold sweep use these costs, and the benchmark checks the estimate against the
measured mean of every stored operating point.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..progress import Progress
from ..errors import BundleError, UsageError
from ..runtime.rules import RULES, ExitRule, FixedExitRule, ForcedExitRule

#: Rule kinds with a cost row in an :class:`ExitCostTable`; "fixed" = no decision at any exit.
COST_KINDS = ("confidence", "max_softmax", "entropy", "class_exclusion", "fixed")
#: Thresholds of the stand-in rule that times a kind no stored rule has (the decision work does not depend
#: on the thresholds, only on the kind: forced calls never stop early).
_STAND_IN = 0.5


@dataclass(frozen=True)
class Variant:
    """One thing to time: ``call(image)`` is the public call; ``setup()`` (untimed) runs before each call."""

    name: str
    call: Callable[[Any], Any]
    setup: Callable[[], None] | None = None


def time_calls(variants: Sequence[Variant], images: Sequence[Any], *, repeat: int = 1, warmup: int = 20,
               keep: Sequence[str] = (), progress: Progress | None = None,
               phase: str = "timed") -> tuple[np.ndarray, dict[str, list[Any]]]:
    """Time every variant on every image, ``repeat`` times, interleaved per image in rotating order.

    Returns:
        ``(ms [V, R, N] float64, results)``: the whole-call latency of each call, and for the variants named
        in ``keep`` what each call returned in the first repeat (a list of N results).
    """
    n, v = len(images), len(variants)
    if n == 0 or v == 0:
        raise UsageError("nothing to time: no images or no variants")
    clock = time.perf_counter_ns
    for w in range(warmup):  # caches, thread pools, CPU frequency; results discarded
        for var in variants:
            if var.setup is not None:
                var.setup()
            var.call(images[w % n])
    ns = np.zeros((v, repeat, n), dtype=np.int64)
    kept = {name: [None] * n for name in keep}
    total, step = n * repeat, max(1, n * repeat // 100)
    for r in range(repeat):
        for i in range(n):
            image = images[i]
            for j in range(v):
                var = variants[(i + r + j) % v]
                if var.setup is not None:
                    var.setup()
                t0 = clock()
                out = var.call(image)
                t1 = clock()
                ns[(i + r + j) % v, r, i] = t1 - t0
                if r == 0 and var.name in kept:
                    kept[var.name][i] = out
            done = r * n + i + 1
            if progress is not None and (done % step == 0 or done == total):
                progress(phase, done, total)
    return ns * 1e-6, kept


def latency_summary(values_ms: np.ndarray) -> dict[str, float | None]:
    """mean, p50, p90, p95, p99, min and max of latencies in ms (None for an empty array)."""
    v = np.asarray(values_ms, dtype=np.float64)
    keys = ("mean", "p50", "p90", "p95", "p99", "min", "max")
    if v.size == 0:
        return {k: None for k in keys}
    p50, p90, p95, p99 = np.percentile(v, [50, 90, 95, 99])
    return {"mean": float(v.mean()), "p50": float(p50), "p90": float(p90), "p95": float(p95), "p99": float(p99),
            "min": float(v.min()), "max": float(v.max())}


def per_input(ms: np.ndarray) -> np.ndarray:
    """[R, N] -> [N]: each input's median over the repeats (one busy moment of the machine does not count)."""
    return np.median(ms, axis=0)


@dataclass(frozen=True)
class ExitCostTable:
    """Whole-call latency of an input that leaves at exit k, per rule kind (ms, mean over the timed inputs
    of each input's median over the repeats), and the monolithic call's, measured in one run."""

    latency_ms: Mapping[str, tuple[float, ...]]
    monolithic_ms: float | None
    inputs: int
    repeat: int
    machine: str = ""
    #: the timing machine's CPU model and int8-relevant CPU flags (see :func:`edgeexit.bench.envinfo.machine_stamp`)
    cpu: str | None = None
    int8_features: tuple[str, ...] = ()
    #: the interpreter that ran the calls ("ai-edge-litert 2.3.0"); None in tables written before it was recorded
    backend: str | None = None

    def for_rule(self, kind: str) -> np.ndarray:
        """[E] cost of leaving at each exit under a rule of ``kind`` ("final" and "fixed" decide nothing)."""
        kind = "fixed" if kind in ("final", "fixed") else kind
        if kind not in self.latency_ms:
            raise UsageError(f"no measured exit costs for rule {kind!r}; measured: {', '.join(self.latency_ms)}")
        return np.asarray(self.latency_ms[kind], dtype=np.float64)

    def estimate_ms(self, kind: str, exit_index: np.ndarray) -> float:
        """Estimated mean whole-call latency of inputs leaving at ``exit_index`` [N] under a ``kind`` rule."""
        return float(self.for_rule(kind)[np.asarray(exit_index, dtype=np.int64)].mean())

    def to_dict(self) -> dict[str, Any]:
        return {"definition": "mean whole-call latency (ms) of an input forced to leave at exit k, the rule's "
                              "decisions evaluated at every exit up to k",
                "latency_ms": {k: [round(float(x), 6) for x in v] for k, v in self.latency_ms.items()},
                "monolithic_ms": None if self.monolithic_ms is None else round(self.monolithic_ms, 6),
                "inputs": self.inputs, "repeat": self.repeat, "machine": self.machine, "cpu": self.cpu,
                "int8_features": list(self.int8_features), "backend": self.backend}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExitCostTable":
        """Read a stored table; BundleError when it is malformed."""
        try:
            lat = {str(k): tuple(float(x) for x in v) for k, v in dict(d["latency_ms"]).items()}
            mono = d.get("monolithic_ms")
            cpu, backend = d.get("cpu"), d.get("backend")
            return cls(latency_ms=lat, monolithic_ms=None if mono is None else float(mono),
                       inputs=int(d.get("inputs", 0)), repeat=int(d.get("repeat", 0)), machine=str(d.get("machine", "")),
                       cpu=None if cpu is None else str(cpu),
                       int8_features=tuple(str(f) for f in d.get("int8_features") or ()),
                       backend=None if backend is None else str(backend))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest: operating_points.exit_costs is malformed ({exc}); re-run `edgeexit tune`"
                              ) from None


def timed_elsewhere(stored: Mapping[str, Any] | None, paths: Any = None) -> str | None:
    """Why exit costs stored in a bundle (``operating_points.exit_costs``, :meth:`ExitCostTable.to_dict`) may not
    hold on this machine: a warning naming where they were timed, or None when this machine timed them.

    Costs without a machine stamp (written by an older edgeexit) are reported as of an unknown machine.
    """
    from .envinfo import EnvPaths, machine_stamp

    if not stored or not stored.get("latency_ms"):
        return None
    here = machine_stamp(paths or EnvPaths())
    there = {"machine": str(stored.get("machine") or ""), "int8_features": list(stored.get("int8_features") or [])}
    if not there["machine"]:
        return (f"the stored exit costs (est. ms) do not say which machine timed them; re-time them here with "
                f"`edgeexit tune` (this machine: {_describe(here)})")
    if there["machine"] != here["machine"] or ("int8_features" in stored
                                                and there["int8_features"] != here["int8_features"]):
        return (f"the stored exit costs (est. ms) were timed on {_describe(there)}, not on this machine "
                f"({_describe(here)}); latencies here differ: re-time them with `edgeexit tune`")
    return None


def _describe(stamp: Mapping[str, Any]) -> str:
    flags = stamp.get("int8_features") or []
    return f"{stamp.get('machine') or 'unknown'} [int8 features: {' '.join(flags) if flags else 'none'}]"


def backend_label(runner: Any) -> str:
    """The interpreter a Runner calls, as exit-cost tables record it: "ai-edge-litert 2.3.0"."""
    return f"{runner.backend.name} {runner.backend.version}"


def this_machine() -> dict[str, Any]:
    """This machine's stamp for exit costs (:func:`edgeexit.bench.envinfo.machine_stamp`)."""
    from .envinfo import machine_stamp

    return machine_stamp()


def stand_in_rule(kind: str, num_exits: int, rules: Sequence[ExitRule] = ()) -> ExitRule:
    """A rule of ``kind`` to time: the first of ``rules`` of that kind, else one with thresholds 0.5."""
    for rule in rules:
        if rule.kind == kind:
            return rule
    if kind == "fixed":
        return FixedExitRule(num_exits - 1)
    return RULES[kind]([_STAND_IN] * (num_exits - 1))


def forced_variants(runner: Any, kind: str, rules: Sequence[ExitRule] = ()) -> list[Variant]:
    """One variant per exit k: ``runner.classify`` with a ``kind`` rule forced to leave at exit k."""
    e = runner.num_exits
    out = []
    for k in range(e):
        rule = FixedExitRule(k) if kind == "fixed" else ForcedExitRule(stand_in_rule(kind, e, rules), k)
        out.append(Variant(f"{kind}@{k}", runner.classify, rule_setter(runner, rule)))
    return out


def rule_setter(runner: Any, rule: ExitRule) -> Callable[[], None]:
    """An untimed set-up step that switches ``runner`` to ``rule`` (compiled once, here)."""
    runner.set_rule(rule)
    return lambda: runner.set_rule(rule)


def cost_table(ms: np.ndarray, variants: Sequence[Variant], kinds: Sequence[str], num_exits: int, repeat: int,
               machine: str = "", backend: str | None = None) -> ExitCostTable:
    """Build the table from :func:`time_calls` output of :func:`forced_variants` (+ an optional "monolithic"),
    stamped with this machine (``machine``, default: the board or CPU model; its CPU model and int8 features)."""
    index = {v.name: j for j, v in enumerate(variants)}
    lat = {kind: tuple(float(per_input(ms[index[f"{kind}@{k}"]]).mean()) for k in range(num_exits))
           for kind in kinds}
    mono = float(per_input(ms[index["monolithic"]]).mean()) if "monolithic" in index else None
    stamp = this_machine()  # the costs were just timed here
    return ExitCostTable(latency_ms=lat, monolithic_ms=mono, inputs=int(ms.shape[2]), repeat=repeat,
                         machine=machine or stamp["machine"], cpu=stamp["cpu"],
                         int8_features=tuple(stamp["int8_features"]), backend=backend)


def measure_exit_costs(runner: Any, images: Sequence[Any], kinds: Sequence[str], *, rules: Sequence[ExitRule] = (),
                       repeat: int = 3, warmup: int = 20, monolithic: bool = True, machine: str = "",
                       progress: Progress | None = None) -> ExitCostTable:
    """Time an input forced to leave at each exit, per rule kind, on ``images``; the Runner's rule is restored.

    Args:
        runner: a :class:`~edgeexit.runtime.runner.Runner`.
        images: the inputs (as a user passes them).
        kinds: rule kinds (see :data:`COST_KINDS`).
        rules: rules to time for their kinds (stand-ins with thresholds 0.5 otherwise).
        monolithic: also time the monolithic call.
    """
    unknown = [k for k in kinds if k not in COST_KINDS]
    if unknown:
        raise UsageError(f"no exit costs for rule kind(s) {unknown}; expected {', '.join(COST_KINDS)}")
    before = runner.rule
    variants = [v for kind in kinds for v in forced_variants(runner, kind, rules)]
    if monolithic and runner.has_monolithic:
        variants.append(Variant("monolithic", runner.run_monolithic))
    try:
        ms, _ = time_calls(variants, images, repeat=repeat, warmup=warmup, progress=progress, phase="exit costs")
    finally:
        runner.set_rule(before)
    return cost_table(ms, variants, kinds, runner.num_exits, repeat, machine, backend=backend_label(runner))
