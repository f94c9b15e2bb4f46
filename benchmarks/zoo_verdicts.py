"""The conversion's verification on the realistic networks: the verdict each bundle got when it was converted
(the earlier check) and the verdict of the current check, plus deliberately broken conversions of the same
bundles (a stage file that declares its input at twice, or half, the scale its layers compute with).

For every row bundle of ``zoo_methods.py`` (``runs/zoo/*-bundle`` with its model checkpoint), on the same 1,000
validation images the conversion used::

    python benchmarks/zoo_verdicts.py [--dataset fashion-mnist]

Writes ``benchmarks/results/zoo/verdicts_<dataset>.json``: per bundle the earlier verdict and failures (recorded
at conversion), the current verdict, failed tolerances and the measured figures behind them, the broken copies'
verdicts and figures, and the command that measured the row (``--bundles GLOB`` re-measures those rows only and
keeps the others).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import common  # noqa: E402
from common import RESULTS, ROOT  # noqa: E402

from edgeexit.runtime.atomic import write_file_atomic  # noqa: E402
from edgeexit.runtime.bundle import read_manifest  # noqa: E402
from edgeexit.workstation.conversion.pipeline import verify_bundle  # noqa: E402
from edgeexit.workstation.conversion.verify import Tolerances  # noqa: E402
from edgeexit.workstation.catalog.checkpoint import load_checkpoint  # noqa: E402
from test_verify import tamper_input_scale  # noqa: E402  (the tests' exact tampering of a stage file)

RUNS = ROOT / "runs" / "zoo"


def checkpoint_of(bundle: Path, dataset: str) -> Path:
    """runs/zoo/<dataset>-eenet-resnet20[-spatial]-lam1-bundle -> ...-warmup3-lam1.pt; others: the same stem
    (without "-int16")."""
    stem = bundle.name[: -len("-bundle")].removesuffix("-int16")  # an int16-activation bundle of the same model
    if "-eenet-" in stem:
        head, lam = stem.rsplit("-lam", 1)
        matches = sorted(RUNS.glob(f"{head}-warmup*-lam{lam}.pt"))
        return matches[0]
    return RUNS / f"{stem}.pt"


def verdict(model: Any, bundle: Path, splits: common.Splits, stage_files: list[Path] | None = None) -> dict[str, Any]:
    _, manifest = read_manifest(bundle)
    stages = stage_files or [bundle / s.file for s in manifest.stages]
    mono = bundle / "monolithic.tflite"
    report = verify_bundle(model, stages, mono if mono.is_file() else None, splits.val.images, splits.val.labels,
                           manifest.exit_rule, Tolerances())
    d = report.to_dict()
    return {"passed": report.passed, "failed_tolerances": list(report.failed_tolerances),
            "failures": list(report.failures), "report": d}


def figures(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per exit, the figures the tolerances judge (for a broken copy: how far it moved, pass or fail)."""
    return [{"exit": e["exit"], "logit_error": round(e["logit_error"], 5),
             "top1_agreement_clear": e["top1_agreement_clear"], "decision_agreement": e["decision_agreement"],
             "accuracy_drop_pp": e["accuracy_drop"]["pp"]} for e in report["exits"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bundles", default="*", help="glob after '<dataset>-' (default: every bundle)")
    args = ap.parse_args()
    common.setup(args.threads)
    splits = common.load_splits(args.dataset, None)
    rows = []
    for bundle in sorted(RUNS.glob(f"{args.dataset}-{args.bundles}-bundle")):
        record_path = bundle.with_name(bundle.name + ".convert.json")
        earlier = json.loads(record_path.read_text()) if record_path.is_file() else {}
        model = load_checkpoint(checkpoint_of(bundle, args.dataset))
        row: dict[str, Any] = {"bundle": bundle.name,
                               "earlier": {"passed": earlier.get("verification_passed"),
                                           "failures": earlier.get("verification_failures")},
                               "current": verdict(model, bundle, splits)}
        _, manifest = read_manifest(bundle)
        broken = {}
        with tempfile.TemporaryDirectory() as tmp:
            files = [bundle / s.file for s in manifest.stages]
            for factor in (2.0, 0.5):
                for k in range(len(files) - 1, 0, -1):  # the last stage whose input feeds an op the tampering knows
                    tampered = Path(tmp) / f"x{factor:g}_{files[k].name}"
                    try:
                        tamper_input_scale(files[k], tampered, factor)
                    except AssertionError:
                        continue
                    v = verdict(model, bundle, splits, files[:k] + [tampered] + files[k + 1:])
                    broken[f"stage {k} input scale x{factor:g}"] = {
                        **{key: v[key] for key in ("passed", "failed_tolerances", "failures")},
                        "figures": figures(v["report"])}
                    break
        row["broken"] = broken
        rows.append(row)
        print(json.dumps({"bundle": bundle.name, "earlier": row["earlier"]["passed"],
                          "current": row["current"]["passed"], "current_failed": row["current"]["failed_tolerances"],
                          "broken": {k: v["passed"] for k, v in broken.items()}}), flush=True)
    out = RESULTS / "zoo" / f"verdicts_{args.dataset}.json"
    command = " ".join(sys.argv)
    if out.is_file() and args.bundles != "*":  # a subset: replace those rows, keep the others with their command
        old = json.loads(out.read_text())
        done = {r["bundle"] for r in rows}
        for r in old["rows"]:
            r.setdefault("command", old.get("command"))
        rows = sorted([r for r in old["rows"] if r["bundle"] not in done] + [{**r, "command": command} for r in rows],
                      key=lambda r: r["bundle"])
    else:
        rows = [{**r, "command": command} for r in rows]
    write_file_atomic(out, json.dumps({"verification_images": len(splits.val.labels), "rows": rows}, indent=2,
                                      default=str) + "\n")
    print(out)


if __name__ == "__main__":
    main()
