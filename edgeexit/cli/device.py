"""``edgeexit run`` and ``edgeexit info``: the device commands (numpy + interpreter only)."""

from __future__ import annotations

import json
from typing import Any

import click

from ..energy.boards import BOARDS
from ..runtime.bundle import Bundle, load_bundle
from ..errors import UsageError
from ..runtime.interpreter import BACKENDS
from ..runtime.manifest import EXIT_RULES, ExitRuleSpec
from ..runtime.rules import ExitRule, FixedExitRule, rule_from_spec


def _parse_thresholds(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--thresholds must be comma-separated numbers like 0.5,0.6, got {text!r}") from None


def _build_rule(bundle: Bundle, rule: str | None, thresholds: tuple[float, ...] | None,
                exit_index: int | None) -> ExitRule | ExitRuleSpec | str | None:
    """--rule KIND|OPERATING_POINT, --thresholds, --exit -> what Runner(rule=...) takes."""
    default = bundle.manifest.exit_rule
    if rule is None and thresholds is None and exit_index is None:
        return None
    if rule is not None and rule not in EXIT_RULES:
        if thresholds is not None:
            raise UsageError(f"--thresholds cannot be combined with operating point {rule!r}")
        return rule  # an operating point name; the Runner checks it
    kind = rule or default.kind
    if kind == "fixed":
        if exit_index is None and default.kind == "fixed":
            exit_index = default.exit
        if exit_index is None:
            raise UsageError("--rule fixed needs --exit N (0-based exit index)")
        return FixedExitRule(exit_index)
    if exit_index is not None:
        raise UsageError("--exit is only used with --rule fixed")
    if thresholds is None:
        if kind != default.kind and kind != "final":
            raise UsageError(f"--rule {kind} needs --thresholds (one per exit except the last: "
                             f"{bundle.manifest.num_exits - 1} values); the bundle's own rule is {default.kind}")
        thresholds = default.thresholds if kind == default.kind else ()
    return rule_from_spec(ExitRuleSpec(kind=kind, thresholds=thresholds))


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--rule", default=None, metavar="KIND|POINT",
              help=f"Exit rule kind ({', '.join(EXIT_RULES)}) or an operating point stored in the bundle.")
@click.option("--thresholds", default=None, metavar="T0,T1,...", help="One threshold per exit except the last.")
@click.option("--exit", "exit_index", type=int, default=None, help="Exit index for --rule fixed.")
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True,
              help="TFLite interpreter package.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="Interpreter threads.")
@click.option("--board", type=click.Choice(["auto", *BOARDS]), default="auto", show_default=True,
              help="Board power profile for energy estimates.")
@click.option("--edgetpu", is_flag=True, help="Run through the Edge TPU delegate (libedgetpu.so.1).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input (JSON Lines).")
def run(bundle: str, inputs: tuple[str, ...], rule: str | None, thresholds: str | None, exit_index: int | None,
        backend: str, threads: int, board: str, edgetpu: bool, as_json: bool) -> None:
    """Classify image files with BUNDLE: label, exit, MACs, latency and energy per input."""
    from ..runtime.runner import Runner

    loaded = load_bundle(bundle, backend=backend, check_tensors=False)
    chosen = _build_rule(loaded, rule, _parse_thresholds(thresholds), exit_index)
    runner = Runner(loaded, backend=backend, num_threads=threads, rule=chosen, board=board, edgetpu=edgetpu)
    n = runner.num_exits
    for path in inputs:
        r = runner.classify(path)
        if as_json:
            click.echo(json.dumps({"file": path, **r.to_dict()}))
        else:
            measured = (f", measured {r.energy.measured_mj:.3f} mJ" if r.energy.measured_mj is not None else "")
            click.echo(f"{path}\t{r.label_name}\t{r.score:.3f}\texit {r.exit_index + 1}/{n}\t{r.macs} MACs\t"
                       f"{r.latency_ms:.3f} ms\t{r.energy.board_estimate_mj:.3f} mJ board estimate ({runner.board.name})"
                       f"{measured}")


def _tensor(t: Any) -> str:
    q = t.quantization
    qs = f" q=({q.scale:.6g}, {q.zero_point})" if q is not None else ""
    return f"{t.name} {t.dtype}{list(t.shape)}{qs}"


def _info_dict(b: Bundle) -> dict[str, Any]:
    m = b.manifest
    cum, kappa = m.cumulative_macs(), m.kappa()
    stages = []
    for s, c, k in zip(m.stages, cum, kappa):
        stages.append({"index": s.index, "file": s.file, "size_bytes": s.size_bytes, "scores": s.scores,
                       "input": _tensor(s.input), "outputs": {key: _tensor(t) for key, t in s.outputs.items()},
                       "segment_macs": s.costs.segment_macs, "head_macs": s.costs.head_macs,
                       "cumulative_macs": c, "kappa": k,
                       "param_bytes": s.costs.segment_param_bytes + s.costs.head_param_bytes})
    return {"path": str(b.path), "name": m.name, "producer": m.producer, "format_version": m.format_version,
            "labels": list(m.labels), "input": _tensor(m.input),
            "preprocessing": {"size": list(m.preprocessing.size), "color_mode": m.preprocessing.color_mode,
                              "mean": list(m.preprocessing.mean), "std": list(m.preprocessing.std),
                              "pixel_scale": m.preprocessing.pixel_scale},
            "stages": stages, "full_macs": m.full_macs,
            "handoffs": ["pass-through" if h is None else f"requantize {h.src} -> {h.dst}" for h in b.handoffs],
            "exit_rule": {"kind": m.exit_rule.kind, "thresholds": list(m.exit_rule.thresholds),
                          "exit": m.exit_rule.exit},
            "monolithic": None if m.monolithic is None else {"file": m.monolithic.file, "macs": m.monolithic.macs},
            "verification": dict(m.verification), "operating_points": dict(m.operating_points),
            "training": dict(m.training), "edgetpu": dict(m.edgetpu), "checked_with": b.backend}


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True,
              help="TFLite interpreter package used to check the files.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(bundle: str, backend: str, as_json: bool) -> None:
    """Validate BUNDLE and show its stages, tensors, costs, exit rule and verification report."""
    d = _info_dict(load_bundle(bundle, backend=backend))
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
        return
    out = [f"bundle   {d['path']}  ({d['name']}, format {d['format_version']}, by {d['producer']}; all files "
           f"checked with {d['checked_with']})",
           f"input    {d['input']}  {d['preprocessing']['color_mode']} {d['preprocessing']['size'][0]}x"
           f"{d['preprocessing']['size'][1]} mean={d['preprocessing']['mean']} std={d['preprocessing']['std']}",
           f"classes  {len(d['labels'])}: {', '.join(d['labels'][:10])}{' ...' if len(d['labels']) > 10 else ''}",
           f"{'exit':>4} {'file':<18} {'segment MACs':>13} {'head MACs':>10} {'cumulative':>12} {'kappa':>6} "
           f"{'bytes':>9} scores"]
    for s in d["stages"]:
        out.append(f"{s['index']:>4} {s['file']:<18} {s['segment_macs']:>13,} {s['head_macs']:>10,} "
                   f"{s['cumulative_macs']:>12,} {s['kappa']:>6.3f} {s['size_bytes']:>9,} {s['scores']}")
    for s in d["stages"]:
        outs = "; ".join(f"{k}: {v}" for k, v in s["outputs"].items())
        out.append(f"  stage {s['index']}: in {s['input']}; {outs}")
    out.append(f"full network MACs {d['full_macs']:,}; hand-offs: {', '.join(d['handoffs']) or 'none'}")
    rule = d["exit_rule"]
    out.append(f"exit rule {rule['kind']} thresholds={rule['thresholds']}"
               + (f" exit={rule['exit']}" if rule["exit"] is not None else ""))
    if d["monolithic"]:
        out.append(f"monolithic {d['monolithic']['file']} ({d['monolithic']['macs']:,} MACs)")
    for key in ("verification", "operating_points", "training", "edgetpu"):
        out.append(f"{key.replace('_', ' ')}: {json.dumps(d[key], default=str) if d[key] else 'none'}")
    click.echo("\n".join(out))


__all__ = ["run", "info"]
