"""Conversion benchmark: time to convert a 3-exit ResNet-20 into a bundle, and bundle size vs int8 parameters.

Usage: python benchmarks/bench_convert.py [--model eenet-resnet20] [--exits 3] [--calib-size 64] [--verify-size 200]

The network is seeded and untrained (conversion time and sizes do not depend on the weights); calibration and
verification images are seeded random 32x32 RGB images, so the verification reports float/int8 agreement only.
Writes benchmarks/results/convert_<model>.json: per-step seconds, file sizes, int8 parameter bytes counted on
the graphs, torch parameter counts, MACs, the machine and the package versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeexit.workstation.conversion.pipeline import convert  # noqa: E402
from edgeexit.workstation.models.costs import count_params  # noqa: E402
from edgeexit.bench.envinfo import cpu_model  # noqa: E402


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def build(model_name: str, exits: int) -> torch.nn.Module:
    """The registry's model, or a one-line explanation of what is missing."""
    try:
        from edgeexit.workstation.catalog.registry import create
    except ImportError as exc:
        raise SystemExit(f"bench_convert: edgeexit.workstation.catalog.registry is not available ({exc}); nothing to benchmark")
    torch.manual_seed(0)
    return create(model_name, num_classes=10, exits=exits).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="eenet-resnet20")
    ap.add_argument("--exits", type=int, default=3)
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--verify-size", type=int, default=200)
    ap.add_argument("--out", default=None, help="result file (default benchmarks/results/convert_<model>.json)")
    ap.add_argument("--keep", default=None, help="also keep the bundle in this directory (e.g. for bench_runtime.py)")
    args = ap.parse_args()

    model = build(args.model, args.exits)
    c, h, w = model.spec.input_shape
    rng = np.random.default_rng(0)
    calib = rng.integers(0, 256, (args.calib_size, h, w, c), dtype=np.uint8)
    verify = rng.integers(0, 256, (args.verify_size, h, w, c), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        start = time.perf_counter()
        report = convert(model, calib, Path(tmp) / "bundle", verify_images=verify, monolithic=True,
                         progress=lambda line: print(line, file=sys.stderr, flush=True))
        wall = time.perf_counter() - start
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(Path(tmp) / "bundle", args.keep)
    m = report.manifest
    stage_bytes = sum(s.size_bytes for s in m.stages)
    int8_param_bytes = sum(s.costs.segment_param_bytes + s.costs.head_param_bytes for s in m.stages)
    result = {
        "model": args.model, "exits": m.num_exits, "input_shape": [c, h, w],
        "machine": {"cpu": cpu_model(), "arch": platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "tensorflow": _version("tensorflow-cpu") or _version("tensorflow"),
                    "onnx2tf": _version("onnx2tf"), "ai_edge_litert": _version("ai-edge-litert")},
        "calibration_images": args.calib_size, "verification_images": args.verify_size,
        "convert_wall_s": wall, "steps_s": report.timings_s,
        "stage_file_bytes": [s.size_bytes for s in m.stages], "stages_total_bytes": stage_bytes,
        "monolithic_bytes": m.monolithic.size_bytes if m.monolithic else None,
        "int8_param_bytes_per_stage": [s.costs.segment_param_bytes + s.costs.head_param_bytes for s in m.stages],
        "int8_param_bytes_total": int8_param_bytes,
        "monolithic_param_bytes": m.monolithic.param_bytes if m.monolithic else None,
        "bundle_overhead_ratio": stage_bytes / int8_param_bytes,
        "torch_params": count_params(model),
        "segment_macs": [s.costs.segment_macs for s in m.stages], "head_macs": [s.costs.head_macs for s in m.stages],
        "full_macs": m.full_macs, "torch_macs_agree": all(c["agree"] for c in report.costs),
        "handoffs_equal": all(h["equal"] for h in report.handoffs),
        # the verdict of a random-weight network on random images: this script times the conversion; a bundle
        # kept with --keep is refused by the measuring scripts unless it passed (or --allow-unverified)
        "verification": {**m.verification_verdict(),
                         "top1_agreement": [e.top1_agreement for e in report.verification.exits],
                         "logit_error": [e.logit_error for e in report.verification.exits],
                         "logits_max_abs_error": [e.logits_max_abs_error for e in report.verification.exits],
                         "monolithic_top1_agreement": report.verification.monolithic["top1_agreement"]},
        "warnings": report.warnings,
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"convert_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(report.summary())
    print(f"converted in {wall:.1f} s; stage files {stage_bytes} B for {int8_param_bytes} B of int8 parameters "
          f"({stage_bytes / int8_param_bytes:.2f}x); wrote {out}")


if __name__ == "__main__":
    main()
