#!/usr/bin/env python3
"""Are a bundle's outputs the same on every machine? Dump them on each (x86, emulated arm64 ...) and check them.

    same_outputs.py prepare --out DIR [--count 1000] [--bundle BUNDLE]   (workstation: inputs + bundle)
    same_outputs.py dump BUNDLE INPUTS.npz OUT.npz                       (any device install)
    same_outputs.py compare REF.npz OTHER.npz [...] [--max-lsb 3]        (fails on any difference)

``prepare`` writes DIR/inputs.npz (the first COUNT MNIST test images, uint8, with labels) and DIR/bundle:
the given bundle, or the tests' tiny seeded 3-exit network (trained briefly on synthetic digits) converted
with the project's converter, whose
max-softmax thresholds are set to the median exit scores on these inputs (halfway between two neighbouring scores) so that the exits split the set
(decisions near a threshold are the ones a numeric difference would flip).

``dump`` runs :class:`edgeexit.Runner` on every input (label and exit index as a user gets them) and then
every stage for every input, keeping the raw int8 outputs of every exit (features, logits, confidence).
It needs only numpy and an interpreter, so the same file runs on x86-64 and on a Raspberry Pi.

``compare`` takes the first file as the reference and exits 1 when any other file has a different label
or exit for any input, or an int8 output that differs by more than ``--max-lsb`` quantization steps; it
prints (and with ``--json`` writes) the largest difference per output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent.parent
if str(HERE) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(HERE))

log = logging.getLogger("same_outputs")


# ---- dump (device side: numpy + edgeexit + an interpreter) -------------------------------------------------
def _machine() -> dict[str, Any]:
    """What ran the dump: architecture, CPU model line, Python, numpy, emulated CPU if any."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("Model", "model name", "CPU part"):
                cpu = line.split(":", 1)[1].strip()
                if line.startswith("Model") or line.startswith("model name"):
                    break
    except OSError:
        cpu = "unknown"
    return {"machine": platform.machine(), "cpu": cpu, "python": platform.python_version(),
            "numpy": np.__version__, "emulated_cpu": os.environ.get("QEMU_CPU", "")}


def dump(bundle: str, inputs: str, out: str, backend: str = "auto") -> dict[str, Any]:
    """Run ``bundle`` over ``inputs`` (npz with ``images`` [N,H,W(,C)] uint8) and write ``out`` (npz).

    The output holds ``labels`` [N] and ``exits`` [N] (int64, from ``Runner.classify``), and for every
    stage k and output name ``out/stage<k>/<name>`` [N, ...] with the raw int8 values; ``meta`` is a JSON
    string describing the machine and interpreter.
    """
    from edgeexit.runtime.bundle import check_stage_tensors
    from edgeexit.runtime.interpreter import create_interpreter
    from edgeexit.runtime.runner import Runner

    with np.load(inputs) as data:
        images = data["images"]  # [N, H, W(, C)] uint8
    runner = Runner(bundle, backend=backend, num_threads=1, power_sensor=None)
    t0 = time.perf_counter()
    results = [runner.classify(img) for img in images]
    labels = np.array([r.label for r in results], dtype=np.int64)  # [N]
    exits = np.array([r.exit_index for r in results], dtype=np.int64)  # [N]

    # fresh interpreters for the raw outputs: the Runner's keep zero-copy views and cannot use set_tensor/invoke
    interps = [create_interpreter(f, runner.backend) for f in runner.bundle.stage_files]
    specs = runner.manifest.stages
    tensors = [check_stage_tensors(it, spec) for it, spec in zip(interps, specs)]
    raw: dict[str, list[np.ndarray]] = {f"out/stage{k}/{name}": [] for k, t in enumerate(tensors)
                                        for name in t.output_index}
    handoffs = runner.bundle.handoffs
    for img in images:
        q = runner.preprocess(img)  # [H, W, C] int8
        interps[0].set_tensor(tensors[0].input_index, q[None])
        for k, (it, t) in enumerate(zip(interps, tensors)):
            it.invoke()
            for name, idx in t.output_index.items():
                raw[f"out/stage{k}/{name}"].append(it.get_tensor(idx)[0].copy())
            if k + 1 < len(interps):
                feats = it.get_tensor(t.output_index["features"])
                if handoffs[k] is None:
                    interps[k + 1].set_tensor(tensors[k + 1].input_index, feats)
                else:
                    nxt = np.empty_like(feats, dtype=interps[k + 1].get_input_details()[0]["dtype"])
                    handoffs[k].apply(feats, nxt)
                    interps[k + 1].set_tensor(tensors[k + 1].input_index, nxt)
    meta = {**_machine(), "backend": f"{runner.backend.name} {runner.backend.version}", "inputs": len(images),
            "bundle": runner.manifest.name, "exit_rule": runner.rule.__class__.__name__,
            "seconds": round(time.perf_counter() - t0, 1)}
    arrays = {key: np.stack(v) for key, v in raw.items()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, labels=labels, exits=exits, meta=np.array(json.dumps(meta)), **arrays)
    log.info("%s: %d inputs, exits %s, %s", out, len(images), np.bincount(exits).tolist(), meta)
    return meta


# ---- compare -----------------------------------------------------------------------------------------------
def compare(ref_path: str, other_path: str, max_lsb: int) -> dict[str, Any]:
    """Differences of ``other_path`` against ``ref_path`` (both from :func:`dump`)."""
    with np.load(ref_path) as a, np.load(other_path) as b:
        meta_a, meta_b = json.loads(str(a["meta"])), json.loads(str(b["meta"]))
        keys_a, keys_b = set(a.files) - {"meta"}, set(b.files) - {"meta"}
        report: dict[str, Any] = {"reference": ref_path, "other": other_path, "reference_machine": meta_a,
                                  "other_machine": meta_b, "problems": []}
        if keys_a != keys_b:
            report["problems"].append(f"different outputs: {sorted(keys_a ^ keys_b)}")
        n = int(a["labels"].shape[0])
        if b["labels"].shape != a["labels"].shape:
            report["problems"].append(f"{other_path} has {b['labels'].shape[0]} inputs, reference has {n}")
            return report
        report["inputs"] = n
        for key in ("labels", "exits"):
            diff = np.flatnonzero(a[key] != b[key])
            report[f"{key}_differ"] = int(diff.size)
            if diff.size:
                report["problems"].append(f"{key} differ on {diff.size} of {n} inputs (first: input {int(diff[0])}, "
                                          f"{int(a[key][diff[0]])} vs {int(b[key][diff[0]])})")
        report["exit_counts"] = np.bincount(a["exits"]).tolist()
        largest: dict[str, int] = {}
        differing: dict[str, int] = {}
        for key in sorted(keys_a & keys_b - {"labels", "exits"}):
            d = np.abs(a[key].astype(np.int32) - b[key].astype(np.int32))
            largest[key] = int(d.max()) if d.size else 0
            differing[key] = int(np.count_nonzero(d))
            if largest[key] > max_lsb:
                report["problems"].append(f"{key}: int8 values differ by up to {largest[key]} steps "
                                          f"(> {max_lsb}) in {differing[key]} elements")
        report["max_int8_diff"] = largest
        report["elements_differ"] = differing
        report["largest_int8_diff"] = max(largest.values(), default=0)
    return report


# ---- prepare (workstation side) -----------------------------------------------------------------------------
def prepare(out_dir: str, count: int, bundle: str | None) -> None:
    """Write OUT/inputs.npz (first ``count`` MNIST test images) and OUT/bundle (given or built)."""
    from edgeexit.datasets import load_dataset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("mnist", split="test", limit=count)
    np.savez_compressed(out / "inputs.npz", images=data.images, labels=data.labels)  # [N,28,28,1] uint8, [N]
    target = out / "bundle"
    if target.exists():
        shutil.rmtree(target)
    if bundle is not None:
        shutil.copytree(bundle, target)
    else:
        _build_bundle(target, data.images)
    log.info("prepared %s: %d inputs, bundle %s", out, len(data.images), target)


def _build_bundle(target: Path, images: np.ndarray) -> None:
    """A tiny seeded 3-exit MNIST-shaped network, converted to a bundle, thresholds at median exit scores."""
    sys.path.insert(0, str(HERE / "tests"))
    from edgeexit.workstation.conversion.pipeline import convert  # workstation only
    from tinymodels import synthetic_digits, tiny_staged_model, train_tiny  # the tests' seeded tiny networks

    from edgeexit.runtime.bundle import read_manifest, write_manifest_atomic
    from edgeexit.runtime.manifest import ExitRuleSpec
    from edgeexit.runtime.runner import Runner

    model = train_tiny(tiny_staged_model(seed=0), steps=80)
    calib, _ = synthetic_digits(48, seed=3)
    convert(model, calib, target, monolithic=False, name="arm64-check", force=True)
    trace = Runner(target, power_sensor=None).trace(images)
    thresholds = []
    for logits in trace.logits[:-1]:  # [N, K] per early exit
        z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
        top = np.unique((np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)).max(axis=1))  # sorted distinct
        mid = len(top) // 2
        # halfway between two neighbouring distinct scores: no input sits exactly on the threshold
        thresholds.append(float((top[mid - 1] + top[mid]) / 2) if len(top) > 1 else float(top[0]))
    _, manifest = read_manifest(target)
    write_manifest_atomic(target, manifest.replace(exit_rule=ExitRuleSpec(kind="max_softmax",
                                                                          thresholds=tuple(thresholds))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="workstation: write inputs.npz and a bundle into --out")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--bundle", help="use this bundle instead of building a tiny seeded one")
    d = sub.add_parser("dump", help="run a bundle over inputs.npz and write labels, exits, raw int8 outputs")
    d.add_argument("bundle")
    d.add_argument("inputs")
    d.add_argument("out")
    d.add_argument("--backend", default="auto")
    c = sub.add_parser("compare", help="compare dumps with the first one; exit 1 on any difference")
    c.add_argument("reference")
    c.add_argument("others", nargs="+")
    c.add_argument("--max-lsb", type=int, default=3, help="largest allowed int8 difference (quantization steps)")
    c.add_argument("--json", help="also write the comparison here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    from edgeexit.errors import EdgeExitError
    try:
        if args.cmd == "prepare":
            prepare(args.out, args.count, args.bundle)
        elif args.cmd == "dump":
            dump(args.bundle, args.inputs, args.out, args.backend)
        else:
            reports = [compare(args.reference, o, args.max_lsb) for o in args.others]
            failed = False
            for r in reports:
                m = r["other_machine"]
                status = "FAIL" if r["problems"] else "ok"
                failed |= bool(r["problems"])
                print(f"{status}: {m['machine']} {m['cpu']} ({m['backend']}) vs {r['reference_machine']['machine']}: "
                      f"{r.get('inputs', 0)} inputs, labels differ {r.get('labels_differ', '-')}, exits differ "
                      f"{r.get('exits_differ', '-')}, exit counts {r.get('exit_counts')}, largest int8 difference "
                      f"{r.get('largest_int8_diff', '-')} step(s)")
                for problem in r["problems"]:
                    print(f"  {problem}")
            if args.json:
                Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")
            return 1 if failed else 0
    except EdgeExitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
