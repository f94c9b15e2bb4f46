"""The accuracy / cost trade-off plot of a benchmark result.

matplotlib is optional on a device: it is imported inside :func:`plot_tradeoff`, and a missing matplotlib
raises :class:`PlotUnavailable` (the benchmark catches it, says the plot was skipped and how to install it).
The plot reads only the result dict that :mod:`edgeexit.bench.bench` writes as JSON, so it can also be drawn later
from a saved result on another machine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install matplotlib"


class PlotUnavailable(RuntimeError):
    """matplotlib cannot be imported; the plot is skipped (not an edgeexit error: the benchmark still works)."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(f"matplotlib is not installed; install it with {INSTALL_HINT}") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


#: marker style per kind of point: (marker, size, colour)
_STYLES = {"bundle": ("*", 13, "gold"), "run": ("*", 13, "orange"), "operating_point": ("P", 10, "violet"),
           "measured": ("D", 9, "tab:green"), "fixed": ("X", 8, "lightgrey"), "monolithic": ("s", 9, "tab:red")}


def _draw_marked(ax: Any, marked: list[tuple[float, float, str, str]]) -> None:
    """Draw (x, y, label, style) markers; labels of points that coincide are joined into one annotation."""
    groups: dict[tuple[float, float], list[str]] = {}
    for x, y, label, style in marked:
        marker, size, color = _STYLES[style]
        ax.plot([x], [y], marker=marker, markersize=size, color=color, markeredgecolor="black", linestyle="none",
                zorder=4 if style == "fixed" else 5)
        groups.setdefault((round(x, 9), round(y, 9)), []).append(label)
    ax.get_xlim(), ax.get_ylim()  # settle autoscaling so data -> pixel transforms are final
    x0, x1 = ax.get_xlim()
    placed: list[tuple[float, float]] = []
    offsets = ((7, 5), (7, -13), (7, 17), (7, -25), (7, 29))
    for (x, y), labels in groups.items():
        px, py = ax.transData.transform((x, y))
        crowd = sum(1 for qx, qy in placed if abs(qx - px) < 150 and abs(qy - py) < 14)
        placed.append((px, py))
        dx, dy = offsets[crowd % len(offsets)]
        right_half = (x - x0) > 0.6 * (x1 - x0)
        ax.annotate(" / ".join(dict.fromkeys(labels)), (x, y), textcoords="offset points",
                    xytext=(-dx if right_half else dx, dy), ha="right" if right_half else "left", fontsize=7.5,
                    zorder=6, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7, "lw": 0})


def _typical(block: Mapping[str, Any]) -> float | None:
    """A measured block's latency on the sweep's footing: the mean whole-call latency."""
    return (block.get("latency_ms") or {}).get("mean")


def _energy_panel(ax: Any, result: Mapping[str, Any], grid: list[Mapping[str, Any]],
                  marked: list[Mapping[str, Any]]) -> None:
    """Accuracy vs energy per input, of ONE kind: measured (with 95 % intervals) when the result has a
    measurement, else the operation proxy (which the sweep's points carry too)."""
    energy = result.get("energy") or {}
    overall, mono = result.get("overall") or {}, result.get("monolithic") or {}
    fixed = {p["name"]: p for p in marked if p.get("source") == "fixed"}
    measured = bool(energy.get("measurement")) and any((r.get("measured_mj") or {}).get("mean") is not None
                                                       for r in energy.get("exits", []))
    points: list[tuple[float, float, str, str]] = []

    def value(block: Mapping[str, Any] | None) -> tuple[float | None, float | None]:
        if not block:
            return None, None
        if measured:
            m = block.get("measured_mj") or {}
            return m.get("mean"), m.get("ci95")
        return block.get("proxy_mj"), None

    if not measured and grid and all("proxy_mj" in p for p in grid):
        xs = [p["proxy_mj"] for p in grid]
        ys = [100.0 * p["accuracy"] for p in grid]
        order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
        ax.plot([xs[i] for i in order], [ys[i] for i in order], "o-", color="tab:blue", markersize=4, linewidth=1.2,
                label="sweep: one global threshold")
    for row in energy.get("exits", []):
        p = fixed.get(f"exit {row['exit']} only")
        x, ci = value(row)
        if p is not None and x is not None:
            ax.errorbar([x], [100.0 * p["accuracy"]], xerr=None if ci is None else [ci], fmt="none",
                        ecolor="grey", capsize=3)
            points.append((x, 100.0 * p["accuracy"], f"exit {row['exit']} only", "fixed"))
    x, ci = value(energy.get("early_exit"))
    if x is not None and overall.get("accuracy") is not None:
        ax.errorbar([x], [100.0 * overall["accuracy"]], xerr=None if ci is None else [ci], fmt="none",
                    ecolor="tab:green", capsize=3)
        points.append((x, 100.0 * overall["accuracy"], "measured run", "measured"))
    x, ci = value(energy.get("monolithic"))
    if x is not None and mono.get("accuracy") is not None:
        ax.errorbar([x], [100.0 * mono["accuracy"]], xerr=None if ci is None else [ci], fmt="none",
                    ecolor="tab:red", capsize=3)
        ax.axvline(x, color="tab:red", linestyle=":", linewidth=1, label="monolithic int8")
        points.append((x, 100.0 * mono["accuracy"], "monolithic int8", "monolithic"))
    if points:
        _draw_marked(ax, points)
    ax.set_xlabel("energy per input [mJ], MEASURED total (+-95% interval, whole Runner call)" if measured else
                  "energy per input [mJ], OPERATION PROXY (45 nm operation energies, cache rule; not board energy)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7.5, loc="best", framealpha=0.8)


def plot_tradeoff(result: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw accuracy vs average MACs, vs estimated latency and vs energy per input from a benchmark result.

    Left panel: the sweep's accuracy [%] against average MACs [% of the full network]. Right panel: the
    same accuracy against mean whole-call latency [ms]: for sweep points estimated from the measured exit
    costs (each exit's share x the whole-call latency of an input forced to leave there); for the measured
    run and the monolithic model the measured mean (each input's median over the repeats). Marked and annotated: the bundle's rule, the run's rule,
    the bundle's operating points, every exit on its own, and the measured run. The monolithic int8 model is
    a point with reference lines (its accuracy horizontally; its MACs and latency vertically). Third panel:
    accuracy vs energy per input, measured when the result has a measurement (forced exits, the run, the
    monolithic model, with 95 % intervals), else the operation proxy (the sweep, the run, the monolithic model).

    Args:
        result: a dict as returned by :func:`edgeexit.bench.bench.run_benchmark` (or read from its JSON file).
        path: the PNG file to write.

    Returns:
        The path written.

    Raises:
        PlotUnavailable: matplotlib is not installed.
    """
    plt = _pyplot()
    sweep = result.get("sweep") or {}
    points = list(sweep.get("points") or [])
    grid = [p for p in points if p.get("source") == "grid"]
    marked = [p for p in points if p.get("source") != "grid"]
    mono = result.get("monolithic") or {}
    overall = result.get("overall") or {}
    env = result.get("environment") or {}
    machine = env.get("machine") or "unknown machine"
    board = result.get("settings", {}).get("board")

    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5), sharey=True)
    for ax, xkey, xlabel in ((axes[0], "mac_fraction", "average MACs per input [% of the full network]"),
                             (axes[1], "est_latency_ms", "mean whole-call latency per input [ms] (sweep: estimated from exit costs)")):
        scale = 100.0 if xkey == "mac_fraction" else 1.0
        if grid:
            xs = [p[xkey] * scale for p in grid]
            ys = [p["accuracy"] * 100.0 for p in grid]
            order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
            ax.plot([xs[i] for i in order], [ys[i] for i in order], "o-", color="tab:blue", markersize=4,
                    linewidth=1.2, label=f"{sweep.get('rule', 'exit rule')}: one global threshold (sweep)")
        points_here = [(p[xkey] * scale, p["accuracy"] * 100.0, p["name"], p.get("source", "bundle"))
                       for p in marked if p.get("source") in _STYLES]
        if overall.get("accuracy") is not None:
            mx = overall["mac_fraction"] * 100.0 if xkey == "mac_fraction" else _typical(overall)
            if mx is not None:
                points_here.append((mx, overall["accuracy"] * 100.0,
                                    "measured run" + (" (measured latency)" if xkey != "mac_fraction" else ""),
                                    "measured"))
        if mono.get("accuracy") is not None:
            macc = mono["accuracy"] * 100.0
            ax.axhline(macc, color="tab:red", linestyle="--", linewidth=1, label="monolithic int8: accuracy")
            mx = mono.get("mac_fraction", 1.0) * 100.0 if xkey == "mac_fraction" else _typical(mono)
            if mx is not None:
                ax.axvline(mx, color="tab:red", linestyle=":", linewidth=1,
                           label="monolithic int8: MACs" if xkey == "mac_fraction" else
                           "monolithic int8: mean latency (measured)")
                points_here.append((mx, macc, "monolithic int8", "monolithic"))
        _draw_marked(ax, points_here)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7.5, loc="best", framealpha=0.8)
    _energy_panel(axes[2], result, grid, marked)
    axes[0].set_ylabel("top-1 accuracy [%]")
    bundle = result.get("bundle", {}).get("name", "bundle")
    dataset = result.get("dataset", {}).get("name", "")
    n = result.get("dataset", {}).get("count", "")
    backend = result.get("settings", {}).get("backend", "")
    fig.suptitle(f"{bundle} on {machine} (board profile {board}, {backend}, "
                 f"{result.get('settings', {}).get('threads', '?')} thread(s))\n"
                 f"accuracy vs cost on {dataset}, {n} images, batch 1; sweep latencies are estimated from "
                 "the measured exit costs", fontsize=10)
    fig.tight_layout()
    out = Path(os.fspath(path))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    log.info("wrote %s", out)
    return out
