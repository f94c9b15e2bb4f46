"""Runtime overhead of a staged bundle: batch 1, one thread, ai-edge-litert, in one process.

Measures (warm-up, then repetitions; median and p95):

* the bundle forced to its last exit (every stage, every hand-off, every decision) vs the bundle's
  monolithic.tflite, same preprocessed input -> ratio (target <= 1.10);
* Runner overhead per stage = (staged latency - the same stages driven by a bare loop: native invoke +
  one ``np.copyto`` per hand-off, nothing else) / number of stages (target <= 15 us). The bare loop runs
  interleaved with the Runner, so both see the same caches; the sum of each stage invoked alone in a tight
  loop (hot caches, a lower bound no chain reaches) is reported beside it;
* ``import edgeexit`` time and peak RSS in a fresh subprocess, and peak RSS after a Runner has run.

Usage::

    python benchmarks/bench_runtime.py BUNDLE [--reps 2000] [--warmup 200] [--out benchmarks/results/runtime.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeexit import FinalExitRule, Runner  # noqa: E402
from edgeexit.energy.boards import cpu_model  # noqa: E402

IMPORT_PROBE = r"""
import json, resource, sys, time
t = time.perf_counter()
import edgeexit
dt = time.perf_counter() - t
rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {"import_s": dt, "import_peak_rss_mb": rss_import / 1024}
if len(sys.argv) > 1:
    import numpy as np
    r = edgeexit.Runner(sys.argv[1], backend="ai-edge-litert", power_sensor=None)
    h, w = r.manifest.preprocessing.size
    r(np.zeros((h, w, r.manifest.preprocessing.channels), np.uint8))
    out["runner_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def _summary(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)), "n": int(a.size)}


def _time_invoke(invoke, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        invoke()
    out = []
    for _ in range(reps):
        t = time.perf_counter_ns()
        invoke()
        out.append((time.perf_counter_ns() - t) * 1e-6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "runtime.json"))
    args = ap.parse_args()

    runner = Runner(args.bundle, backend="ai-edge-litert", num_threads=1, rule=FinalExitRule(), power_sensor=None)
    h, w = runner.manifest.preprocessing.size
    image = np.random.default_rng(0).integers(0, 256, (h, w, runner.manifest.preprocessing.channels), np.uint8)
    q = runner.preprocess(image)
    stages = runner._stages  # the Runner's own interpreters and zero-copy views (benchmark of internals)

    def bare_chain() -> float:
        t = time.perf_counter_ns()
        np.copyto(stages[0].inp[0], q)
        for k, st in enumerate(stages):
            st.run()
            if k + 1 < len(stages):
                np.copyto(stages[k + 1].inp, st.feat)
        int(stages[-1].logits_q.view(np.int8).argmax())
        return (time.perf_counter_ns() - t) * 1e-6

    for _ in range(args.warmup):
        runner(image)
        bare_chain()
        runner.run_monolithic(image)
    staged, bare, mono = [], [], []
    variants = [(staged, lambda: runner(image).latency_ms), (bare, bare_chain),
                (mono, lambda: runner.run_monolithic(image).latency_ms)]
    for i in range(args.reps):  # interleaved, order rotated: each variant follows each other one equally often
        for j in range(3):
            out, fn = variants[(i + j) % 3]
            out.append(fn())
    raw = [_time_invoke(run, args.reps, args.warmup) for run in runner.stage_invokers()]
    raw_sum = sum(float(np.median(r)) for r in raw)
    n_stages = runner.num_exits
    staged_s, bare_s, mono_s = _summary(staged), _summary(bare), _summary(mono)
    overhead_us = (staged_s["median_ms"] - bare_s["median_ms"]) / n_stages * 1000

    probe = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    probe_runner = subprocess.run([sys.executable, "-c", IMPORT_PROBE, args.bundle], capture_output=True, text=True,
                                  cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = {
        "bundle": str(Path(args.bundle).resolve()), "stages": n_stages,
        "machine": {"cpu": cpu_model(), "arch": platform.machine(), "python": platform.python_version(),
                    "numpy": np.__version__, "backend": f"{runner.backend.name} {runner.backend.version}",
                    "threads": 1, "batch": 1},
        "reps": args.reps, "warmup": args.warmup,
        "staged_last_exit": staged_s, "bare_chain": bare_s, "monolithic": mono_s,
        "ratio_staged_over_monolithic": staged_s["median_ms"] / mono_s["median_ms"],
        "ratio_bare_chain_over_monolithic": bare_s["median_ms"] / mono_s["median_ms"],
        "isolated_invoke_median_ms": [float(np.median(r)) for r in raw],
        "runner_overhead_per_stage_us": overhead_us,
        "overhead_per_stage_vs_isolated_invokes_us": (staged_s["median_ms"] - raw_sum) / n_stages * 1000,
        "macs": {"stages_forced_last": runner.manifest.cumulative_macs()[-1],
                 "monolithic": runner.manifest.monolithic.macs if runner.manifest.monolithic else None},
        "import": json.loads(probe.stdout), "runner_process": json.loads(probe_runner.stdout),
        "targets": {"ratio": 1.10, "overhead_per_stage_us": 15.0, "import_s": 0.5, "peak_rss_mb": 150},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
