"""Benchmark results on disk and on the terminal: file names, the sweep CSV, JSON + CSV + plot, the report."""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
from pathlib import Path
from typing import Any

from .bench_energy import format_energy
from ..errors import UsageError
from ..runtime.atomic import write_file_atomic
from .envinfo import slug
from .threshold_sweep import SWEEP_COLUMNS


def result_stem(result: dict[str, Any]) -> str:
    """``<board-or-machine>_<bundle>_<YYYYmmdd-HHMMSS>`` for a result (file names without suffix)."""
    env = result.get("environment") or {}
    board = result.get("settings", {}).get("board")
    machine = env.get("board") or (board if board and board != "generic" else None) or env.get("machine") or "unknown"
    when = _dt.datetime.fromisoformat(result["created"]).strftime("%Y%m%d-%H%M%S")
    return f"{slug(machine)}_{slug(result['bundle']['name'])}_{when}"


def sweep_csv(result: dict[str, Any]) -> str:
    """The sweep table as CSV text (one row per point; latencies are estimated)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SWEEP_COLUMNS)
    for p in (result.get("sweep") or {}).get("points", []):
        row = []
        for col in SWEEP_COLUMNS:
            v = p.get(col)
            if col in ("thresholds", "exit_shares"):
                v = ";".join(f"{x:.6g}" for x in v)
            elif isinstance(v, float):
                v = f"{v:.6g}"
            row.append(v)
        writer.writerow(row)
    return buf.getvalue()


def write_results(result: dict[str, Any], out_dir: str | os.PathLike[str], plot: bool = True) -> dict[str, Any]:
    """Write ``<stem>.json``, ``<stem>.csv`` (the sweep) and ``<stem>.png`` (the trade-off plot) into ``out_dir``,
    each atomically (written aside, then renamed: a killed run leaves no half-written file).

    The plot is skipped (and the returned ``"plot_skipped"`` says why) when matplotlib is missing or
    there is no sweep. The file names are also stored in ``result["files"]``.

    Returns:
        {"json": path, "csv": path or None, "png": path or None, "plot_skipped": reason or None}.

    Raises:
        UsageError: the output directory cannot be created or written.
    """
    from .plot import PlotUnavailable, plot_tradeoff

    out = Path(os.fspath(out_dir))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out} ({exc.strerror}); pass a writable --out") from None
    stem = result_stem(result)
    files: dict[str, Any] = {"json": str(out / f"{stem}.json"), "csv": None, "png": None, "plot_skipped": None}
    try:
        if result.get("sweep"):
            write_file_atomic(out / f"{stem}.csv", sweep_csv(result))
            files["csv"] = str(out / f"{stem}.csv")
            if plot:
                try:
                    files["png"] = str(plot_tradeoff(result, out / f"{stem}.png"))
                except PlotUnavailable as exc:
                    files["plot_skipped"] = str(exc)
            else:
                files["plot_skipped"] = "plot not requested"
        else:
            files["plot_skipped"] = "no sweep (--no-sweep)"
        result["files"] = {k: (os.path.basename(v) if k in ("json", "csv", "png") and v else v)
                           for k, v in files.items()}
        write_file_atomic(files["json"], json.dumps(result, indent=1) + "\n")  # never a half-written result
    except OSError as exc:
        raise UsageError(f"cannot write results into {out} ({exc.strerror}); pass a writable --out") from None
    return files



# ------------------------------------------------------------------------------------------------ report

def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_report(result: dict[str, Any]) -> str:
    """A readable report: per-exit table, whole-call latency against the monolithic model, estimates,
    overhead, throughput and the sweep table."""
    b, d, s, env = result["bundle"], result["dataset"], result["settings"], result["environment"]
    verdict = (b.get("verification") or {}).get("status", "not recorded")
    lines = [f"bundle {b['name']} ({b['num_exits']} exits, full network {b['full_macs']:,} MACs; int8 verification "
             f"{verdict}) on {d['name']} ({d['count']} images)",
             f"machine: {env.get('machine')} | {env.get('os')} | python {env.get('python')} | "
             f"{s['backend']} {s['backend_version']} | {s['threads']} thread(s) | governor {env.get('governor') or 'n/a'} | "
             f"board profile {s['board']}",
             f"rule: {s['rule']['kind']} {', '.join(f'{t:.4g}' for t in s['rule']['thresholds'])}"
             f"{'' if s['rule']['exit'] is None else 'exit ' + str(s['rule']['exit'])}"
             f" | warm-up {s['warmup']} | repeat {s['repeat']} | batch 1",
             f"latency = {result['latency_definition']}", ""]
    head = (f"{'exit':>4} {'share':>8} {'accuracy':>9} {'cum. MACs':>12} {'MAC %':>7} {'p50 ms':>8} {'p90 ms':>8} "
            f"{'p99 ms':>8}")
    lines += [head, "-" * len(head)]
    for r in result["exits"]:
        lat = r["latency_ms"]
        lines.append(f"{r['exit']:>4} {_pct(r['share']):>8} {_pct(r['accuracy']):>9} {r['cumulative_macs']:>12,} "
                     f"{100 * r['mac_fraction']:>6.1f}% {_ms(lat['p50']):>8} {_ms(lat['p90']):>8} {_ms(lat['p99']):>8}")
    o, m, f, sp = result["overall"], result["monolithic"], result["forced_last"], result["speedup"]
    mlat, flat = m.get("latency_ms") or {}, f["latency_ms"]
    lines += ["", f"{'whole call':24}{'early exit':>12}{'forced last':>13}{'monolithic':>12}{'speed-up':>10}"]
    for key, name in (("mean", "mean ms"), ("p50", "p50 ms"), ("p90", "p90 ms"), ("p99", "p99 ms")):
        ratio = _x(mlat[key] / o["latency_ms"][key]) if mlat.get(key) else "-"
        lines.append(f"{name:24}{_ms(o['latency_ms'][key]):>12}{_ms(flat[key]):>13}{_ms(mlat.get(key)):>12}{ratio:>10}")
    lines.append(f"{'accuracy':24}{_pct(o['accuracy']):>12}{_pct(f['accuracy']):>13}{_pct(m.get('accuracy')):>12}")
    lines.append(f"{'MACs / full network':24}{_pct(o['mac_fraction']):>12}{'100.00%':>13}{_pct(m.get('mac_fraction')):>12}")
    d = o.get("drift")
    if d:
        lines.append(f"exit shares vs {d['reference']} (tuned on {d['n_tuned'] or 'an unknown number of'} images): "
                     f"{'DRIFT: ' if d['drift'] else ''}p = {d['p_value']:.3g} ({d['test']}, chi2 {d['chi2']:.1f}, "
                     f"{d['dof']} dof; drift below {d['alpha']:g})")
    if sp.get("p50") is not None:
        vs = f["vs_monolithic"]
        lines.append(f"early exit vs monolithic: {_x(sp['p50'])} (p50), {_x(sp['mean'])} (mean), {_x(sp['p90'])} (p90); "
                     f"forced to the last exit ({f['rule']}, every decision made): {_x(vs['p50'])} the monolithic "
                     f"time (p50), {_x(vs['mean'])} (mean)")
    ov = result.get("overhead") or {}
    if ov:
        line = (f"time outside the invokes: early exit {ov['early_exit_outside_invokes_us']:.1f} us per call "
                f"(stage invokes {', '.join(f'{1e3 * v:.1f}' for v in ov['stage_invoke_ms'])} us)")
        if "monolithic_outside_invoke_us" in ov:
            line += (f", monolithic {ov['monolithic_outside_invoke_us']:.1f} us "
                     f"(invoke {1e3 * ov['monolithic_invoke_ms']:.1f} us)")
        lines.append(line)
    if result.get("points"):
        lines += ["", "estimated (exit costs) vs measured mean whole-call latency",
                  f"{'rule':44} {'accuracy':>9} {'measured':>9} {'estimated':>10} {'error':>7}"]
        for p in result["points"]:
            lines.append(f"{(p['name'] + ': ' + p['rule'])[:44]:44} {_pct(p['accuracy']):>9} "
                         f"{_ms(p['measured_mean_ms']):>9} {_ms(p['estimated_mean_ms']):>10} "
                         f"{100 * p['estimate_error']:>+6.1f}%")
    if result.get("throughput"):
        lines += ["", f"{'throughput':12}{'early exit':>14}{'monolithic':>14}{'ratio':>8}   (images/s)"]
        for t in result["throughput"]:
            if t["images"]:
                mono = "-" if t["monolithic_ips"] is None else f"{t['monolithic_ips']:,.0f}"
                lines.append(f"{'batch ' + str(t['batch']):12}{t['early_exit_ips']:>14,.0f}{mono:>14}{_x(t['ratio']):>8}")
    if result.get("float"):
        fl = result["float"]
        lines.append(f"float network (checkpoint): {_pct(fl['rule_accuracy'])} with the same rule, per exit "
                     + ", ".join(_pct(a) for a in fl["exit_accuracy"]))
    sw = result.get("sweep")
    if sw:
        lines += ["", f"threshold sweep ({sw['rule']}, one trace; latency ESTIMATED from the measured exit costs; "
                      f"run agreement {_pct(sw.get('run_agreement'))})"]
        head = f"{'point':34} {'accuracy':>9} {'MAC %':>7} {'est. ms':>9}  exit shares %"
        lines += [head, "-" * (len(head) + 12)]
        for p in sw["points"]:
            shares = " ".join(f"{100 * v:.0f}" for v in p["exit_shares"])
            lines.append(f"{p['name'][:34]:34} {_pct(p['accuracy']):>9} {100 * p['mac_fraction']:>6.1f}% "
                         f"{p['est_latency_ms']:>9.4f}  {shares}")
    if result.get("energy"):
        lines += ["", format_energy(result["energy"])]
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
