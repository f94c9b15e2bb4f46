"""Operating points as stored in a bundle's manifest: typed, with the JSON layout ``edgeexit tune`` writes.

``manifest.json`` ``"operating_points"`` holds named points (``"original"``, the rule the bundle had before its
first tuning; one entry per tuned name), ``"front"`` (the accuracy / cost trade-off front) and
``"exit_costs"`` (the per-exit cost estimates the front was computed with)::

    "operating_points": {
      "original": {"kind": "confidence", "thresholds": [0.5, 0.5], "exit": null, ...metrics, "data", "n"},
      "tuned": {"kind": "max_softmax", "thresholds": [...], "accuracy": 0.99, "avg_macs_fraction": 0.05,
                "est_latency_ms": 0.1, "energy_mj": 0.001, "exit_fractions": [...], "data": "mnist", "n": 5000,
                "target": {...}, "final_accuracy": 0.992},
      "front": [{"kind": ..., "thresholds": ..., "accuracy": ..., ...}, ...],
      "exit_costs": {"macs_fraction": [...], "energy_mj": [...] | null,
                     "latency_ms": {rule kind: [...]}, "monolithic_ms": ..., ...}
    }

``exit_costs`` is kept as stored: its measured part is :class:`edgeexit.bench.timing.ExitCostTable`'s format.

:class:`OperatingPoints` reads and writes exactly that layout; entries it cannot read are kept as they are
(and reported when used), so a bundle with an odd entry still loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from ..errors import TuningError, UsageError

#: The cost kinds a point carries: MACs fraction, estimated latency (ms), operation-proxy energy (mJ).
COST_KINDS = ("macs", "latency", "energy")
#: Keys of ``operating_points`` that are not named points.
RESERVED_NAMES = ("original", "front", "exit_costs")
_METRICS = ("accuracy", "avg_macs_fraction", "est_latency_ms", "energy_mj", "exit_fractions")


@dataclass(frozen=True)
class OperatingPoint:
    """One exit rule with its thresholds and what it achieved on the tuning data."""

    rule: str                      # exit rule kind
    thresholds: tuple[float, ...]
    accuracy: float                # fraction correct on the tuning data
    avg_macs_fraction: float       # average MACs per input / full_macs
    est_latency_ms: float          # average estimated latency per input
    energy_mj: float | None        # average operation-proxy energy per input, mJ; None: no estimate
    exit_fractions: tuple[float, ...]  # share of inputs leaving at each exit (exit 0 first)
    fallback: str = "final"        # the rule's fallback when no early exit stops an input (final, most_confident)

    def cost(self, kind: str) -> float:
        """The point's average cost of ``kind`` ("macs", "latency", "energy")."""
        if kind == "macs":
            return self.avg_macs_fraction
        if kind == "latency":
            return self.est_latency_ms
        if kind == "energy":
            if self.energy_mj is None:
                raise TuningError("this operating point has no energy estimate; choose by latency or MACs")
            return self.energy_mj
        raise UsageError(f"unknown cost kind {kind!r}; expected one of {', '.join(COST_KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON form; ``kind`` / ``thresholds`` read as an exit rule (``Runner(rule=NAME)``)."""
        return {"kind": self.rule, "thresholds": [float(t) for t in self.thresholds],
                "accuracy": round(self.accuracy, 6), "avg_macs_fraction": round(self.avg_macs_fraction, 6),
                "est_latency_ms": round(self.est_latency_ms, 6),
                "energy_mj": None if self.energy_mj is None else round(self.energy_mj, 9),
                "exit_fractions": [round(f, 6) for f in self.exit_fractions],
                **({} if self.fallback == "final" else {"fallback": self.fallback})}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "operating point") -> "OperatingPoint":
        """Parse a stored point; raises TuningError when fields are missing or of the wrong type."""
        try:
            rule = d.get("exit_rule", d)
            energy = d.get("energy_mj")
            return cls(rule=str(rule["kind"]), thresholds=tuple(float(t) for t in rule["thresholds"]),
                       accuracy=float(d["accuracy"]), avg_macs_fraction=float(d["avg_macs_fraction"]),
                       est_latency_ms=float(d["est_latency_ms"]), energy_mj=None if energy is None else float(energy),
                       exit_fractions=tuple(float(f) for f in d.get("exit_fractions", ())),
                       fallback=str(rule.get("fallback", "final")))
        except (KeyError, TypeError, ValueError) as exc:
            raise TuningError(f"{where} in the manifest is incomplete ({type(exc).__name__}: {exc}); re-run "
                              "`edgeexit tune` on the bundle") from None


@dataclass(frozen=True)
class NamedPoint:
    """A named entry: its exit rule, its metrics when it was evaluated, and where they came from.

    Attributes:
        rule: the stored rule as a dict (``kind``, ``thresholds``, ``exit``, ``fallback`` when not "final"), read
            by ``Manifest.point_rule``.
        metrics: accuracy and costs on the tuning data, or None (e.g. an "original" stored before evaluation).
        data, n: the tuning data's name and size; target: what was asked for; final_accuracy: the final exit's
            accuracy on that data. extra: any other keys, kept as they are.
    """

    rule: Mapping[str, Any]
    metrics: OperatingPoint | None = None
    data: str | None = None
    n: int | None = None
    target: Mapping[str, Any] | None = None
    final_accuracy: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "NamedPoint":
        rule = d.get("exit_rule", d)
        rule = ({k: rule[k] for k in ("kind", "thresholds", "exit", "fallback") if k in rule}
                if isinstance(rule, Mapping) else {})
        metrics = None
        if "accuracy" in d and "avg_macs_fraction" in d:
            metrics = OperatingPoint.from_dict(d, where)
        known = {"exit_rule", "kind", "thresholds", "exit", "fallback", "data", "n", "target", "final_accuracy",
                 *_METRICS}
        return cls(rule=rule, metrics=metrics, data=d.get("data"), n=d.get("n"), target=d.get("target"),
                   final_accuracy=d.get("final_accuracy"), extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.rule)
        if self.metrics is not None:
            out.update({k: v for k, v in self.metrics.to_dict().items() if k not in ("kind", "thresholds", "fallback")})
        for key in ("data", "n", "target", "final_accuracy"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class OperatingPoints:
    """The ``operating_points`` of a manifest: named points, the front (as stored) and the exit-cost table.

    ``unreadable`` keeps entries that could not be read, by name, as they were (written back unchanged).
    """

    named: Mapping[str, NamedPoint] = field(default_factory=dict)
    front: tuple[OperatingPoint, ...] = ()
    exit_costs: Mapping[str, Any] | None = None
    unreadable: Mapping[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[str]:
        """Names of the stored entries (named points, then "front" and "exit_costs" when present)."""
        yield from self.named
        if self.front:
            yield "front"
        if self.exit_costs is not None:
            yield "exit_costs"
        yield from self.unreadable

    def __bool__(self) -> bool:
        return bool(self.named or self.front or self.exit_costs is not None or self.unreadable)

    def candidates(self) -> list[OperatingPoint]:
        """Every point with metrics: the front and the named points."""
        named = [p.metrics for p in self.named.values() if p.metrics is not None]
        return list(self.front) + [p for p in named if p not in self.front]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OperatingPoints":
        """Read the stored layout (see the module docstring); entries that cannot be read go to ``unreadable``."""
        named: dict[str, NamedPoint] = {}
        unreadable: dict[str, Any] = {}
        front: list[OperatingPoint] = []
        costs = None
        for key, value in d.items():
            try:
                if key == "front" and isinstance(value, list):
                    front = [OperatingPoint.from_dict(v, f"operating_points.front[{i}]") for i, v in enumerate(value)]
                elif key == "exit_costs" and isinstance(value, Mapping):
                    costs = dict(value)
                elif isinstance(value, Mapping) and key not in ("front", "exit_costs"):
                    named[key] = NamedPoint.from_dict(value, f"operating_points.{key}")
                else:
                    unreadable[key] = value
            except (TuningError, KeyError, TypeError, ValueError, AttributeError):
                unreadable[key] = value
        return cls(named=named, front=tuple(front), exit_costs=costs, unreadable=unreadable)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: p.to_dict() for name, p in self.named.items()}
        if self.front:
            out["front"] = [p.to_dict() for p in self.front]
        if self.exit_costs is not None:
            out["exit_costs"] = dict(self.exit_costs)
        out.update(self.unreadable)
        return out

