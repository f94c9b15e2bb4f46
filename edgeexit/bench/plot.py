"""The accuracy / cost trade-off plot of a benchmark result.

matplotlib is optional on a device (``pip install 'edgeexit[plot]'``): it is imported inside
:func:`plot_tradeoff`, and a missing matplotlib raises :class:`PlotUnavailable` (the benchmark catches it, says the
plot was skipped and how to install it). The plot reads only the result dict that :mod:`edgeexit.bench.bench`
writes as JSON, so it can also be drawn later from a saved result on another machine.

What a reader sees first is the headline (the title's first line: the run's accuracy, MACs and speed-up against
the monolithic model), then where the measured run (green diamond) and the monolithic model (red square) sit on
each panel. Points on or near each other are drawn as concentric markers (the first one largest) and share one
annotation; annotations go where they overlap neither each other, nor markers, nor the panel's edges.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..runtime.atomic import write_file_atomic

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'edgeexit[plot]' (or pip install matplotlib)"

Marked = tuple[float, float, str, str]  # (x, y, label, style)


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


#: marker style per kind of point: (marker, size, colour, legend text); a group of near points is drawn in this order
_STYLES = {"measured": ("D", 10, "tab:green", "measured run (its latency and energy measured)"),
           "monolithic": ("s", 10, "tab:red", "monolithic int8 model (measured)"),
           "bundle": ("*", 14, "gold", "the bundle's exit rule"),
           "run": ("*", 14, "orange", "the rule of this run"),
           "operating_point": ("P", 11, "violet", "a stored operating point"),
           "fixed": ("X", 9, "lightgrey", "one exit only (forced)")}
#: points closer than this many pixels share one group of concentric markers and one annotation
NEAR_PX = 9.0
#: annotation offsets tried in turn (points): right/left, above/below, then further out
_OFFSETS = ((8, 5), (8, -15), (-8, 5), (-8, -15), (8, 19), (-8, 19), (8, -29), (-8, -29), (8, 33), (-8, 33),
            (8, -43), (-8, -43))


def _short(label: str, style: str) -> str:
    """A short annotation: "bundle rule" instead of the rule's thresholds, 'tuned' instead of point 'tuned'."""
    if style == "bundle":
        return "bundle rule"
    if style == "run":
        return "run rule"
    if style == "operating_point" and label.startswith("point '") and label.endswith("'"):
        return f"'{label[7:-1]}'"
    return label


def _groups(ax: Any, marked: Sequence[Marked]) -> list[list[Marked]]:
    """Points within :data:`NEAR_PX` of each other at the axes' current limits, each group in drawing order."""
    rank = list(_STYLES)
    groups: list[list[Marked]] = []
    anchors: list[tuple[float, float]] = []
    for m in sorted(marked, key=lambda m: rank.index(m[3])):
        px, py = ax.transData.transform((m[0], m[1]))
        for group, (gx, gy) in zip(groups, anchors):
            if abs(gx - px) <= NEAR_PX and abs(gy - py) <= NEAR_PX:
                group.append(m)
                break
        else:
            groups.append([m])
            anchors.append((px, py))
    return groups


def _draw_markers(ax: Any, groups: list[list[Marked]]) -> None:
    """Each group as concentric markers: the first member largest and lowest, each later one smaller on top."""
    for group in groups:
        n = len(group)
        for rank, (x, y, _label, style) in enumerate(group):
            marker, size, color, _ = _STYLES[style]
            ax.plot([x], [y], marker=marker, markersize=size + 7 * (n - 1 - rank), color=color,
                    markeredgecolor="black", markeredgewidth=0.9, linestyle="none", zorder=5 + rank)


def _place_labels(ax: Any, groups: list[list[Marked]], renderer: Any) -> None:
    """One annotation per group, at the first offset of :data:`_OFFSETS` whose box stays inside the axes and
    overlaps no other annotation and no marker group (else the first that stays inside)."""
    inside = ax.get_window_extent(renderer)
    marks = []
    for group in groups:
        px, py = ax.transData.transform((group[0][0], group[0][1]))
        r = 5 + 3.5 * len(group)
        marks.append((px - r, py - r, px + r, py + r))
    taken: list[Any] = []
    for group in sorted(groups, key=len, reverse=True):
        text = " / ".join(dict.fromkeys(_short(label, style) for _, _, label, style in group))
        ann = ax.annotate(text, (group[0][0], group[0][1]), textcoords="offset points", xytext=_OFFSETS[0],
                          fontsize=8, va="bottom", zorder=20,
                          bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.85, "lw": 0})
        fallback = None
        for dx, dy in _OFFSETS:
            ann.xyann = (dx, dy)
            ann.set_horizontalalignment("left" if dx > 0 else "right")
            box = ann.get_window_extent(renderer)
            fits = box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0 and box.y1 <= inside.y1
            if not fits:
                continue
            fallback = fallback or (dx, dy)
            if not any(box.overlaps(t) for t in taken) and not any(
                    box.x0 < m[2] and box.x1 > m[0] and box.y0 < m[3] and box.y1 > m[1] for m in marks):
                break
        else:
            dx, dy = fallback or _OFFSETS[0]
            ann.xyann = (dx, dy)
            ann.set_horizontalalignment("left" if dx > 0 else "right")
        taken.append(ann.get_window_extent(renderer))


def _typical(block: Mapping[str, Any]) -> float | None:
    """A measured block's latency on the sweep's footing: the mean whole-call latency."""
    return (block.get("latency_ms") or {}).get("mean")


def _energy_points(ax: Any, result: Mapping[str, Any], grid: list[Mapping[str, Any]],
                   marked: list[Mapping[str, Any]]) -> tuple[list[Marked], bool]:
    """Accuracy vs energy per input, of ONE kind: measured (with 95 % intervals) when the result has a
    measurement, else the operation proxy (which the sweep's points carry too). Returns the marked points and
    whether the energy is measured."""
    energy = result.get("energy") or {}
    overall, mono = result.get("overall") or {}, result.get("monolithic") or {}
    fixed = {p["name"]: p for p in marked if p.get("source") == "fixed"}
    measured = bool(energy.get("measurement")) and any((r.get("measured_mj") or {}).get("mean") is not None
                                                       for r in energy.get("exits", []))
    points: list[Marked] = []

    def value(block: Mapping[str, Any] | None) -> tuple[float | None, float | None]:
        if not block:
            return None, None
        if measured:
            m = block.get("measured_mj") or {}
            return m.get("mean"), m.get("ci95")
        return block.get("proxy_mj"), None

    if not measured and grid and all("proxy_mj" in p for p in grid):
        _sweep_line(ax, [p["proxy_mj"] for p in grid], [100.0 * p["accuracy"] for p in grid])
        points += [(p["proxy_mj"], 100.0 * p["accuracy"], p["name"], p["source"]) for p in marked
                   if p.get("source") in ("bundle", "run", "operating_point") and "proxy_mj" in p]
    for row in energy.get("exits", []):
        p = fixed.get(f"exit {row['exit']} only")
        x, ci = value(row)
        if p is not None and x is not None:
            if ci is not None:
                ax.errorbar([x], [100.0 * p["accuracy"]], xerr=[ci], fmt="none", ecolor="grey", capsize=3)
            points.append((x, 100.0 * p["accuracy"], f"exit {row['exit']} only", "fixed"))
    x, ci = value(energy.get("early_exit"))
    if x is not None and overall.get("accuracy") is not None:
        if ci is not None:
            ax.errorbar([x], [100.0 * overall["accuracy"]], xerr=[ci], fmt="none", ecolor="tab:green", capsize=3)
        points.append((x, 100.0 * overall["accuracy"], "measured run", "measured"))
    x, ci = value(energy.get("monolithic"))
    if x is not None and mono.get("accuracy") is not None:
        if ci is not None:
            ax.errorbar([x], [100.0 * mono["accuracy"]], xerr=[ci], fmt="none", ecolor="tab:red", capsize=3)
        ax.axvline(x, color="tab:red", linestyle=":", linewidth=1)
        points.append((x, 100.0 * mono["accuracy"], "monolithic int8", "monolithic"))
    return points, measured


def _sweep_line(ax: Any, xs: list[float], ys: list[float]) -> None:
    order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
    ax.plot([xs[i] for i in order], [ys[i] for i in order], "o-", color="tab:blue", markersize=3.5, linewidth=1.2,
            zorder=3)


def headline(result: Mapping[str, Any]) -> str:
    """The plot's first line: what the run achieved against the monolithic model."""
    overall, mono, speed = result.get("overall") or {}, result.get("monolithic") or {}, result.get("speedup") or {}
    rule = (result.get("settings") or {}).get("rule") or {}
    text = (f"early exit ({rule.get('kind', 'rule')}): {100 * overall.get('accuracy', 0):.2f}% top-1 at "
            f"{100 * overall.get('mac_fraction', 0):.1f}% of the MACs")
    if mono.get("accuracy") is not None and speed.get("p50") is not None:
        text += (f", {speed['p50']:.2f}x faster than the monolithic int8 model (p50 whole call; "
                 f"{100 * mono['accuracy']:.2f}% top-1)")
    return text


def plot_tradeoff(result: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write :func:`tradeoff_figure` of ``result`` to the PNG file ``path`` (120 dpi) and return ``path``.

    Raises:
        PlotUnavailable: matplotlib is not installed.
    """
    plt = _pyplot()
    fig = tradeoff_figure(result)
    out = Path(os.fspath(path))
    try:
        write_file_atomic(out, lambda f: fig.savefig(f, dpi=DPI, format="png"))
    finally:
        plt.close(fig)
    log.info("wrote %s", out)
    return out


#: Resolution of the PNG (the label placement is computed for it).
DPI = 120


def tradeoff_figure(result: Mapping[str, Any]) -> Any:
    """Draw accuracy vs average MACs, vs mean latency and vs energy per input from a benchmark result.

    Left panel: the sweep's accuracy [%] against average MACs [% of the full network]. Middle panel: the same
    accuracy against mean whole-call latency [ms]: for sweep points estimated from the measured exit costs (each
    exit's share x the whole-call latency of an input forced to leave there); for the measured run and the
    monolithic model the measured mean (each input's median over the repeats). Marked: the bundle's rule, the
    run's rule, the bundle's operating points, every exit on its own, the measured run and the monolithic int8
    model (with reference lines: its accuracy horizontally, its MACs and latency vertically). Right panel:
    accuracy vs energy per input, measured when the result has a measurement (forced exits, the run, the
    monolithic model, with 95 % intervals), else the operation proxy (the sweep, the named rules, the run, the
    monolithic model). One legend below the panels explains every marker.

    Args:
        result: a dict as returned by :func:`edgeexit.bench.bench.run_benchmark` (or read from its JSON file).

    Returns:
        The matplotlib Figure, laid out for :data:`DPI` (the caller closes it).

    Raises:
        PlotUnavailable: matplotlib is not installed.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    sweep = result.get("sweep") or {}
    points = list(sweep.get("points") or [])
    grid = [p for p in points if p.get("source") == "grid"]
    marked = [p for p in points if p.get("source") != "grid"]
    mono = result.get("monolithic") or {}
    overall = result.get("overall") or {}

    fig, axes = plt.subplots(1, 3, figsize=(18, 6.6), sharey=True, dpi=DPI)
    per_axis: list[list[Marked]] = []
    for ax, xkey in ((axes[0], "mac_fraction"), (axes[1], "est_latency_ms")):
        scale = 100.0 if xkey == "mac_fraction" else 1.0
        if grid:
            _sweep_line(ax, [p[xkey] * scale for p in grid], [p["accuracy"] * 100.0 for p in grid])
        here = [(p[xkey] * scale, p["accuracy"] * 100.0, p["name"], p.get("source", "bundle"))
                for p in marked if p.get("source") in _STYLES]
        if overall.get("accuracy") is not None:
            mx = overall["mac_fraction"] * 100.0 if xkey == "mac_fraction" else _typical(overall)
            if mx is not None:
                here.append((mx, overall["accuracy"] * 100.0, "measured run", "measured"))
        if mono.get("accuracy") is not None:
            ax.axhline(mono["accuracy"] * 100.0, color="tab:red", linestyle="--", linewidth=1)
            mx = mono.get("mac_fraction", 1.0) * 100.0 if xkey == "mac_fraction" else _typical(mono)
            if mx is not None:
                ax.axvline(mx, color="tab:red", linestyle=":", linewidth=1)
                here.append((mx, mono["accuracy"] * 100.0, "monolithic int8", "monolithic"))
        per_axis.append(here)
    energy_here, measured = _energy_points(axes[2], result, grid, marked)
    per_axis.append(energy_here)
    if mono.get("accuracy") is not None:
        axes[2].axhline(mono["accuracy"] * 100.0, color="tab:red", linestyle="--", linewidth=1)

    axes[0].set_xlabel("average MACs per input [% of the full network]")
    axes[1].set_xlabel("mean whole-call latency per input [ms]\n(sweep: estimated from the measured exit costs)")
    axes[2].set_xlabel("energy per input [mJ], measured\n(+-95% interval, whole call)" if measured else
                       "energy per input [mJ], operation proxy\n(45 nm operation energies; not board energy)")
    axes[0].set_ylabel("top-1 accuracy [%]")
    for ax, here in zip(axes, per_axis):
        ax.grid(True, alpha=0.3)
        for x, y, _, _ in here:  # markers' data into the autoscaled limits, then a margin for the annotations
            ax.update_datalim([(x, y)])
        ax.autoscale_view()
        ax.margins(x=0.08, y=0.1)

    machine = (result.get("environment") or {}).get("machine") or "unknown machine"
    s, d = result.get("settings") or {}, result.get("dataset") or {}
    fig.suptitle(f"{headline(result)}\n"
                 f"{(result.get('bundle') or {}).get('name', 'bundle')} on {machine} ({s.get('backend', '?')}, "
                 f"{s.get('threads', '?')} thread(s), board profile {s.get('board')}); {d.get('name', '')}, "
                 f"{d.get('count', '?')} images, batch 1", fontsize=11)
    handles = [Line2D([], [], color="tab:blue", marker="o", markersize=4,
                      label=f"threshold sweep ({sweep.get('rule', 'exit rule')}, one global threshold)"),
               Line2D([], [], color="tab:red", linestyle="--", label="monolithic int8: accuracy"),
               Line2D([], [], color="tab:red", linestyle=":", label="monolithic int8: MACs / latency / energy")]
    used = {style for here in per_axis for _, _, _, style in here}
    handles += [Line2D([], [], marker=m, markersize=min(sz, 11), color=c, markeredgecolor="black", linestyle="none",
                       label=text) for style, (m, sz, c, text) in _STYLES.items() if style in used]
    fig.legend(handles=handles, loc="lower center", ncol=(len(handles) + 1) // 2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    renderer = fig.canvas.get_renderer()
    for ax, here in zip(axes, per_axis):
        groups = _groups(ax, here)
        _draw_markers(ax, groups)
        _place_labels(ax, groups, renderer)
    return fig
