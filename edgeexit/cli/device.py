"""``edgeexit run`` and ``edgeexit info``: the device commands (numpy + interpreter only)."""

from __future__ import annotations

import json
import os
import stat
import sys
from typing import Any, Mapping, Sequence

import click

from ..energy.boards import BOARDS
from ..runtime.bundle import Bundle, load_bundle
from ..errors import EdgeExitError, InputError, UsageError, printable
from .options import Choice, did_you_mean
from ..runtime.interpreter import BACKENDS, MAX_THREADS
from ..runtime.manifest import EXIT_RULES, FALLBACK_RULES, FALLBACKS, ExitRuleSpec
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
                exit_index: int | None, fallback: str | None = None) -> ExitRule | ExitRuleSpec | str | None:
    """--rule KIND|OPERATING_POINT, --thresholds, --exit, --fallback -> what Runner(rule=...) takes. Without
    --fallback the fallback is the bundle rule's when the kind is the bundle's own, else final."""
    default = bundle.manifest.exit_rule
    if rule is None and thresholds is None and exit_index is None and fallback is None:
        return None
    if rule is not None and rule not in EXIT_RULES:
        points = point_names(bundle)
        if rule not in points:
            stored = (f"one of the bundle's operating points ({', '.join(points)})" if points else
                      "an operating point of the bundle (it has none; `edgeexit tune` stores them)")
            raise UsageError(f"--rule {rule!r} is neither an exit rule kind ({', '.join(EXIT_RULES)}) nor "
                             f"{stored}{did_you_mean(rule, [*EXIT_RULES, *points])}")
        if thresholds is not None or exit_index is not None or fallback is not None:
            flag = "thresholds" if thresholds is not None else "exit" if exit_index is not None else "fallback"
            raise UsageError(f"--{flag} cannot be combined with operating point {rule!r} (it has its own); drop "
                             "it, or give --rule KIND")
        return rule  # an operating point name; the Runner checks it
    kind = rule or default.kind
    if fallback is None:
        fallback = default.fallback if kind == default.kind else "final"
    if fallback != "final" and kind not in FALLBACK_RULES:
        how = f"--rule {kind}" if rule else f"the bundle's rule ({kind})"
        raise UsageError(f"{how} takes --fallback final only; most_confident works with --rule "
                         f"{', '.join(FALLBACK_RULES)}")
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
    return rule_from_spec(ExitRuleSpec(kind=kind, thresholds=thresholds, fallback=fallback))


def point_names(bundle: Bundle) -> list[str]:
    """Names ``--rule`` accepts as operating points: the stored named points (readable or not)."""
    ops = bundle.manifest.operating_points
    return [n for n in [*ops.named, *ops.unreadable] if n not in ("front", "exit_costs")]


def image_mismatch(path: str, size: tuple[int, int], color_mode: str) -> str | None:
    """How an image file differs from the bundle's input (size, or grey vs colour), from its header only;
    None when it fits or cannot be read (classifying it then says why)."""
    try:
        from PIL import Image

        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not hang the open
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device: never read here (would block)
                return None
            with Image.open(f) as im:
                w, h, mode = im.width, im.height, im.mode
    except Exception:  # noqa: BLE001 - Pillow raises many types for bad files; the Runner reports them properly
        return None
    grey = mode in ("L", "1", "I;16", "I", "F")  # as the image-folder datasets read them (bench)
    have = "L" if grey else "RGB"
    if (h, w) == tuple(size) and have == color_mode:
        return None
    return f"{w}x{h} {mode}, the bundle takes {size[1]}x{size[0]} {color_mode}"


FALLBACK = click.option(
    "--fallback", type=Choice(FALLBACKS), default=None,
    help="When no early exit stops an input: answer from the final exit, or from the exit with the highest score "
         "under the rule (most_confident: confidence, max_softmax, entropy; the input still runs every stage). "
         "Default: the bundle rule's fallback with its own kind, else final.")

def offload_options(f: Any) -> Any:
    """--offload URL, --offload-after K and their companions (run, bench)."""
    for option in reversed([
        click.option("--offload", "offload_url", default=None, metavar="URL",
                     help="Send inputs still undecided after stage --offload-after to this `edgeexit serve` server "
                          "(http(s)://HOST:PORT) when that is expected to be faster; they finish here if it fails."),
        click.option("--offload-after", type=int, default=None, metavar="K", help="The last stage run here."),
        click.option("--offload-token-file", default=None, metavar="FILE", help="The server's bearer token."),
        click.option("--offload-ca", default=None, metavar="PEM", help="CA certificates of an https server."),
        click.option("--offload-cert", default=None, metavar="PEM",
                     help="This board's client certificate, for a server that requires one (mTLS)."),
        click.option("--offload-key", default=None, metavar="PEM",
                     help="The client certificate's private key (if not in --offload-cert's file)."),
        click.option("--offload-timeout-ms", type=click.FloatRange(1, 60_000), default=250, show_default=True,
                     help="Deadline of one request; past it the input finishes here."),
        click.option("--offload-margin", type=click.FloatRange(0, 10), default=0.1, show_default=True,
                     help="Offload while the expected round trip < local cost of the rest x (1 + margin)."),
        click.option("--offload-always", is_flag=True,
                     help="Send every undecided input, whatever the costs (still backs off from a failing server)."),
    ]):
        f = option(f)
    return f


def offload_kwargs(bundle: Bundle, rule: Any, offload_url: str | None, offload_after: int | None,
                   offload_token_file: str | None, offload_ca: str | None, offload_timeout_ms: float,
                   offload_margin: float, offload_always: bool, offload_cert: str | None = None,
                   offload_key: str | None = None) -> dict[str, Any]:
    """The Runner's offload arguments from the options above ({} without --offload). The policy starts from the
    bundle's stored exit costs when they were timed on this machine (else the Runner times the stages itself)."""
    if offload_url is None:
        if offload_after is not None or offload_token_file is not None or offload_ca is not None or \
                offload_cert is not None or offload_key is not None:
            raise UsageError("--offload-after, --offload-token-file, --offload-ca, --offload-cert and --offload-key "
                             "need --offload URL")
        return {}
    if offload_after is None:
        raise UsageError("--offload URL needs --offload-after K (the last stage run here)")
    for option, path in (("--offload-ca", offload_ca), ("--offload-cert", offload_cert),
                         ("--offload-key", offload_key)):
        if path is not None and not os.access(path, os.R_OK):
            raise UsageError(f"{option} {path}: no such readable file")
    if offload_key is not None and offload_cert is None:
        raise UsageError("--offload-key needs --offload-cert (the client certificate it belongs to)")
    from ..offload.client import OffloadPolicy
    from .serve import read_token

    policy = OffloadPolicy(margin=offload_margin, always=offload_always)
    policy.local_ms = stored_tail_ms(bundle, rule, offload_after)
    if policy.local_ms is not None:
        policy.local_from = "the bundle's exit costs (timed on this machine)"
    return {"offload": offload_url, "offload_after": offload_after, "offload_token": read_token(offload_token_file),
            "offload_ca": offload_ca, "offload_timeout_s": offload_timeout_ms / 1000.0, "offload_policy": policy,
            "offload_cert": offload_cert, "offload_key": offload_key}


def stored_tail_ms(bundle: Bundle, rule: Any, after: int) -> float | None:
    """The cost (ms) of the stages after ``after`` from the bundle's exit-cost table (``tune``), under the rule's
    kind (or forced exits): the latency of leaving at the last exit less that of leaving at ``after``. None when
    the table is missing, malformed or was timed on another machine."""
    from ..bench.timing import ExitCostTable, timed_elsewhere

    manifest = bundle.manifest
    stored = manifest.operating_points.exit_costs
    if not stored or timed_elsewhere(stored) is not None:
        return None
    if isinstance(rule, str):
        rule = manifest.point_rule(rule)
    kind = getattr(rule, "kind", None) or manifest.exit_rule.kind
    try:
        table = ExitCostTable.from_dict(stored)
        lat = table.for_rule(kind if kind in table.latency_ms else "fixed")
    except EdgeExitError:
        return None
    if lat.shape[0] != manifest.num_exits or not 0 <= after < manifest.num_exits - 1:
        return None
    return max(float(lat[-1] - lat[after]), 0.0)


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
@FALLBACK
@click.option("--backend", type=Choice(["auto", *BACKENDS]), default="auto", show_default=True,
              help="TFLite interpreter package.")
@click.option("--threads", type=click.IntRange(min=1, max=MAX_THREADS), default=1, show_default=True,
              help="Interpreter threads.")
@click.option("--board", type=Choice(["auto", *BOARDS]), default="auto", show_default=True,
              help="Board power profile for energy estimates.")
@click.option("--edgetpu", is_flag=True, help="Run through the Edge TPU delegate (libedgetpu.so.1).")
@click.option("--resize", is_flag=True,
              help="Convert images of another size or colour mode to the bundle's with Pillow (bilinear, aspect "
                   "ratio not kept) instead of refusing them, as `bench --resize` does.")
@click.option("--keep-going", is_flag=True,
              help="Go on past an input that cannot be classified (one error line for it); exit non-zero at the end.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input (JSON Lines).")
@TRUSTED_KEY
@offload_options
def run(bundle: str, inputs: tuple[str, ...], rule: str | None, thresholds: str | None, exit_index: int | None,
        fallback: str | None, backend: str, threads: int, board: str, edgetpu: bool, resize: bool, keep_going: bool,
        as_json: bool, trusted_key: str | None, **offload: Any) -> None:
    """Classify image files with BUNDLE: label, score, exit, MACs, latency and energy per input.

    Images must have the bundle's size and colour mode unless --resize is given (the same policy as `bench`).
    """
    from ..runtime.runner import Runner

    loaded = load_bundle(bundle, backend=backend, check_tensors=False, trusted_key=trusted_key)
    chosen = _build_rule(loaded, rule, _parse_thresholds(thresholds), exit_index, fallback)
    runner = Runner(loaded, backend=backend, num_threads=threads, rule=chosen, board=board, edgetpu=edgetpu,
                    **offload_kwargs(loaded, chosen, **offload))
    prep = loaded.manifest.preprocessing
    table = None if as_json else _RunTable(runner, inputs)
    failed: EdgeExitError | None = None
    resized = 0
    for path in inputs:
        try:
            mismatch = image_mismatch(path, prep.size, prep.color_mode)
            if mismatch is not None and not resize:
                raise InputError(f"{printable(path)}: image is {mismatch}; pass --resize to convert it with Pillow "
                                 "(bilinear), or give images of the bundle's size")
            resized += mismatch is not None
            r = runner.classify(path)
        except EdgeExitError as exc:
            if not keep_going:
                raise
            click.echo(f"error: {printable(exc, 1000)}", err=True)
            failed = failed or exc
            continue
        if as_json:
            click.echo(json.dumps({"file": path, **r.to_dict()}))
        else:
            click.echo(table.row(path, r))
    if resized:
        click.echo(f"note: {resized} of {len(inputs)} image(s) converted to {prep.size[1]}x{prep.size[0]} "
                   f"{prep.color_mode} (--resize)", err=True)
    if failed is not None:
        sys.exit(failed.exit_code)


class _RunTable:
    """`run`'s human output: a header, then one aligned row per input (widths known before the first row)."""

    def __init__(self, runner: Any, inputs: Sequence[str]):
        manifest = runner.manifest
        self.n = runner.num_exits
        self.board = runner.board.name
        self.fw = min(max([len("file"), *(len(printable(p)) for p in inputs)]), 60)
        self.lw = min(max([len("label"), *(len(printable(label)) for label in manifest.labels)]), 30)
        # the exit's score of the predicted class: a softmax probability, or a per-class sigmoid
        kinds = {s.scores for s in manifest.stages}
        self.score_name = {frozenset({"softmax"}): "p(label)", frozenset({"sigmoid"}): "sigmoid"}.get(
            frozenset(kinds), "score")
        self.header_done = False

    def row(self, path: str, r: Any) -> str:
        cells = [printable(path).ljust(self.fw), printable(r.label_name).ljust(self.lw),
                 f"{r.score:.3f}".rjust(len(self.score_name)), f"{r.exit_index}".rjust(len(f"exit (0..{self.n - 1})")),
                 f"{r.macs:,}".rjust(12), f"{r.latency_ms:.3f}".rjust(9),
                 f"{r.energy.board_estimate_mj:.4f}".rjust(len(f"mJ ({self.board})"))]
        if r.energy.measured_mj is not None:
            cells.append(f"{r.energy.measured_mj:.4f}".rjust(11))
        if r.offloaded:
            cells.append(f"server ({r.round_trip_ms:.2f} ms round trip)")
        elif r.offload_error:
            cells.append(f"here: {printable(r.offload_error, 200)}")
        line = "  ".join(cells).rstrip()
        if not self.header_done:
            self.header_done = True
            head = ["file".ljust(self.fw), "label".ljust(self.lw), self.score_name, f"exit (0..{self.n - 1})",
                    "MACs".rjust(12), "ms".rjust(9), f"mJ ({self.board})"]
            if r.energy.measured_mj is not None:
                head.append("measured mJ")
            line = "  ".join(head).rstrip() + "\n" + line
        return line


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
            "exit_rule": m.exit_rule.to_dict(),
            "monolithic": None if m.monolithic is None else {"file": m.monolithic.file, "macs": m.monolithic.macs},
            "verification": dict(m.verification), "operating_points": m.operating_points.to_dict(),
            "training": dict(m.training), "edgetpu": dict(m.edgetpu), "precision": dict(m.precision),
            "checked_with": b.backend,
            "signature": _signature_state(b)}


def _precision_lines(section: dict[str, Any]) -> list[str]:
    """"precision: mixed (convert --precision auto): stage_0 int8, stage_1 mixed (2 ops float32: a, b), ..."""
    units = section.get("units") or {}
    if not units:
        return []
    parts = []
    for unit, entry in units.items():
        layers = entry.get("float_layers") or []
        kind = entry.get("kind", "?")
        parts.append(f"{unit} {kind}" + (f" ({len(layers)} ops float32: {', '.join(map(str, layers[:3]))}"
                                         f"{' ...' if len(layers) > 3 else ''})" if kind != "int8" else ""))
    return [f"precision {section.get('mode', '?')} (int8 inputs and outputs; float32 inside where listed): "
            + "; ".join(parts)]


def _signature_state(b: Bundle) -> str:
    from ..runtime.signing import SIGNATURE_FILE

    if b.signed_by:
        return f"verified: signed by the trusted key {b.signed_by}"
    if (b.path / SIGNATURE_FILE).exists():
        return f"{SIGNATURE_FILE} present, not verified (pass --trusted-key PUBLIC.pem to require it)"
    return "none (the sha256 values catch accidental damage only; see `edgeexit sign`)"


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--backend", type=Choice(["auto", *BACKENDS]), default="auto", show_default=True,
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
    out.append(f"exit rule {rule['kind']}"
               + (f" thresholds {', '.join(_sig(t) for t in rule['thresholds'])}" if rule["thresholds"] else "")
               + (f" exit {rule['exit']}" if rule["exit"] is not None else "")
               + (f" fallback {rule['fallback']} (inputs no early exit stops run every stage)"
                  if rule.get("fallback", "final") != "final" else ""))
    if d["monolithic"]:
        out.append(f"monolithic {d['monolithic']['file']} ({d['monolithic']['macs']:,} MACs)")
    out += _precision_lines(d["precision"])
    out += _or_raw(_verification_lines, d["verification"], "verification")
    out += _or_raw(_points_lines, loaded.manifest.operating_points, "operating points")
    out += _training_lines(d["training"])
    out += _mapping_lines("edgetpu", d["edgetpu"])
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


def _promise(g: Any) -> str:
    """What a stored point promises on new data (written by ``edgeexit tune``)."""
    if not isinstance(g, Mapping) or g.get("holds_with_probability") is None:
        return "no guarantee (a point estimate on the tuning images; re-tune with --risk 0.05 for one)"
    return (f"guaranteed {g.get('statement')} on new data with probability >= "
            f"{100 * float(g['holds_with_probability']):.4g} % (tested on {g.get('calibration_images')} images; "
            "assumes inputs like the tuning images)")


def _points_lines(points: OperatingPoints) -> list[str]:
    """Named operating points and the stored front, one row each (exit shares from exit 0)."""
    if not points:
        return ["operating points: none (create them with `edgeexit tune`)"]
    rows = []
    for name, p in points.named.items():
        m = p.metrics
        thresholds = ",".join(f"{t:.4g}" for t in p.rule.get("thresholds", ()))
        shares = " ".join(f"{100 * f:.0f}" for f in m.exit_fractions) if m is not None else "-"
        kind = str(p.rule.get("kind", "?"))
        if p.rule.get("fallback", "final") != "final":
            kind += f" ({p.rule['fallback']})"
        rows.append([name, kind, thresholds, _pct(m and m.accuracy),
                     _pct(m and m.avg_macs_fraction), _num(m and m.est_latency_ms, ".3f"), shares,
                     f"{p.data} (n={p.n})" if p.data else "-"])
    out = ["operating points:"] + _table(["name", "rule", "thresholds", "accuracy", "MACs", "est. ms",
                                          "exit shares % (0..)", "tuned on"], rows)
    out += [f"  {name}: {_promise(p.extra.get('guarantee'))}" for name, p in points.named.items()
            if p.metrics is not None and name != "original"]
    if points.front:
        lo, hi = points.front[0], points.front[-1]
        out.append(f"  front: {len(points.front)} points, {points.front[0].rule}; accuracy {_pct(lo.accuracy)} at "
                   f"{_pct(lo.avg_macs_fraction)} MACs .. {_pct(hi.accuracy)} at {_pct(hi.avg_macs_fraction)} MACs")
    if points.exit_costs is not None:
        costs = points.exit_costs
        timed = costs.get("latency_ms") or {}
        where = costs.get("machine") or "an unrecorded machine"
        flags = costs.get("int8_features")
        out.append(f"  exit costs: {', '.join(timed) or 'no latency'} timed on {where}"
                   + (f" [int8 features: {' '.join(flags) or 'none'}]" if isinstance(flags, list) else ""))
        warning = _elsewhere(costs)
        if warning:
            out.append(f"  warning: {warning}")
    out += [f"  unreadable entry: {k}" for k in points.unreadable]
    return out


def _elsewhere(costs: Mapping[str, Any]) -> str | None:
    from ..bench.timing import timed_elsewhere

    return timed_elsewhere(costs)


def _sig(v: Any, digits: int = 4) -> str:
    """A number to ``digits`` significant digits (thresholds, losses); anything else as it is."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _flat(prefix: str, v: Any) -> list[tuple[str, Any]]:
    """Nested mappings as (dotted key, value) pairs."""
    if isinstance(v, Mapping) and v:
        return [kv for k, sub in v.items() for kv in _flat(f"{prefix}.{k}" if prefix else str(k), sub)]
    return [(prefix, v)]


def _training_lines(d: Mapping[str, Any], rows: int = 6) -> list[str]:
    """How the network was trained: scalars as ``key  value`` (4 significant digits), a history (a list of
    per-epoch records) as a short table (first and last epochs), other lists compactly."""
    if not d:
        return ["training: none"]
    out, tables = ["training:"], []
    pairs = _flat("", d)
    width = max(len(k) for k, v in pairs if not _is_records(v)) if any(not _is_records(v) for _, v in pairs) else 0
    for key, value in pairs:
        if _is_records(value):
            tables.append((key, value))
        elif isinstance(value, (list, tuple)):
            out.append(f"  {key:<{width}}  [{', '.join(_sig(x) for x in value[:12])}{', ...' if len(value) > 12 else ''}]")
        else:
            out.append(f"  {key:<{width}}  {_sig(value)}")
    for key, records in tables:
        cols = list(dict.fromkeys(k for r in records for k in r))
        shown = records if len(records) <= rows else [*records[: rows // 2], None, *records[-(rows // 2):]]
        body = [["..."] + [""] * (len(cols) - 1) if r is None else [_sig(r.get(c, "-")) for c in cols] for r in shown]
        out.append(f"  {key} ({len(records)} rows):")
        out += _table(cols, body, indent="    ")
    return out


def _is_records(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(r, Mapping) for r in v)


def _mapping_lines(title: str, d: Mapping[str, Any]) -> list[str]:
    """A flat ``key: value`` list; nested values as compact JSON."""
    if not d:
        return [f"{title}: none"]
    width = max(len(str(k)) for k in d)
    return [f"{title}:"] + [f"  {str(k):<{width}}  {v if isinstance(v, (str, int, float)) else json.dumps(v, default=str)}"
                            for k, v in d.items()]


__all__ = ["run", "info"]
