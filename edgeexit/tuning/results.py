"""What a threshold search is asked for (:class:`Target`) and what it returns (:class:`TuneResult`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..energy import KIND_LABELS, KINDS
from ..errors import UsageError
from ..runtime.points import COST_KINDS, OperatingPoint
from .evaluate import ExitCosts


#: The command-line option of each target field (errors speak the user's language).
OPTION_NAMES = {"max_drop_pp": "--max-drop", "min_accuracy": "--min-accuracy", "no_worse_than": "--no-worse-than",
                "budget_macs": "--budget-macs", "budget_latency_ms": "--budget-latency-ms",
                "budget_energy_mj": "--budget-energy-mj"}


@dataclass(frozen=True)
class Target:
    """What the tuned point must meet: an accuracy floor, or one cost budget. Exactly one field is set.

    Attributes:
        max_drop_pp: accuracy may fall at most this many percentage points below the final exit's accuracy
            on the same data; the cheapest such point (by ``cost_kind``) is chosen.
        min_accuracy: an absolute accuracy floor (fraction in [0, 1]); the cheapest point reaching it.
        no_worse_than: the name of a rule to beat: an operating point stored in the bundle, or "current" (the
            bundle's exit rule). :func:`tune_bundle` evaluates it on the same trace and turns it into
            ``min_accuracy``; it keeps the reference when no cheaper point is at least as accurate.
        budget_macs: average MACs as a fraction of the full network; the most accurate point within it.
        budget_latency_ms: average estimated latency per input in ms.
        budget_energy_mj: average energy per input in mJ.
        energy_kind: the energy budgets and fronts are in ("measured", "board_estimate", "proxy"); None: measured
            when the bundle holds measured figures for the board, else the operation proxy. Not a target itself.
    """

    max_drop_pp: float | None = None
    budget_macs: float | None = None
    budget_latency_ms: float | None = None
    budget_energy_mj: float | None = None
    min_accuracy: float | None = None
    no_worse_than: str | None = None
    minimize: str = "latency"
    energy_kind: str | None = None

    def __post_init__(self) -> None:
        if self.minimize not in COST_KINDS:
            raise UsageError(f"minimize must be one of {', '.join(COST_KINDS)}, got {self.minimize!r}")
        if self.energy_kind is not None and self.energy_kind not in KINDS:
            raise UsageError(f"energy kind {self.energy_kind!r} is not one of {', '.join(KINDS)}")
        given = {k: v for k, v in self.__dict__.items() if v is not None and k not in ("minimize", "energy_kind")}
        if len(given) != 1:
            raise UsageError(f"give exactly one tuning target (--max-drop, --min-accuracy, --no-worse-than, "
                             f"--budget-macs, --budget-latency-ms or --budget-energy-mj), got "
                             f"{', '.join(OPTION_NAMES[k] for k in sorted(given)) or 'none'}")
        (key, value), = given.items()
        option = OPTION_NAMES[key]
        if key == "no_worse_than":
            if not isinstance(value, str) or not value:
                raise UsageError(f"no_worse_than must name an operating point or 'current', got {value!r}")
            return
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise UsageError(f"{option} {value!r}: give a finite number >= 0")
        if key == "min_accuracy" and value > 1:
            raise UsageError(f"min_accuracy={value!r} is a fraction of correct answers; give a number in [0, 1]")
        if key not in ("max_drop_pp", "min_accuracy") and value == 0:
            raise UsageError(f"{option} 0 cannot be met by any network; give a positive budget")

    @property
    def is_accuracy_target(self) -> bool:
        """True for an accuracy floor (cheapest point that meets it), False for a cost budget."""
        return self.max_drop_pp is not None or self.min_accuracy is not None or self.no_worse_than is not None

    def floor(self, final_accuracy: float) -> float | None:
        """The accuracy the chosen point must reach, given the final exit's; None for a cost budget.

        Raises:
            UsageError: a ``no_worse_than`` target that :func:`tune_bundle` has not resolved yet.
        """
        if self.no_worse_than is not None:
            raise UsageError(f"target 'no worse than {self.no_worse_than}' needs the reference evaluated on the same "
                             "data: use tune_bundle, or pass Target(min_accuracy=<its accuracy>)")
        if self.min_accuracy is not None:
            return float(self.min_accuracy)
        if self.max_drop_pp is not None:
            return final_accuracy - self.max_drop_pp / 100.0
        return None

    @property
    def cost_kind(self) -> str:
        """The cost the front is built against: the budget's kind, or ``minimize`` for an accuracy target."""
        if self.budget_latency_ms is not None:
            return "latency"
        if self.budget_energy_mj is not None:
            return "energy"
        if self.budget_macs is not None:
            return "macs"
        return self.minimize

    @property
    def budget(self) -> float | None:
        """The cost budget, or None for an accuracy target."""
        for v in (self.budget_macs, self.budget_latency_ms, self.budget_energy_mj):
            if v is not None:
                return float(v)
        return None

    def describe(self) -> str:
        if self.max_drop_pp is not None:
            return f"accuracy drop <= {self.max_drop_pp:g} pp"
        if self.min_accuracy is not None:
            return f"accuracy >= {100 * self.min_accuracy:.2f}%"
        if self.no_worse_than is not None:
            return f"accuracy no worse than '{self.no_worse_than}', lowest {cost_label(self.cost_kind)}"
        kind = f" ({KIND_LABELS[self.energy_kind]})" if self.cost_kind == "energy" and self.energy_kind else ""
        return f"average {cost_label(self.cost_kind)}{kind} <= {fmt_cost(self.cost_kind, self.budget or 0.0)}"

    def to_dict(self) -> dict[str, float | str]:
        out = {k: (v if isinstance(v, str) else float(v)) for k, v in self.__dict__.items()
               if v is not None and k != "minimize"}
        if self.is_accuracy_target:
            out["minimize"] = self.minimize
        return out


@dataclass(frozen=True)
class TuneResult:
    """The outcome of a search: the chosen point and the whole front.

    Attributes:
        chosen: the point that meets the target.
        front: the Pareto front, sorted by ``cost_kind`` ascending; accuracy never decreases along it.
        cost_kind: "macs", "latency" or "energy".
        final_accuracy: accuracy of the final exit alone on the same data.
        target: what was asked for.
        n: number of tuning inputs.
        data: where the tuning data came from.
        search_s: wall time of the search itself (not the trace).
        evaluated: number of threshold vectors evaluated.
        reference: for a ``no_worse_than`` target, the reference rule evaluated on the same data (``chosen``
            is the reference itself when no cheaper point is at least as accurate); ``target`` then holds
            the resolved ``min_accuracy``.
        reference_name: the name the reference was asked for by.
        margin_pp: how far above the reference's accuracy the floor was set.
        guarantee: what holds on new data (:class:`~edgeexit.tuning.guarantee.Guarantee`), or None for a point
            estimate on the tuning data (``--risk 1``).
    """

    chosen: OperatingPoint
    front: tuple[OperatingPoint, ...]
    cost_kind: str
    final_accuracy: float
    target: Target
    n: int
    data: str = ""
    search_s: float = 0.0
    evaluated: int = 0
    exit_costs: ExitCosts | None = None
    reference: OperatingPoint | None = None
    reference_name: str | None = None
    margin_pp: float = 0.0
    guarantee: Any = None

    def target_dict(self) -> dict[str, Any]:
        """The target as asked and as resolved (with the reference point for ``no_worse_than``)."""
        d: dict[str, Any] = dict(self.target.to_dict())
        if self.reference is not None:
            d.update(no_worse_than=self.reference_name, margin_pp=self.margin_pp, reference=self.reference.to_dict())
        return d

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen.to_dict(), "cost_kind": self.cost_kind,
                "final_accuracy": round(self.final_accuracy, 6), "target": self.target_dict(), "n": self.n,
                "data": self.data, "search_s": round(self.search_s, 4), "evaluated": self.evaluated,
                "guarantee": self.guarantee_dict(), "front": [p.to_dict() for p in self.front]}

    def guarantee_dict(self) -> dict[str, Any]:
        """What the chosen point promises on new data; ``{"risk": 1, ...}`` for a point estimate."""
        if self.guarantee is not None:
            return self.guarantee.to_dict()
        return {"statement": "none: a point estimate on the tuning images (--risk 1)", "risk": 1.0,
                "holds_with_probability": None}


def cost_label(kind: str) -> str:
    return {"macs": "MACs", "latency": "latency", "energy": "energy"}.get(kind, kind)


def fmt_cost(kind: str, value: float) -> str:
    if kind == "macs":
        return f"{100 * value:.1f}% of the full MACs"
    if kind == "latency":
        return f"{value:.4g} ms"
    return f"{value:.4g} mJ"
