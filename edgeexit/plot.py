"""The accuracy / cost trade-off plot of a benchmark result.

matplotlib is optional on a device: it is imported inside :func:`plot_tradeoff`, and a missing matplotlib
raises :class:`PlotUnavailable` (the benchmark catches it, says the plot was skipped and how to install it).
The plot reads only the result dict that :mod:`edgeexit.bench` writes as JSON, so it can also be drawn later
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


def _annotate(ax: Any, x: float, y: float, text: str, marker: str, color: str) -> None:
    ax.plot([x], [y], marker=marker, markersize=11, color=color, markeredgecolor="black", linestyle="none",
            zorder=5)
    ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8, color="black", zorder=6)


def plot_tradeoff(result: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw accuracy vs average MACs and accuracy vs estimated latency from a benchmark result.

    Left panel: the sweep's accuracy [%] against average MACs [% of the full network]. Right panel: the
    same accuracy against the estimated mean latency [ms] (per-stage latencies measured in the trace,
    summed up to each input's exit). Marked and annotated: the bundle's operating point(s) and the run
    actually measured. The monolithic int8 model is drawn as a point with reference lines (its accuracy
    horizontally; 100 % of the MACs and its measured mean latency vertically).

    Args:
        result: a dict as returned by :func:`edgeexit.bench.run_benchmark` (or read from its JSON file).
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
    board = result.get("settings", {}).get("board") or env.get("machine") or "unknown machine"

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, xkey, xlabel in ((axes[0], "mac_fraction", "average MACs per input [% of the full network]"),
                             (axes[1], "est_latency_ms", "estimated mean latency per input [ms]")):
        scale = 100.0 if xkey == "mac_fraction" else 1.0
        if grid:
            xs = [p[xkey] * scale for p in grid]
            ys = [p["accuracy"] * 100.0 for p in grid]
            order = sorted(range(len(xs)), key=lambda i: xs[i])
            ax.plot([xs[i] for i in order], [ys[i] for i in order], "o-", color="tab:blue", markersize=4,
                    linewidth=1.2, label=f"{sweep.get('rule', 'exit rule')} threshold sweep (one trace)")
        for p in marked:
            _annotate(ax, p[xkey] * scale, p["accuracy"] * 100.0, p["name"], "*", "gold")
        if overall.get("accuracy") is not None:
            if xkey == "mac_fraction":
                mx = overall["mac_fraction"] * 100.0
            else:
                mx = (overall.get("latency_ms") or {}).get("mean")
            if mx is not None:
                _annotate(ax, mx, overall["accuracy"] * 100.0, "measured run", "D", "tab:green")
        if mono.get("accuracy") is not None:
            macc = mono["accuracy"] * 100.0
            ax.axhline(macc, color="tab:red", linestyle="--", linewidth=1, label="monolithic int8 accuracy")
            mx = 100.0 if xkey == "mac_fraction" else (mono.get("latency_ms") or {}).get("mean")
            if mx is not None:
                ax.axvline(mx, color="tab:red", linestyle=":", linewidth=1,
                           label="monolithic int8 cost" if xkey == "mac_fraction" else "monolithic int8 latency (measured)")
                _annotate(ax, mx, macc, "monolithic", "s", "tab:red")
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("top-1 accuracy [%]")
    bundle = result.get("bundle", {}).get("name", "bundle")
    dataset = result.get("dataset", {}).get("name", "")
    n = result.get("dataset", {}).get("count", "")
    fig.suptitle(f"{bundle} on {board}: accuracy vs cost ({dataset}, {n} images, batch 1, "
                 f"{result.get('settings', {}).get('threads', '?')} thread(s))", fontsize=10)
    fig.tight_layout()
    out = Path(os.fspath(path))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    log.info("wrote %s", out)
    return out
