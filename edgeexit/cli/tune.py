"""``edgeexit tune``: search per-exit thresholds on a validation set and store the operating points."""

from __future__ import annotations

import json

import click

from ..energy import BOARDS, KIND_LABELS, KINDS
from ..progress import StderrProgress
from .options import Choice
from ..runtime.interpreter import BACKENDS
from ..runtime.manifest import FALLBACKS
from ..tuning.evaluate import TUNABLE_RULES
from ..tuning.guarantee import DEFAULT_RISK
from ..tuning.results import Target, TuneResult
from ..tuning.search import DEFAULT_LEVELS
from ..tuning.tune import DEFAULT_COST_IMAGES, tune_bundle


def _summary(result: TuneResult, name: str, dry_run: bool) -> str:
    c = result.chosen
    kind = KIND_LABELS[result.exit_costs.energy_kind] if result.exit_costs is not None else "energy"
    energy = f", {c.energy_mj:.4g} mJ ({kind})" if c.energy_mj is not None else ""
    where = ("not written (--dry-run)" if dry_run else
             f"stored as operating point '{name}' and set as the bundle's default exit rule")
    g = result.guarantee
    promise = (f"  guaranteed      {g.describe()}" if g is not None else
               "  guaranteed      nothing: a point estimate on the tuning images (--risk 1); new data may miss "
               "the target")
    fallback = "" if c.fallback == "final" else f" (fallback {c.fallback}: inputs no early exit stops run every stage)"
    lines = [f"tuned {c.rule}{fallback} on {result.n} images of {result.data} for {result.target.describe()}: {where}",
             promise,
             f"  thresholds      {', '.join(f'{t:.6g}' for t in c.thresholds)}",
             f"  accuracy        {100 * c.accuracy:.2f}% on the tuning images (final exit alone: "
             f"{100 * result.final_accuracy:.2f}%)" + (f"; bound at {100 * (1 - g.risk):.4g}%: {g.bound:.3g} "
                                                       f"{g.bound_unit}" if g is not None else ""),
             f"  average cost    {100 * c.avg_macs_fraction:.1f}% of the full MACs, {c.est_latency_ms:.4g} ms "
             f"estimated{energy}",
             f"  exits           {', '.join(f'{100 * f:.1f}%' for f in c.exit_fractions)}"]
    if result.reference is not None:
        r = result.reference
        kept = " (kept: no cheaper point is as accurate)" if c is r else ""
        lines.append(f"  reference       '{result.reference_name}' {r.rule} "
                     f"{', '.join(f'{t:.6g}' for t in r.thresholds)}: {100 * r.accuracy:.2f}% at "
                     f"{100 * r.avg_macs_fraction:.1f}% of the MACs (margin {result.margin_pp:.3g} pp){kept}")
    lines.append(f"  front           {len(result.front)} points, searched in {result.search_s:.2f} s "
                 f"({result.evaluated} threshold vectors)")
    return "\n".join(lines)


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--data", required=True, metavar="VALIDATION",
              help="Labelled validation set: mnist, fashion-mnist, cifar10:DIR, svhn:DIR, PATH.npz or an image folder.")
@click.option("--split", type=Choice(["train", "test"]), default="test", show_default=True,
              help="Split of a named dataset.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N images.")
@click.option("--rule", type=Choice([*TUNABLE_RULES, "any"]), default=None,
              help="Rule to tune (default: the bundle's own rule if tunable, else max_softmax); 'any' searches "
                   "every rule and keeps the best for the target.")
@click.option("--fallback", type=Choice(FALLBACKS), default="final", show_default=True,
              help="What an input no early exit stops answers: the final exit, or the exit with the highest score "
                   "under the rule (most_confident; the input still runs every stage). Not with class_exclusion.")
@click.option("--max-drop", type=float, default=None, metavar="PP",
              help="Cheapest point within PP percentage points of the final exit's accuracy (default 0.5).")
@click.option("--no-worse-than", default=None, metavar="POINT",
              help="Cheapest point at least as accurate as POINT on the same data: 'current' (the bundle's exit "
                   "rule) or a stored operating point such as 'original'.")
@click.option("--min-accuracy", type=float, default=None, metavar="PERCENT",
              help="Cheapest point whose accuracy is at least PERCENT (e.g. 98.5).")
@click.option("--margin", type=float, default=None, metavar="PP",
              help="With --no-worse-than: beat the reference by PP percentage points (default 0 with a guarantee; "
                   "with --risk 1, one standard error of the reference's accuracy on the tuning data).")
@click.option("--risk", type=float, default=DEFAULT_RISK, show_default=True, metavar="P",
              help="The target (accuracy or budget) holds on new data from the tuning distribution with probability "
                   ">= 1 - P: the front is searched on one random half of the images and its points are tested on "
                   "the other (Learn then Test). 1: the point estimate on the tuning images, no guarantee.")
@click.option("--minimize", type=Choice(["latency", "macs", "energy"]), default="latency", show_default=True,
              help="With an accuracy target (--max-drop, --no-worse-than): the cost to minimize; latency is the "
                   "whole call, estimated from exit costs timed on this device.")
@click.option("--budget-macs", type=float, default=None, metavar="FRACTION",
              help="Most accurate point with average MACs <= FRACTION of the full network.")
@click.option("--budget-latency-ms", type=float, default=None, metavar="MS",
              help="Most accurate point with estimated mean whole-call latency <= MS (estimated from the exit costs "
                   "timed on this device).")
@click.option("--budget-energy-mj", type=float, default=None, metavar="MJ",
              help="Most accurate point with average energy <= MJ per input, of --energy-kind.")
@click.option("--energy-kind", type=Choice(KINDS), default=None,
              help="Energy of the budget and the stored front: measured (stored in the bundle by `bench "
                   "--store-energy` for this board), board_estimate or proxy (default: measured if the bundle has "
                   "it, else proxy).")
@click.option("--board", type=Choice(["auto", *BOARDS]), default="auto", show_default=True,
              help="Board whose energy figures are used.")
@click.option("--name", default="tuned", show_default=True, help="Name of the stored operating point.")
@click.option("--force", is_flag=True, help="Replace an operating point already stored under --name.")
@click.option("--levels", type=click.IntRange(min=1), default=DEFAULT_LEVELS, show_default=True,
              help="Candidate thresholds per exit (quantiles of each exit's score).")
@click.option("--backend", type=Choice(["auto", *BACKENDS]), default="auto", show_default=True,
              help="TFLite interpreter package.")
@click.option("--cost-images", type=click.IntRange(min=0, max=1_000_000), default=DEFAULT_COST_IMAGES,
              show_default=True, help="Images that time each exit's whole-call cost on this device (0: no latency "
                                      "estimates). Costs an earlier tune timed on this machine and stored in "
                                      "the bundle are used again.")
@click.option("--retime", is_flag=True, help="Time the exit costs again even when the bundle holds costs timed on "
                                             "this machine.")
@click.option("--dry-run", is_flag=True, help="Search and report; do not change the bundle.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (chosen point and front) as JSON.")
@click.pass_context
def tune(ctx: click.Context, bundle: str, data: str, split: str, limit: int | None, rule: str | None,
         max_drop: float | None, no_worse_than: str | None, min_accuracy: float | None, margin: float | None,
         risk: float, minimize: str, budget_macs: float | None,
         budget_latency_ms: float | None, budget_energy_mj: float | None, energy_kind: str | None, board: str,
         name: str, force: bool, levels: int, backend: str, cost_images: int, retime: bool, dry_run: bool,
         as_json: bool, fallback: str) -> None:
    """Search per-exit thresholds of BUNDLE for an accuracy or budget target and store the trade-off front.

    By default the target holds on new data with probability >= 95 % (--risk 0.05)."""
    if (max_drop is None and no_worse_than is None and min_accuracy is None and budget_macs is None
            and budget_latency_ms is None and budget_energy_mj is None):
        max_drop = 0.5
    if min_accuracy is not None and not 0 <= min_accuracy <= 100:
        raise click.BadParameter(f"{min_accuracy:g} is not a percentage in [0, 100]", param_hint="--min-accuracy")
    target = Target(max_drop_pp=max_drop, no_worse_than=no_worse_than, budget_macs=budget_macs,
                    budget_latency_ms=budget_latency_ms, budget_energy_mj=budget_energy_mj, minimize=minimize,
                    energy_kind=energy_kind, min_accuracy=None if min_accuracy is None else min_accuracy / 100.0)
    quiet = bool((ctx.find_root().obj or {}).get("quiet"))
    progress = StderrProgress(not quiet and not as_json, {"trace": "tracing (every stage)",
                                                           "exit costs": "timing the exit costs on this device"})
    result = tune_bundle(bundle, data, target, rule=rule, name=name, split=split, limit=limit, dry_run=dry_run,
                         levels=levels, backend=backend, margin_pp=margin, progress=progress,
                         cost_images=cost_images, board=board, risk=risk, force=force, retime=retime,
                         fallback=fallback)
    if as_json:
        click.echo(json.dumps({"name": name, "written": not dry_run, **result.to_dict()}))
    else:
        click.echo(_summary(result, name, dry_run))
