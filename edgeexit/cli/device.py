"""``edgeexit run`` and ``edgeexit info``: the device commands (numpy + interpreter only)."""

from __future__ import annotations

import json
from typing import Any, Mapping

import click

from ..energy.boards import BOARDS
from ..runtime.bundle import Bundle, load_bundle
from ..errors import UsageError, printable
from ..runtime.interpreter import BACKENDS, MAX_THREADS
from ..runtime.manifest import EXIT_RULES, ExitRuleSpec
from ..runtime.points import OperatingPoints
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
        if thresholds is not None or exit_index is not None:
            raise UsageError(f"--{'thresholds' if thresholds is not None else 'exit'} cannot be combined with "
                             f"operating point {rule!r} (it has its own); drop it, or give --rule KIND")
        return rule  # an operating point name; the Runner checks it
    kind = rule or default.kind
    if thresholds is not None and kind in ("final", "fixed"):  # these rules take no thresholds: never ignore them
        how = f"--rule {kind}" if rule else f"the bundle's rule ({kind})"
        raise UsageError(f"{how} takes no thresholds; drop --thresholds, or give --rule with a thresholded kind "
                         f"({', '.join(k for k in EXIT_RULES if k not in ('final', 'fixed'))})")
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


TRUSTED_KEY = click.option(
    "--trusted-key", metavar="PUBLIC.pem", default=None,
    help="Refuse the bundle unless manifest.sig is a valid signature by this Ed25519 public key "
         "(default: $EDGEEXIT_TRUSTED_KEY, if set).")


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--rule", default=None, metavar="KIND|POINT",
              help=f"Exit rule kind ({', '.join(EXIT_RULES)}) or an operating point stored in the bundle.")
@click.option("--thresholds", default=None, metavar="T0,T1,...", help="One threshold per exit except the last.")
@click.option("--exit", "exit_index", type=int, default=None, help="Exit index for --rule fixed.")
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True,
              help="TFLite interpreter package.")
@click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=1, show_default=True,
              help="Interpreter threads.")
@click.option("--board", type=click.Choice(["auto", *BOARDS]), default="auto", show_default=True,
              help="Board power profile for energy estimates.")
@click.option("--edgetpu", is_flag=True, help="Run through the Edge TPU delegate (libedgetpu.so.1).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input (JSON Lines).")
@TRUSTED_KEY
def run(bundle: str, inputs: tuple[str, ...], rule: str | None, thresholds: str | None, exit_index: int | None,
        backend: str, threads: int, board: str, edgetpu: bool, as_json: bool, trusted_key: str | None) -> None:
    """Classify image files with BUNDLE: label, exit, MACs, latency and energy per input."""
    from ..runtime.runner import Runner

    loaded = load_bundle(bundle, backend=backend, check_tensors=False, trusted_key=trusted_key)
    chosen = _build_rule(loaded, rule, _parse_thresholds(thresholds), exit_index)
    runner = Runner(loaded, backend=backend, num_threads=threads, rule=chosen, board=board, edgetpu=edgetpu)
    n = runner.num_exits
    for path in inputs:
        r = runner.classify(path)
        if as_json:
            click.echo(json.dumps({"file": path, **r.to_dict()}))
        else:
            measured = (f", measured {r.energy.measured_mj:.3f} mJ" if r.energy.measured_mj is not None else "")
            click.echo(f"{printable(path)}\t{printable(r.label_name)}\t{r.score:.3f}\texit {r.exit_index} (0..{n - 1})\t"
                       f"{r.macs} MACs\t"
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
            "labels": list(m.labels), "input": _tensor(m.input), "activations": m.activations,
            "preprocessing": {"size": list(m.preprocessing.size), "color_mode": m.preprocessing.color_mode,
                              "mean": list(m.preprocessing.mean), "std": list(m.preprocessing.std),
                              "pixel_scale": m.preprocessing.pixel_scale},
            "stages": stages, "full_macs": m.full_macs,
            "handoffs": ["pass-through" if h is None else f"requantize {h.src} -> {h.dst}" for h in b.handoffs],
            "exit_rule": {"kind": m.exit_rule.kind, "thresholds": list(m.exit_rule.thresholds),
                          "exit": m.exit_rule.exit},
            "monolithic": None if m.monolithic is None else {"file": m.monolithic.file, "macs": m.monolithic.macs},
            "verification": dict(m.verification), "operating_points": m.operating_points.to_dict(),
            "training": dict(m.training), "edgetpu": dict(m.edgetpu), "checked_with": b.backend,
            "signature": _signature_state(b)}


def _signature_state(b: Bundle) -> str:
    from ..runtime.signing import SIGNATURE_FILE

    if b.signed_by:
        return f"verified: signed by the trusted key {b.signed_by}"
    if (b.path / SIGNATURE_FILE).exists():
        return f"{SIGNATURE_FILE} present, not verified (pass --trusted-key PUBLIC.pem to require it)"
    return "none (the sha256 values catch accidental damage only; see `edgeexit sign`)"


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True,
              help="TFLite interpreter package used to check the files.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@TRUSTED_KEY
def info(bundle: str, backend: str, as_json: bool, trusted_key: str | None) -> None:
    """Validate BUNDLE and show its stages, tensors, costs, exit rule, verification, operating points and training
    as tables (exits numbered from 0); --json for the same as one JSON object."""
    loaded = load_bundle(bundle, backend=backend, trusted_key=trusted_key)
    d = _info_dict(loaded)
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
        return
    out = [f"bundle   {d['path']}  ({d['name']}, format {d['format_version']}, by {d['producer']}; all files "
           f"checked with {d['checked_with']})",
           f"input    {d['input']} ({d['activations']} activations)  {d['preprocessing']['color_mode']} "
           f"{d['preprocessing']['size'][0]}x"
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
    out += _or_raw(_verification_lines, d["verification"], "verification")
    out += _or_raw(_points_lines, loaded.manifest.operating_points, "operating points")
    for key in ("training", "edgetpu"):
        out += _mapping_lines(key.replace("_", " "), d[key])
    out.append(f"signature: {d['signature']}")
    click.echo("\n".join(printable(line, 100_000) for line in out))  # names and labels come from the manifest


def _or_raw(lines: Any, section: Any, title: str) -> list[str]:
    """``lines(section)``; for a section whose values are not what the converter / tune write, its raw JSON."""
    try:
        return lines(section)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError):
        raw = section.to_dict() if hasattr(section, "to_dict") else section
        return [f"{title} (not in the expected form): {json.dumps(raw, default=str)}"]


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Rows as right-aligned columns (the first column left-aligned), with a header line."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = [(str.ljust if i == 0 else str.rjust) for i in range(len(header))]
    return [indent + "  ".join(f(str(c), w) for f, c, w in zip(fmt, r, widths)).rstrip() for r in [header, *rows]]


def _pct(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def _num(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _verification_lines(v: Mapping[str, Any]) -> list[str]:
    """The conversion's int8-vs-float check, one row per exit (exits numbered from 0)."""
    if not v:
        return ["verification: none"]
    if "exits" not in v:
        return [f"verification: {'; '.join(f'{k} {val}' for k, val in v.items())}"]
    passed = v.get("passed")
    out = [f"verification: {'passed' if passed else 'FAILED' if passed is not None else '?'} on {v.get('samples', '?')} "
           "held-out images (int8 files vs the float network)"]
    rows = [[str(e.get("exit", i)), _pct(e.get("logit_error"), 2), _pct(e.get("top1_agreement")),
             _pct(e.get("top1_agreement_clear")), _pct(e.get("decision_agreement")), _pct(e.get("float_accuracy")),
             _pct(e.get("int8_accuracy")), _drop(e.get("accuracy_drop"))]
            for i, e in enumerate(v["exits"])]
    out += _table(["exit", "logit err", "top-1 agree", "clear top-1", "decision agree", "float acc", "int8 acc",
                   "drop pp [bounds]"], rows)
    ee, mono = v.get("early_exit") or {}, v.get("monolithic") or {}
    if ee:
        out.append(f"  early exit: exit agreement {_pct(ee.get('exit_agreement'))}, accuracy float "
                   f"{_pct(ee.get('float_accuracy'))} int8 {_pct(ee.get('int8_accuracy'))}, drop pp "
                   f"{_drop(ee.get('accuracy_drop'))}")
    if mono:
        out.append(f"  monolithic: logit err {_pct(mono.get('logit_error'), 2)}, top-1 agreement "
                   f"{_pct(mono.get('top1_agreement'))}, accuracy float {_pct(mono.get('float_accuracy'))} int8 "
                   f"{_pct(mono.get('int8_accuracy'))}, drop pp {_drop(mono.get('accuracy_drop'))}")
    out += [f"  failure: {f}" for f in v.get("failures") or []]
    return out


def _drop(d: Any) -> str:
    """float - int8 accuracy in pp with its one-sided bounds, as the conversion's verification records it."""
    if not isinstance(d, Mapping):
        return "-"
    return f"{d['pp']:+.2f} [{d['lower_pp']:+.2f}, {d['upper_pp']:+.2f}]"


def _points_lines(points: OperatingPoints) -> list[str]:
    """Named operating points and the stored front, one row each (exit shares from exit 0)."""
    if not points:
        return ["operating points: none (create them with `edgeexit tune`)"]
    rows = []
    for name, p in points.named.items():
        m = p.metrics
        thresholds = ",".join(f"{t:.4g}" for t in p.rule.get("thresholds", ()))
        shares = " ".join(f"{100 * f:.0f}" for f in m.exit_fractions) if m is not None else "-"
        rows.append([name, str(p.rule.get("kind", "?")), thresholds, _pct(m and m.accuracy),
                     _pct(m and m.avg_macs_fraction), _num(m and m.est_latency_ms, ".3f"), shares,
                     f"{p.data} (n={p.n})" if p.data else "-"])
    out = ["operating points:"] + _table(["name", "rule", "thresholds", "accuracy", "MACs", "est. ms",
                                          "exit shares % (0..)", "tuned on"], rows)
    if points.front:
        lo, hi = points.front[0], points.front[-1]
        out.append(f"  front: {len(points.front)} points, {points.front[0].rule}; accuracy {_pct(lo.accuracy)} at "
                   f"{_pct(lo.avg_macs_fraction)} MACs .. {_pct(hi.accuracy)} at {_pct(hi.avg_macs_fraction)} MACs")
    if points.exit_costs is not None:
        out.append(f"  exit costs: stored ({', '.join(k for k in points.exit_costs)})")
    out += [f"  unreadable entry: {k}" for k in points.unreadable]
    return out


def _mapping_lines(title: str, d: Mapping[str, Any]) -> list[str]:
    """A flat ``key: value`` list; nested values as compact JSON."""
    if not d:
        return [f"{title}: none"]
    width = max(len(str(k)) for k in d)
    return [f"{title}:"] + [f"  {str(k):<{width}}  {v if isinstance(v, (str, int, float)) else json.dumps(v, default=str)}"
                            for k, v in d.items()]


__all__ = ["run", "info"]
