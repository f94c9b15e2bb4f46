"""The three methods on the realistic backbones, int8 on the device path, against their papers' claims.

Rows (``--rows``, comma-separated; default every row whose backbone has been trained by zoo_train.py):

* ``eenet-resnet20``: EENet. A CIFAR-style ResNet-20 with 3 early exits (pareto placement, pooled EENet heads),
  its trunk initialised from the trained ResNet-20 of zoo_train.py, then trained jointly (trunk and exits): a
  warm-up with every exit's cross-entropy (loss v0), then the cost-aware loss v2 for each lambda of
  ``--lambdas`` from the same warm-up weights; the lambda is chosen on the tuning half.
* ``pteenet-<net>``: PTEENet. The frozen backbone ``runs/zoo/<dataset>-<net>.pt`` (zoo_train.py) with 3 branches
  (``--branch``, pareto placement), only the branches trained (v0 warm-up, then v2); checked bit-identical.
* ``classexit-<net>``: class-based early exit: per-class sigmoid exits on the same frozen backbone, class loss,
  class-exclusion rule.

Every row is converted to an int8 bundle with the monolithic baseline and verified against torch; a bundle whose
verification failed is refused (``--allow-unverified`` runs it and says so in the result). The test set is cut
in two interleaved halves: per-exit thresholds (or betas) are tuned on ``test[0::2]`` for the row's accuracy
target (at most the row's drop in percentage points below the bundle's own int8 final exit, fewest MACs) with
the guarantee of ``edgeexit tune`` (``--risk``, default 0.05: Learn then Test, the target holds on new data with
probability at least 95 %; see edgeexit/tuning/guarantee.py), and everything is reported on ``test[1::2]``:
float backbone, int8 monolithic, int8 final exit, the guaranteed point's accuracy and average MACs, whether the
drop target held there, the point estimate's (``--risk 1``, tuned to the limit) held-out result beside it (the
price of the guarantee), and the whole-call latency of ``Runner.classify`` at the guaranteed point against
``Runner.run_monolithic`` (the benchmark harness of edgeexit/bench/timing.py: image array in -> result out,
interleaved, per-input medians).

Usage::

    python benchmarks/zoo_methods.py --dataset fashion-mnist [--rows eenet-resnet20,pteenet-resnet20,...]

Writes ``benchmarks/results/zoo/methods_<dataset>_<row>.json`` per row and ``benchmarks/results/zoo/
methods_<dataset>.md`` (the table of every row written so far). Trained models and bundles are kept under
``runs/zoo/``; a row whose model exists is not trained again (training is resumable: see zoo_train.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import INPUT_SHAPE, MEAN, RESULTS, ROOT, STD  # noqa: E402
from verified import add_option, require_verified  # noqa: E402
from zoo_train import RECIPES  # noqa: E402

from edgeexit.bench.bench import BenchSettings, run_benchmark  # noqa: E402
from edgeexit.datasets import ImageSet  # noqa: E402
from edgeexit.errors import TuningError, UsageError  # noqa: E402
from edgeexit.runtime.atomic import write_file_atomic  # noqa: E402
from edgeexit.runtime.manifest import ExitRuleSpec  # noqa: E402
from edgeexit.runtime.runner import Runner  # noqa: E402
from edgeexit.tuning.evaluate import evaluate_rule, exit_costs  # noqa: E402
from edgeexit.tuning.guarantee import check_risk  # noqa: E402
from edgeexit.tuning.results import Target  # noqa: E402
from edgeexit.tuning.search import search_front, search_guaranteed  # noqa: E402
from edgeexit.tuning.store import rule_spec  # noqa: E402
from edgeexit.workstation.conversion.pipeline import convert  # noqa: E402
from edgeexit.workstation.posttrain.classexit import attach_class_exits, train_class_exits  # noqa: E402
from edgeexit.workstation.posttrain.pteenet import attach_branches, backbone_digest, train_branches  # noqa: E402
from edgeexit.workstation.models import zoo  # noqa: E402
from edgeexit.workstation.catalog.registry import create  # noqa: E402
from edgeexit.workstation.models.staged import MonolithicExport, StagedModel  # noqa: E402
from edgeexit.workstation.catalog.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from edgeexit.workstation.training.train import TrainConfig, evaluate, train  # noqa: E402

log = logging.getLogger("zoo_methods")
RUNS = ROOT / "runs" / "zoo"
OUT = RESULTS / "zoo"
NUM_EXITS = 4
#: the issue's targets per method: (max MACs fraction, max drop in pp below the row's reference)
TARGETS = {"eenet": (0.40, 0.5), "pteenet": (0.50, 1.0), "classexit": (None, 1.0)}
TARGET_MOBILENET = 0.60
#: the tuned drop target holds on new data with probability at least 1 - RISK (the tuner's default)
RISK = 0.05
#: what each method's paper claims, quoted beside the measured rows
CLAIMS = {
    "eenet": "EENets (Early-exit Convolutional Neural Networks, Demir et al.): similar accuracy to the network "
             "without exits at ~20-50 % of its cost (MNIST, CIFAR-10, SVHN, Tiny-ImageNet)",
    "pteenet": "PTEENet (Lahiany and Aperstein, arXiv 2501.02508): branches post-trained on a frozen backbone trade "
               "a small accuracy loss for a large cost cut, along a front set by the confidence thresholds",
    "classexit": "Class-based early exit (Early Classification for Dynamic Inference of Neural Networks, 2023): "
                 "excluding classes at intermediate exits reduces the inference cost 'significantly' "
                 "(the abstract gives no figure)",
}


# ------------------------------------------------------------------------------------------------- models

def trunk_from_backbone(model: StagedModel, backbone: StagedModel) -> None:
    """Start the EENet's trunk from the trained one-exit ResNet-20 of zoo_train.py (the same layers in the same
    order, cut into segments at other places); the exit heads start fresh. Raises if the layers differ."""
    src = [(k, v) for k, v in backbone.state_dict().items() if ".segment." in k]
    dst = [k for k in model.state_dict() if ".segment." in k]
    if len(src) != len(dst) or any(model.state_dict()[d].shape != v.shape for d, (_, v) in zip(dst, src)):
        raise SystemExit("error: the trained ResNet-20 and the EENet ResNet-20 trunks differ; retrain both")
    model.load_state_dict({d: v for d, (_, v) in zip(dst, src)}, strict=False)


def eenet_resnet20(dataset: str, splits: common.Splits, lam: float, warmup_epochs: int, epochs: int,
                   head: str = "pool") -> StagedModel:
    """EENet ResNet-20: warm-up (v0) once, then ``epochs`` of v2 at ``lam`` from the warm-up weights; cached."""
    stem = RUNS / (f"{dataset}-eenet-resnet20" + ("" if head == "pool" else f"-{head}"))
    warm = stem.with_name(stem.name + f"-warmup{warmup_epochs}.pt")
    if not warm.is_file():
        torch.manual_seed(0)
        model = create("resnet20", num_classes=len(splits.labels), exits=NUM_EXITS, placement="pareto", head=head,
                       input_shape=INPUT_SHAPE, labels=splits.labels, mean=MEAN, std=STD)
        trunk_from_backbone(model, load_checkpoint(RUNS / f"{dataset}-resnet20.pt"))
        cfg = TrainConfig(loss="v0", epochs=warmup_epochs, lr=3e-3, batch_size=128, augment_shift=2)
        res = train(model, splits.train, splits.val, cfg, state_path=warm.with_suffix(".state"))
        save_checkpoint(res.model, warm, {"history": res.history}, force=True)
    out = stem.with_name(stem.name + f"-warmup{warmup_epochs}-lam{lam:g}.pt")
    if out.is_file():
        return load_checkpoint(out)
    model = load_checkpoint(warm)
    cfg = TrainConfig(loss="v2", lam=lam, epochs=epochs, lr=1e-3, batch_size=128, augment_shift=2, seed=1)
    res = train(model, splits.train, splits.val, cfg, state_path=out.with_suffix(".state"))
    save_checkpoint(res.model, out, {"history": res.history}, force=True)
    return res.model


def frozen_backbone(dataset: str, net: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    path = RUNS / f"{dataset}-{net}.pt"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; train it first: python benchmarks/zoo_train.py "
                         f"--dataset {dataset} --net {net}")
    model = load_checkpoint(path)
    desc = model.spec.kwargs.get("backbone") if model.spec.builder == "pteenet" else None
    if not desc:  # an edgeexit network (ResNet-20/56): exits are placed among its blocks
        return MonolithicExport(model).eval(), {"spec": model.spec.to_dict()}
    # a zoo network: the module itself (torchvision names, so branches go after layer1, features.3, ...); the
    # checkpoint's segments are that module's own submodules, so loading them fills the module
    backbone = zoo.build_backbone(desc["arch"], **desc["options"])
    shell = attach_branches(backbone, INPUT_SHAPE, model.spec.labels, exits_after=[],
                            features_end=zoo.FEATURES_END[desc["arch"]], backbone_desc=desc)
    shell.load_state_dict(model.state_dict())
    x = model.example_input(2)
    if not torch.equal(backbone.eval()(x), model(x)[-1]["logits"]):
        raise SystemExit(f"error: the backbone rebuilt from {path} does not reproduce the checkpoint's outputs")
    return backbone.eval(), desc


def row_tag(method: str, net: str, args: argparse.Namespace) -> str:
    """The name of a post-trained row's model and bundle: method, backbone, branch kind and width."""
    kind = args.branch if method == "pteenet" else "class"
    return f"{method}-{net}-{kind}" + (str(args.hidden) if kind in ("spatial", "class") else "")


def post_trained(method: str, dataset: str, net: str, splits: common.Splits, args: argparse.Namespace
                 ) -> tuple[StagedModel, dict[str, Any]]:
    """PTEENet branches or class exits on the frozen backbone ``net``; cached in runs/zoo/."""
    path = RUNS / f"{dataset}-{row_tag(method, net, args)}.pt"
    if path.is_file():
        return load_checkpoint(path), {"cached": path.name}
    backbone, desc = frozen_backbone(dataset, net)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if method == "pteenet":
        whole_map = args.branch == "spatial"
        model = attach_branches(backbone, INPUT_SHAPE, splits.labels, num_exits=NUM_EXITS, placement="pareto",
                                branch=args.branch, hidden=args.hidden if whole_map else None, mean=MEAN, std=STD,
                                backbone_desc=desc)
        before = backbone_digest(model)
        cfg = TrainConfig(loss="two-stage", warmup_epochs=1, epochs=1 + args.branch_epochs, lam=args.lam, lr=3e-3,
                          batch_size=128, augment_shift=2)
        res = train_branches(model, splits.train, splits.val, cfg)
    else:
        model = attach_class_exits(backbone, INPUT_SHAPE, splits.labels, head="spatial", hidden=args.hidden,
                                   num_exits=NUM_EXITS,
                                   placement="pareto", mean=MEAN, std=STD, backbone_desc=desc)
        before = backbone_digest(model)
        res = train_class_exits(model, splits.train, splits.val, epochs=args.branch_epochs)
    info = {"backbone_unchanged": before == backbone_digest(res.model),
            "train_seconds": round(time.perf_counter() - t0, 1), "exits_after": res.model.spec.extra.get("exits_after")}
    save_checkpoint(res.model, path, info, force=True)
    return res.model, info


# ------------------------------------------------------------------------------------------------ int8 path

def bundle_of(model: StagedModel, name: str, splits: common.Splits, rule: str, activations: str = "int8"
              ) -> tuple[Path, dict[str, Any]]:
    """Convert (once) with the monolithic baseline and verification on 1,000 validation images."""
    bundle = RUNS / (f"{name}-bundle" if activations == "int8" else f"{name}-{activations}-bundle")
    record_path = bundle.with_name(bundle.name + ".convert.json")
    if (bundle / "manifest.json").is_file() and record_path.is_file():
        return bundle, json.loads(record_path.read_text())
    thresholds = [0.01 if rule == "class_exclusion" else 0.5] * (model.num_exits - 1)
    report = convert(model, common.calibration_images(splits.train), bundle, verify_images=splits.val.images,
                     verify_labels=splits.val.labels, exit_rule=rule, thresholds=thresholds, monolithic=True,
                     force=True, name=name, **({} if activations == "int8" else {"activations": activations}))
    ver = report.verification
    record = {"verification_passed": None if ver is None else bool(ver.passed),
              "verification_failures": [] if ver is None else list(ver.failures),
              "convert_seconds": round(report.seconds, 1)}
    record_path.write_text(json.dumps(record, indent=2))
    return bundle, record


def float_accuracy(model: StagedModel, data: ImageSet) -> dict[str, float]:
    s = evaluate(model, data)
    return {"final_exit": round(s.final_accuracy, 6), "exits": [round(a, 6) for a in s.exit_accuracy]}


def mono_accuracy(runner: Runner, data: ImageSet) -> float:
    labels = np.concatenate([runner.run_monolithic_batch(data.images[i:i + 256]).labels
                             for i in range(0, len(data.labels), 256)])
    return float(np.mean(labels == data.labels))


def latency(bundle: Path, spec: ExitRuleSpec, data: ImageSet, limit: int) -> dict[str, Any]:
    """Whole-call latency of the tuned point vs the monolithic model (one interleaved harness)."""
    sub = ImageSet(data.images[:limit], data.labels[:limit], data.classes, data.name)
    res = run_benchmark(bundle, sub, BenchSettings(rule=spec, sweep=False, points=False, batch_sizes=(1,)))
    ee, mono = res["overall"]["latency_ms"], res["monolithic"]["latency_ms"]
    return {"images": limit, "early_exit_ms": {k: ee[k] for k in ("mean", "p50", "p90")},
            "monolithic_ms": {k: mono[k] for k in ("mean", "p50", "p90")},
            "speedup_p50": round(mono["p50"] / ee["p50"], 3), "speedup_mean": round(mono["mean"] / ee["mean"], 3),
            "speedup_p90": round(mono["p90"] / ee["p90"], 3), "environment": res.get("environment")}


def halves(test: ImageSet) -> tuple[ImageSet, ImageSet]:
    """(tuning half test[0::2], held-out half test[1::2])."""
    return tuple(ImageSet(test.images[k::2], test.labels[k::2], test.classes, f"{test.name}[{k}::2]")  # type: ignore
                 for k in (0, 1))


def _tune_drop_pp(trace: Any, point: Any) -> float:
    """The final exit's accuracy minus the point's on ``trace`` (pp; the point's accuracy is on that trace)."""
    return round(100 * (common.exit_accuracies(trace)[-1] - point.accuracy), 3)


def tuned_point(runner: Runner, splits: common.Splits, rules: list[str], drop_pp: float, risk: float = RISK,
                tests: int = 1) -> dict[str, Any]:
    """Thresholds tuned on test[0::2] for each rule of ``rules`` (fewest MACs, accuracy drop at most ``drop_pp``
    below the int8 final exit); the rule whose point is cheapest there is reported on test[1::2]. (Interleaved
    halves: the two contiguous halves of these test sets differ in difficulty by more than the tolerances.)

    The point is *guaranteed* (``search_guaranteed``, Learn then Test): on the tuning half, the front is searched
    on one random part and its points tested on the other, so that the drop target holds on new data with
    probability at least ``1 - risk``. Each rule is tested at level ``risk / (len(rules) * tests)`` (``tests``:
    the number of trained candidates the row chooses among, e.g. EENet lambdas), so that choosing the cheapest
    rule and candidate afterwards keeps the guarantee (a union bound). The point estimate (``search_front``: the
    cheapest point within the target on the whole tuning half, risk 1) is reported beside it on the same held-out
    half: the difference in MACs is the price of the guarantee."""
    tune_set, held_set = halves(splits.test)
    tune = runner.trace(list(tune_set.images), tune_set.labels)
    held = runner.trace(list(held_set.images), held_set.labels)
    costs = exit_costs(runner.manifest)
    full = runner.manifest.full_macs
    final_held = common.exit_accuracies(held)[-1]
    target = Target(max_drop_pp=drop_pp, minimize="macs")
    delta = risk / (len(rules) * tests)

    def on_heldout(point: Any) -> tuple[ExitRuleSpec, dict[str, Any], float]:
        spec = rule_spec(point)
        p = evaluate_rule(held, spec, costs)
        return spec, common.point_record(p, full), round(100 * (final_held - p.accuracy), 3)

    guaranteed, refused = {}, {}
    for r in rules:
        try:
            guaranteed[r] = search_guaranteed(tune, costs, r, target, risk=risk, delta=delta)
        except TuningError as exc:  # no point of this rule's front could be guaranteed: said in the record
            refused[r] = str(exc)
    estimates = {r: search_front(tune, costs, r, target) for r in rules}
    est_rule = min(estimates, key=lambda r: estimates[r].chosen.avg_macs_fraction)
    est = estimates[est_rule].chosen
    _, est_held, est_drop = on_heldout(est)
    estimate = {"risk": 1, "rule": est_rule, "thresholds": [round(float(t), 6) for t in est.thresholds],
                "tune": common.point_record(est, full), "tune_drop_pp": _tune_drop_pp(tune, est),
                "heldout": est_held, "heldout_drop_pp": est_drop, "heldout_met": est_drop <= drop_pp}
    if guaranteed:
        rule = min(guaranteed, key=lambda r: guaranteed[r].chosen.avg_macs_fraction)  # cheapest on the TUNING half
        chosen, g = guaranteed[rule].chosen, guaranteed[rule].guarantee
        guarantee = {**g.to_dict(), "rule_level": delta, "rules_tested": len(rules), "candidates": tests,
                     "bound": round(g.bound, 4)}
    else:  # nothing could be guaranteed: every input runs to the final exit (drop 0 by construction)
        rule = "final"
        chosen = evaluate_rule(tune, ExitRuleSpec("final", ()), costs)
        guarantee = {"statement": f"no point could be guaranteed to keep the accuracy drop <= {drop_pp:g} pp at "
                                  f"risk {risk:g}; every input runs to the final exit", "risk": risk}
    spec, held_record, held_drop = on_heldout(chosen)
    return {"tune_images": len(tune_set.labels), "heldout_images": len(held.labels), "rule": rule,
            "tuning": "guaranteed", "guarantee": guarantee, "refused": refused,
            "rules_searched": {r: {**common.point_record(res.chosen, full), "bound_pp": round(res.guarantee.bound, 4)}
                               for r, res in guaranteed.items()},
            "thresholds": [round(float(t), 6) for t in spec.thresholds],
            "tune": common.point_record(chosen, full), "tune_drop_pp": _tune_drop_pp(tune, chosen),
            "heldout": held_record,
            "heldout_int8_exit_accuracy": [round(a, 6) for a in common.exit_accuracies(held)],
            "heldout_int8_final_exit": round(final_held, 6),
            "heldout_drop_pp": held_drop, "heldout_met": held_drop <= drop_pp,
            "point_estimate": estimate,
            "price_macs_fraction": round(held_record["avg_macs_fraction"] - est_held["avg_macs_fraction"], 6),
            "spec": spec}


# ----------------------------------------------------------------------------------------------------- rows

def run_row(row: str, dataset: str, splits: common.Splits, args: argparse.Namespace) -> dict[str, Any]:
    method, net = row.split("-", 1)
    held = halves(splits.test)[1]
    rule = "class_exclusion" if method == "classexit" else "confidence"  # the bundle's default rule
    # EENet / PTEENet exits have a confidence and class scores: the device can use any of the three rules on them
    rules = ["class_exclusion"] if method == "classexit" else ["confidence", "max_softmax", "entropy"]
    max_macs, drop = TARGETS[method]
    if method == "pteenet" and net == "mobilenet_v2":
        max_macs = TARGET_MOBILENET
    record: dict[str, Any] = {"row": row if args.activations == "int8" else f"{row}-{args.activations}",
                              "activations": args.activations, "dataset": dataset, "method": method, "backbone": net,
                              "recipe": RECIPES[net].note if net in RECIPES else None, "claim": CLAIMS[method],
                              "target": {"max_macs_fraction": max_macs, "max_drop_pp": drop,
                                         "drop_guaranteed_at_risk": args.risk}}
    candidates: list[tuple[dict[str, Any], StagedModel, Path, dict[str, Any]]] = []
    if method == "eenet":
        for lam in args.lambdas:
            model = eenet_resnet20(dataset, splits, lam, args.warmup_epochs, args.v2_epochs, args.eenet_head)
            tag = "" if args.eenet_head == "pool" else f"-{args.eenet_head}"
            bundle, conv = bundle_of(model, f"{dataset}-eenet-resnet20{tag}-lam{lam:g}", splits, rule,
                                     args.activations)
            candidates.append(({"lambda": lam}, model, bundle, conv))
        record["training"] = {"warmup_epochs_v0": args.warmup_epochs, "v2_epochs": args.v2_epochs,
                              "lambdas": args.lambdas, "heads": args.eenet_head}
        record["row"] = row = f"{row}-{args.eenet_head}" + ("" if args.activations == "int8" else
                                                            f"-{args.activations}")
    else:
        model, info = post_trained(method, dataset, net, splits, args)
        bundle, conv = bundle_of(model, f"{dataset}-{row_tag(method, net, args)}", splits, rule, args.activations)
        candidates.append(({"branch": args.branch if method == "pteenet" else f"class spatial {args.hidden}",
                            "branch_epochs": args.branch_epochs, **info}, model, bundle, conv))
    sweep = []
    for settings, model, bundle, conv in candidates:
        conv = {**conv, "verification": require_verified(bundle, args.allow_unverified)}  # the manifest's verdict
        runner = Runner(bundle, power_sensor=None)
        point = tuned_point(runner, splits, rules, drop, args.risk, tests=len(candidates))
        sweep.append((point["tune"]["avg_macs_fraction"], settings, model, bundle, conv, runner, point))
    sweep.sort(key=lambda s: s[0])  # the cheapest on the TUNING half meeting the drop target there
    _, settings, model, bundle, conv, runner, point = sweep[0]
    if len(sweep) > 1:
        record["lambda_sweep_on_tuning_half"] = [{**s[1], "tune": s[6]["tune"]} for s in sweep]
    spec = point.pop("spec")
    for s in sweep[1:]:
        s[6].pop("spec", None)
    fl = float_accuracy(model, held)
    mono = mono_accuracy(runner, held)
    lat = latency(bundle, spec, held, args.latency_images)
    macs = point["heldout"]["avg_macs_fraction"]
    record.update({
        "chosen": settings, "bundle": str(bundle), **conv,
        "full_macs": runner.manifest.full_macs,
        "bundle_cumulative_macs_fraction": [round(m / runner.manifest.full_macs, 6)
                                            for m in runner.manifest.cumulative_macs()],
        "heldout_float": fl, "heldout_int8_monolithic": round(mono, 6), "point": point, "latency": lat,
        "verdict": {"macs_fraction": macs, "macs_margin": None if max_macs is None else round(max_macs - macs, 4),
                    "drop_pp": point["heldout_drop_pp"], "drop_margin_pp": round(drop - point["heldout_drop_pp"], 3),
                    "met": (max_macs is None or macs <= max_macs) and point["heldout_drop_pp"] <= drop}})
    return record


def margin_text(r: dict[str, Any]) -> str:
    """"met (MACs 13.1 pts, loss 0.20 pp spare)" / "MISSED (loss by 0.02 pp)": by how much each target is beaten."""
    v, t = r["verdict"], r["target"]
    parts, missed = [], []
    if t["max_macs_fraction"] is not None:
        pts = 100 * v["macs_margin"]
        (parts if pts >= 0 else missed).append(f"MACs {abs(pts):.1f} pts")
    (parts if v["drop_margin_pp"] >= 0 else missed).append(f"loss {abs(v['drop_margin_pp']):.2f} pp")
    return (f"MISSED by {', '.join(missed)}" if missed else "met") + (f" ({', '.join(parts)} spare)" if parts else "")


def tuning_text(r: dict[str, Any]) -> str:
    """How the row's point was tuned: the guarantee (risk, calibration images, bound) or an older point estimate."""
    p = r["point"]
    g = p.get("guarantee")
    if p.get("tuning") != "guaranteed" or g is None:
        return "point estimate, tuned without the guarantee (older run)"
    if "calibration_images" not in g:
        return f"refused at risk {g['risk']:g}: final exit only"
    return (f"guaranteed at risk {g['risk']:g} ({g['calibration_images']:,} calibration / {g['search_images']:,} "
            f"search images, bound {g['bound']:.2f} pp)")


def estimate_text(r: dict[str, Any]) -> str:
    """The point estimate's (risk 1) held-out loss and MACs beside the guaranteed point: the price."""
    e = r["point"].get("point_estimate")
    if e is None:
        return "-"
    return (f"{e['heldout_drop_pp']:+.2f} pp, {100 * e['heldout']['avg_macs_fraction']:.1f} % "
            f"({'met' if e['heldout_met'] else 'MISSED'})")


def table(dataset: str) -> str:
    rows, claims = [], {}
    for path in sorted(OUT.glob(f"methods_{dataset}_*.json")):
        r = json.loads(path.read_text())
        p, lat = r["point"], r["latency"]
        claims[r["method"]] = CLAIMS.get(r["method"], r["claim"])
        target = (f"<= {100 * r['target']['max_macs_fraction']:.0f} % MACs, " if r["target"]["max_macs_fraction"]
                  else "") + f"<= {r['target']['max_drop_pp']:g} pp"
        act = r.get("activations", "int8")
        method = r["method"] + ("" if act == "int8" else f" ({act} activations)")
        rows.append(f"| {method} | {r['backbone']} | {100 * r['heldout_float']['final_exit']:.2f} | "
                    f"{100 * r['heldout_int8_monolithic']:.2f} | {100 * p['heldout_int8_final_exit']:.2f} | "
                    f"{100 * p['heldout']['accuracy']:.2f} | {p['heldout_drop_pp']:+.2f} | "
                    f"{100 * p['heldout']['avg_macs_fraction']:.1f} | {lat['speedup_p50']:.2f}x / "
                    f"{lat['speedup_p90']:.2f}x | {target}: {margin_text(r)} | {tuning_text(r)} | "
                    f"{estimate_text(r)} | {'passed' if r['verification_passed'] else 'FAILED'} | {path.name} |")
    head = (f"Held-out half of the {dataset} test set (test[1::2]); thresholds tuned on test[0::2]. Loss: the bundle's "
            "own int8 final exit minus the early exit. Speed-up: whole-call latency, int8 monolithic / early exit. "
            "Tuning: a guaranteed row's drop target holds on new data with probability at least 1 - risk (Learn then "
            "Test on the tuning half: front searched on one random part, points tested on the other; bound: the "
            "chosen point's upper confidence bound of its drop); a point-estimate row was tuned to the limit of the "
            "tuning half, without a guarantee. Point estimate: the risk-1 point of the same tuning half on the same "
            "held-out half (loss, MACs, target met or missed): the MACs between it and the guaranteed point are the "
            "price of the guarantee.\n\n"
            "| method | backbone | float % | int8 mono % | int8 final exit % | int8 early exit % | loss pp | "
            "MACs % | speed-up p50 / p90 | target (held out) | tuning | point estimate (risk 1): loss, MACs | "
            "verification | file |\n|" + "---|" * 14)
    # (rows with 16-bit activations: their "int8" columns are that bundle's int16-activation files)
    papers = "\n".join(f"- {m}: {c}" for m, c in sorted(claims.items()))
    return head + "\n" + "\n".join(rows) + "\n\nThe papers' claims beside these rows:\n\n" + papers + "\n"


def main() -> None:
    global RUNS, OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--rows", default=None, help="comma-separated rows (default: every row with a trained backbone)")
    ap.add_argument("--lambdas", default="0.05,0.2,0.5", help="EENet v2 lambdas to sweep")
    ap.add_argument("--warmup-epochs", type=int, default=15, help="EENet v0 warm-up epochs")
    ap.add_argument("--v2-epochs", type=int, default=3, help="EENet v2 epochs per lambda")
    ap.add_argument("--eenet-head", default="pool", help="EENet exit heads: pool (the paper's) or spatial (whole map)")
    ap.add_argument("--branch", default="spatial", help="PTEENet branch kind (spatial, conv1, conv2, pool, ...)")
    ap.add_argument("--hidden", type=int, default=16, help="width of a spatial branch")
    ap.add_argument("--branch-epochs", type=int, default=3, help="epochs of the branches after the warm-up epoch")
    ap.add_argument("--lam", type=float, default=0.05, help="PTEENet v2 lambda")
    ap.add_argument("--risk", type=float, default=RISK,
                    help="the drop target holds on new data with probability at least 1 - RISK (default 0.05)")
    ap.add_argument("--latency-images", type=int, default=2000)
    ap.add_argument("--activations", default="int8", choices=("int8", "int16"),
                    help="int16: 16-bit activations, 8-bit weights (the remedy where int8 loses too much)")
    add_option(ap)  # --allow-unverified
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-limit", type=int, default=None, help="only the first N training images (smoke runs)")
    ap.add_argument("--runs", default=str(RUNS), help="where models and bundles are kept")
    ap.add_argument("--out", default=str(OUT), help="where result files are written")
    ap.add_argument("--table-only", action="store_true", help="only rewrite methods_<dataset>.md from the results")
    args = ap.parse_args()
    args.lambdas = [float(v) for v in args.lambdas.split(",")]
    try:
        args.risk = check_risk(args.risk)
    except UsageError as exc:
        raise SystemExit(f"error: {exc}") from None
    common.setup(args.threads)
    RUNS, OUT = Path(args.runs).resolve(), Path(args.out).resolve()
    if args.table_only:
        write_file_atomic(OUT / f"methods_{args.dataset}.md", table(args.dataset))
        return
    splits = common.load_splits(args.dataset, args.train_limit)
    if args.rows:
        rows = args.rows.split(",")
    else:
        trained = [n for n in RECIPES if (RUNS / f"{args.dataset}-{n}.pt").is_file()]
        rows = ["eenet-resnet20"] + [f"pteenet-{n}" for n in trained] + \
            [f"classexit-{n}" for n in trained if n in ("resnet20", "mobilenet_v2")]
    OUT.mkdir(parents=True, exist_ok=True)
    for row in rows:
        t0 = time.perf_counter()
        record = run_row(row, args.dataset, splits, args)
        row = record["row"]
        record.update({"seconds": round(time.perf_counter() - t0, 1), "command": " ".join(sys.argv),
                       "torch": torch.__version__})
        path = OUT / f"methods_{args.dataset}_{row}.json"
        write_file_atomic(path, json.dumps(record, indent=2, default=str) + "\n")
        log.info("%s: %s", row, json.dumps(record["verdict"]))
    md = OUT / f"methods_{args.dataset}.md"
    write_file_atomic(md, table(args.dataset))
    print(md.read_text())


if __name__ == "__main__":
    main()
