"""int8 / 16x8 / float32 / mixed (auto) bundles of one trained network, side by side.

For a checkpoint (a realistic network from ``zoo_methods.py`` / ``zoo_train.py``, or any edgeexit checkpoint on
MNIST or Fashion-MNIST), each precision is converted once (kept in ``runs/zoo/<checkpoint>-<precision>-bundle``;
int8 and int16 reuse the ``zoo_methods.py`` bundles when present) with the calibration and verification images of
the zoo rows, then measured the way the zoo rows are:

* the conversion check's verdict and failed tolerances (1,000 validation images), and the precision each unit got;
* thresholds tuned on the test set's even images (guaranteed: the accuracy drop <= 1 pp below that bundle's final
  exit at risk 0.05, over confidence, max_softmax and entropy) and reported on its odd images: early-exit accuracy,
  its loss against the float network's final exit and against the float network under the same rule and
  thresholds (what the bundle's numerics cost at that point), average MACs;
* whole-call latency (image in, answer out; one interleaved harness) of that point and of the monolithic model,
  p50 and p90, on ``--latency-images`` held-out images, and the bundle's size::

    python benchmarks/precision.py --checkpoint runs/zoo/fashion-mnist-pteenet-mobilenet_v2-spatial16.pt \\
        --dataset fashion-mnist --precisions int8,int16,float32,auto

Writes ``benchmarks/results/precision_<checkpoint>.json`` (one record per precision; a run of some precisions
keeps the others' records).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import zoo_methods  # noqa: E402
from common import RESULTS, ROOT  # noqa: E402

from edgeexit.runtime.atomic import write_file_atomic  # noqa: E402
from edgeexit.runtime.runner import Runner  # noqa: E402
from edgeexit.workstation.catalog.checkpoint import load_checkpoint  # noqa: E402
from edgeexit.runtime.trace import Trace  # noqa: E402
from edgeexit.tuning.evaluate import evaluate_rule, exit_costs  # noqa: E402
from edgeexit.workstation.conversion.pipeline import convert  # noqa: E402
from edgeexit.workstation.conversion.verify import float_outputs  # noqa: E402

RUNS = ROOT / "runs" / "zoo"
RULES = ["confidence", "max_softmax", "entropy"]


def bundle_path(stem: str, precision: str) -> Path:
    if precision == "int8":
        return RUNS / f"{stem}-bundle"
    return RUNS / f"{stem}-{precision.replace('+', '-')}-bundle"


def converted(model: Any, stem: str, precision: str, splits: common.Splits) -> tuple[Path, dict[str, Any]]:
    """The bundle of ``precision`` (converted once; the conversion's record kept beside it)."""
    bundle = bundle_path(stem, precision)
    record_path = bundle.with_name(bundle.name + ".convert.json")
    if (bundle / "manifest.json").is_file() and record_path.is_file():
        return bundle, json.loads(record_path.read_text())
    thresholds = [0.5] * (model.num_exits - 1)
    kind, _, ranges = precision.partition("+")     # "int8+percentile": int8 with percentile calibration ranges
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = convert(model, common.calibration_images(splits.train), bundle, verify_images=splits.val.images,
                         verify_labels=splits.val.labels, exit_rule="confidence", thresholds=thresholds,
                         monolithic=True, force=True, name=stem, precision=kind,
                         calibration_range=ranges or "minmax")
    ver = report.verification
    record = {"verification_passed": bool(ver.passed), "verification_failures": list(ver.failures),
              "convert_seconds": round(report.seconds, 1),
              "precision": {k: v.to_dict() for k, v in report.precision.items()}}
    record_path.write_text(json.dumps(record, indent=2))
    return bundle, record


def float_at(model: Any, held: Any, spec: Any, manifest: Any) -> float:
    """The float torch network's held-out accuracy under the same exit rule and thresholds (the loss a bundle's
    numerics cause at its operating point, apart from what early exit itself costs)."""
    f = float_outputs(model, held.images)
    trace = Trace(logits=tuple(x.astype(np.float32) for x in f.logits),
                  confidence=tuple(None if c is None else c.astype(np.float32) for c in f.confidence),
                  scores=tuple(s.head.scores for s in model.stages), labels=np.asarray(held.labels))
    return float(evaluate_rule(trace, spec, exit_costs(manifest)).accuracy)


def bundle_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.glob("*.tflite"))


def measure(model: Any, stem: str, precision: str, splits: common.Splits, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    bundle, conv = converted(model, stem, precision, splits)
    runner = Runner(bundle, power_sensor=None)
    held = zoo_methods.halves(splits.test)[1]
    point = zoo_methods.tuned_point(runner, splits, RULES, args.max_drop, args.risk)
    spec = point.pop("spec")
    flt = zoo_methods.float_accuracy(model, held)
    flt_point = float_at(model, held, spec, runner.manifest)
    lat = zoo_methods.latency(bundle, spec, held, args.latency_images)
    heldout = point["heldout"]
    m = runner.manifest
    return {
        "precision": precision, "bundle": str(bundle.relative_to(ROOT)), "verification_passed": conv[
            "verification_passed"], "verification_failures": conv["verification_failures"],
        "convert_seconds": conv["convert_seconds"],
        "units": {u: {"kind": e["kind"], "float_layers": len(e["float_layers"])}
                  for u, e in (m.precision.get("units") or {}).items()} or f"every file {m.activations}",
        "unit_logit_errors": {u: {"int8": round(r["logit_error_int8"], 5), "chosen": round(r["logit_error"], 5),
                                  "target": r["target"], "float32_ops": len(r["float_layers"]),
                                  "invoke_ms": {k: round(v, 4) for k, v in r["invoke_ms"].items()},
                                  "worst_layers": [{k: x[k] for k in ("op", "tensor", "error", "added", "own")}
                                                   for x in r["layers"][:5]]}
                              for u, r in (conv.get("precision") or {}).items()},
        "heldout_images": point["heldout_images"], "rule": point["rule"], "thresholds": point["thresholds"],
        "heldout_float_final_exit": flt["final_exit"],
        "heldout_early_exit_accuracy": heldout["accuracy"],
        "heldout_loss_vs_float_pp": round(100 * (flt["final_exit"] - heldout["accuracy"]), 3),
        "heldout_drop_vs_bundle_final_pp": point["heldout_drop_pp"],
        "heldout_float_at_same_point": round(flt_point, 6),
        "heldout_loss_vs_float_at_same_point_pp": round(100 * (flt_point - heldout["accuracy"]), 3),
        "heldout_bundle_final_exit": point["heldout_int8_final_exit"],
        "avg_macs": heldout["avg_macs"], "avg_macs_fraction": heldout["avg_macs_fraction"],
        "full_macs": m.full_macs, "bundle_bytes": bundle_bytes(bundle),
        "latency": lat, "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="an edgeexit checkpoint (.pt)")
    ap.add_argument("--dataset", required=True, help="mnist or fashion-mnist (the checkpoint's data set)")
    ap.add_argument("--precisions", default="int8,int16,float32,auto",
                    help="comma-separated; PRECISION+RANGE (e.g. int8+mse) for a calibration range other than minmax")
    ap.add_argument("--max-drop", type=float, default=1.0, help="tuning target: pp below the bundle's final exit")
    ap.add_argument("--risk", type=float, default=zoo_methods.RISK)
    ap.add_argument("--latency-images", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the interpreter runs one thread)")
    args = ap.parse_args()
    common.setup(args.threads)
    path = Path(args.checkpoint)
    stem = path.stem
    model = load_checkpoint(path)
    splits = common.load_splits(args.dataset, None)
    out = RESULTS / f"precision_{stem}.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    command = "benchmarks/precision.py " + " ".join(sys.argv[1:])
    for precision in args.precisions.split(","):
        record = measure(model, stem, precision, splits, args)
        results = json.loads(out.read_text()) if out.is_file() else {}   # rows another run wrote meanwhile
        results.setdefault("rows", {})[precision] = {**record, "command": command}
        results["checkpoint"], results["dataset"] = str(path), args.dataset
        write_file_atomic(out, json.dumps(results, indent=2, default=str) + "\n")
        lat = record["latency"]
        print(f"{stem} {precision}: verified {record['verification_passed']}, held-out early-exit accuracy "
              f"{100 * record['heldout_early_exit_accuracy']:.2f} % (loss vs float "
              f"{record['heldout_loss_vs_float_pp']:+.2f} pp; vs float at the same point "
              f"{record['heldout_loss_vs_float_at_same_point_pp']:+.2f} pp), "
              f"MACs {100 * record['avg_macs_fraction']:.1f} %, "
              f"p50/p90 early exit {lat['early_exit_ms']['p50']:.3f}/{lat['early_exit_ms']['p90']:.3f} ms, "
              f"monolithic {lat['monolithic_ms']['p50']:.3f}/{lat['monolithic_ms']['p90']:.3f} ms, "
              f"{record['bundle_bytes']:,} bytes", flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
