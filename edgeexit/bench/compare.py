"""Boards side by side: several ``edgeexit bench`` results of one bundle in one table, one CSV and one plot.

Results are matched by the bundle's hash (:func:`bundle_hash`: its stage and monolithic files), so that a
comparison never mixes networks; ``allow_mixed`` overrides that, and the table then names every bundle.
Energy per input is the measured figure where the result has one, else the board estimate; the ``energy
kind`` column (and the plot's markers) say which.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import UsageError
from ..runtime.atomic import write_file_atomic
from ..runtime.manifest import Manifest

#: Columns of the comparison CSV (one row per result).
COLUMNS = ("label", "rule", "time", "machine", "cpu", "cpu_family", "int8_features", "board_profile", "backend",
           "threads", "bundle", "bundle_sha256", "images", "accuracy", "latency_mean_ms", "latency_p50_ms",
           "monolithic_accuracy", "monolithic_latency_mean_ms",
           "monolithic_latency_p50_ms", "speedup_mean", "energy_kind", "energy_mj", "energy_ci95_mj",
           "monolithic_energy_mj", "monolithic_energy_ci95_mj", "proxy_mj", "monolithic_proxy_mj", "file")


def bundle_hash(manifest: Manifest) -> str:
    """sha256 over the sha256 of every stage file and of the monolithic file: the network, not its thresholds."""
    h = hashlib.sha256()
    for s in manifest.stages:
        h.update(s.sha256.lower().encode("ascii"))
    if manifest.monolithic is not None:
        h.update(b"monolithic:" + manifest.monolithic.sha256.lower().encode("ascii"))
    return h.hexdigest()


def load_results(paths: Sequence[str | os.PathLike[str]], allow_mixed: bool = False) -> list[dict[str, Any]]:
    """Read bench result files; refuse results of different bundles unless ``allow_mixed``.

    Raises:
        UsageError: fewer than two files, a file that is not a bench result, results without a bundle hash
            (older edgeexit), or results of different bundles.
    """
    if len(paths) < 2:
        raise UsageError(f"compare needs at least two bench result files, got {len(paths)}")
    results = []
    for p in paths:
        try:
            r = json.loads(Path(os.fspath(p)).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read bench result {p} ({exc}); pass the .json files `edgeexit bench` wrote") \
                from None
        if not isinstance(r, dict) or r.get("schema") != "edgeexit-bench":
            raise UsageError(f"{p} is not an `edgeexit bench` result (no schema 'edgeexit-bench')")
        r["_file"] = os.fspath(p)
        results.append(r)
    hashes = {r["bundle"].get("sha256") for r in results}
    if None in hashes and not allow_mixed:
        old = next(r["_file"] for r in results if r["bundle"].get("sha256") is None)
        raise UsageError(f"{old} has no bundle hash (written by an older edgeexit); re-run `edgeexit bench`, or pass "
                         "--allow-mixed to compare without checking that the bundles are the same")
    if len(hashes) > 1 and not allow_mixed:
        names = ", ".join(f"{os.path.basename(r['_file'])}: {r['bundle']['name']} {str(r['bundle'].get('sha256'))[:12]}"
                          for r in results)
        raise UsageError(f"the results are of different bundles ({names}); compare results of one bundle, or pass "
                         "--allow-mixed")
    return results


def _machine(r: Mapping[str, Any]) -> str:
    env, s = r.get("environment") or {}, r.get("settings") or {}
    machine = env.get("board") or env.get("cpu") or env.get("machine") or "unknown"
    return f"{machine} ({s.get('backend', '?')}, {s.get('threads', '?')} thr)"


def _cpu(r: Mapping[str, Any]) -> tuple[str | None, str | None, list[str] | None]:
    """(CPU model, family, int8 features) of a result's machine: what tells two machines of one model name apart.

    Results written before the environment record had features fall back to the features stamped on the
    result's exit costs (timed in the same run); None where neither records them.
    """
    env = r.get("environment") or {}
    features = env.get("int8_features")
    if features is None:
        features = (r.get("exit_costs") or {}).get("int8_features")
    return env.get("cpu"), env.get("cpu_family"), None if features is None else [str(f) for f in features]


def _rule(r: Mapping[str, Any]) -> str:
    rule = (r.get("settings") or {}).get("rule") or {}
    kind = rule.get("kind", "?")
    if kind == "fixed":
        return f"fixed exit {rule.get('exit')}"
    thresholds = rule.get("thresholds") or []
    return f"{kind} {','.join(f'{t:.3g}' for t in thresholds)}".strip()


def _when(r: Mapping[str, Any]) -> str:
    created = str(r.get("created") or "")
    return created[:16].replace("T", " ") if created else "?"


def _label(r: Mapping[str, Any], index: int) -> str:
    """A label that tells runs apart: run number, machine, rule and time (the file is its own column)."""
    return f"#{index} {_machine(r)}, {_rule(r)}, {_when(r)}"


def _energy(block: Mapping[str, Any] | None) -> tuple[str | None, float | None, float | None]:
    """(kind, mJ, ci95) of a run's energy: measured when there is a figure, else the board estimate."""
    if not block:
        return None, None, None
    m = block.get("measured_mj")
    if m and m.get("mean") is not None:
        return "measured", m["mean"], m.get("ci95")
    if block.get("board_estimate_mj") is not None:
        return "board_estimate", block["board_estimate_mj"], None
    return None, None, None


def comparison_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per result with the columns of :data:`COLUMNS`."""
    rows = []
    for i, r in enumerate(results, 1):
        o, m, e = r["overall"], r.get("monolithic") or {}, r.get("energy") or {}
        kind, mj, ci = _energy(e.get("early_exit"))
        mkind, mmj, mci = _energy(e.get("monolithic"))
        mlat = m.get("latency_ms") or {}
        cpu, family, features = _cpu(r)
        rows.append({
            "label": _label(r, i), "run": i, "machine_label": _machine(r), "rule": _rule(r), "time": _when(r),
            "machine": (r.get("environment") or {}).get("machine"), "cpu": cpu, "cpu_family": family,
            "int8_features": None if features is None else " ".join(features) or "none",
            "board_profile": r["settings"].get("board"), "backend": r["settings"].get("backend"),
            "threads": r["settings"].get("threads"), "bundle": r["bundle"]["name"],
            "bundle_sha256": r["bundle"].get("sha256"), "images": r["dataset"]["count"],
            "accuracy": o["accuracy"], "latency_mean_ms": o["latency_ms"]["mean"],
            "latency_p50_ms": o["latency_ms"]["p50"],
            "monolithic_accuracy": m.get("accuracy"), "monolithic_latency_mean_ms": mlat.get("mean"),
            "monolithic_latency_p50_ms": mlat.get("p50"), "speedup_mean": (r.get("speedup") or {}).get("mean"),
            "energy_kind": kind, "energy_mj": mj, "energy_ci95_mj": ci,
            # the monolithic figure of the same kind as the early-exit one, so the two can be compared
            "monolithic_energy_mj": mmj if mkind == kind else None,
            "monolithic_energy_ci95_mj": mci if mkind == kind else None,
            "proxy_mj": (e.get("early_exit") or {}).get("proxy_mj"),
            "monolithic_proxy_mj": (e.get("monolithic") or {}).get("proxy_mj"), "file": r["_file"]})
    return rows


def comparison_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for row in rows:
        w.writerow(["" if row[c] is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
                    for c in COLUMNS])
    return buf.getvalue()


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_comparison(rows: Sequence[Mapping[str, Any]]) -> str:
    """The terminal table: one line per result (run number, machine, rule, time, file, CPU family and int8
    features), early exit vs its board's monolithic model. Text columns are as wide as their longest entry:
    nothing is cut."""
    text_cols = [("#", [str(r["run"]) for r in rows]), ("machine", [r["machine_label"] for r in rows]),
                 ("rule", [r["rule"] for r in rows]), ("time", [r["time"] for r in rows]),
                 ("file", [os.path.basename(r["file"]) for r in rows]),
                 ("cpu family", [r["cpu_family"] or "not recorded" for r in rows]),
                 ("int8 features", [r["int8_features"] or "not recorded" for r in rows])]
    widths = [max(len(h), *(len(v) for v in vals)) for h, vals in text_cols]
    head = ("  ".join(h.ljust(w) for (h, _), w in zip(text_cols, widths))
            + f"  {'acc.':>7} {'mono':>7} {'mean ms':>9} {'mono ms':>9} {'speed-up':>8} {'energy mJ/input':>22} "
              f"{'mono mJ':>9} {'kind':>15}")
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows):
        energy = _num(r["energy_mj"], ".4f") + ("" if r["energy_ci95_mj"] is None else f" +-{r['energy_ci95_mj']:.4f}")
        lines.append("  ".join(vals[i].ljust(w) for (_, vals), w in zip(text_cols, widths))
                     + f"  {_num(r['accuracy'] and 100 * r['accuracy'], '.2f'):>6}% "
                     f"{_num(r['monolithic_accuracy'] and 100 * r['monolithic_accuracy'], '.2f'):>6}% "
                     f"{_num(r['latency_mean_ms'], '.4f'):>9} {_num(r['monolithic_latency_mean_ms'], '.4f'):>9} "
                     f"{_num(r['speedup_mean'], '.2f'):>7}x {energy:>22} {_num(r['monolithic_energy_mj'], '.4f'):>9} "
                     f"{(r['energy_kind'] or '-').replace('_', ' '):>15}")
    bundles = {(r["bundle"], r["bundle_sha256"]) for r in rows}
    lines.append("bundle: " + "; ".join(f"{n} (sha256 {str(h)[:12]})" for n, h in sorted(bundles, key=str))
                 + ("  MIXED BUNDLES" if len(bundles) > 1 else ""))
    lines.append("latency: mean whole-call latency per input as each result defines it (`latency_definition`); energy: "
                 "measured (+- 95% interval) where the result has a measurement, else latency x the board profile's "
                 "active power")
    return "\n".join(lines)


def plot_comparison(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Accuracy vs latency and accuracy vs energy per input, one colour per result, monolithic marked.

    Raises:
        PlotUnavailable: matplotlib is not installed.
    """
    from .plot import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(rows):
        c = colors[i % len(colors)]
        acc, macc = 100 * r["accuracy"], None if r["monolithic_accuracy"] is None else 100 * r["monolithic_accuracy"]
        axes[0].plot([r["latency_mean_ms"]], [acc], "*", ms=14, color=c, mec="black", label=f"{r['label']}: early exit")
        if macc is not None and r["monolithic_latency_mean_ms"] is not None:
            axes[0].plot([r["monolithic_latency_mean_ms"]], [macc], "s", ms=9, color=c, mec="black",
                         label=f"{r['label']}: monolithic")
            axes[0].plot([r["latency_mean_ms"], r["monolithic_latency_mean_ms"]], [acc, macc], ":", color=c, lw=1)
        if r["energy_mj"] is not None:
            hollow = r["energy_kind"] != "measured"
            kind = (r["energy_kind"] or "").replace("_", " ")
            ci = r["energy_ci95_mj"]
            axes[1].errorbar([r["energy_mj"]], [acc], xerr=None if ci is None else [ci],
                             fmt="*", ms=14, color=c, mec=c if hollow else "black", mew=1.8 if hollow else 1.0,
                             mfc="white" if hollow else c, capsize=3,
                             label=f"{r['label']}: early exit ({kind})")
            if r["monolithic_energy_mj"] is not None and macc is not None:
                mci = r["monolithic_energy_ci95_mj"]
                axes[1].errorbar([r["monolithic_energy_mj"]], [macc], xerr=None if mci is None else [mci], fmt="s",
                                 ms=9, color=c, mec=c if hollow else "black", mew=1.8 if hollow else 1.0,
                                 mfc="white" if hollow else c, capsize=3,
                                 label=f"{r['label']}: monolithic ({kind})")
                axes[1].plot([r["energy_mj"], r["monolithic_energy_mj"]], [acc, macc], ":", color=c, lw=1)
    axes[0].set_xlabel("mean whole-call latency per input [ms] (batch 1)")
    axes[1].set_xlabel("energy per input [mJ] (filled: measured, +-95% interval; hollow: board estimate)")
    axes[0].set_ylabel("top-1 accuracy [%]")
    for ax in axes:
        ax.set_xscale("log")  # boards differ by orders of magnitude
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.8)
    bundles = sorted({f"{r['bundle']} ({str(r['bundle_sha256'])[:12]})" for r in rows})
    fig.suptitle(f"{', '.join(bundles)}: boards side by side ({rows[0]['images']} images each; star = early exit, "
                 "square = the same board's monolithic int8 model)", fontsize=10)
    fig.tight_layout()
    out = Path(os.fspath(path))
    try:
        write_file_atomic(out, lambda f: fig.savefig(f, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return out
