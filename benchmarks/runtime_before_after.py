"""The same whole-call measurement on two versions of edgeexit (e.g. a checkout of an older commit and this one).

For each source tree, in its own process: a Runner on BUNDLE at operating point POINT, ``Runner.classify`` and
``Runner.run_monolithic`` timed from outside the call (uint8 image array in -> result out) on N held-out MNIST
images, each image's median over REPEAT passes; then each stage's bare invoke timed back to back, so that the
time outside the invokes of the stages that ran can be read off. Writes one JSON file with both versions.

Usage::

    git worktree add /tmp/edgeexit-old 0382edb
    python benchmarks/runtime_before_after.py BUNDLE --before /tmp/edgeexit-old --after . [--point tuned]
        [--out benchmarks/results/runtime_before_after.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from verified import add_option, require_verified

PROBE = r"""
import json, sys, time
import numpy as np
from edgeexit import Runner
try:
    from edgeexit.bench.datasets import load_dataset          # current layout
except ImportError:
    from edgeexit.datasets import load_dataset                # before the layout move
bundle, point, n, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r = Runner(bundle, power_sensor=None, rule=point)
images = load_dataset("mnist[1::2]").images[:n]
clock = time.perf_counter_ns
def whole_call(fn):
    ns = np.empty((repeat, n))
    for p in range(repeat):
        for i, x in enumerate(images):
            t = clock(); fn(x); ns[p, i] = clock() - t
    per_image = np.median(ns, axis=0) / 1e3
    return {"p50_us": float(np.median(per_image)), "mean_us": float(per_image.mean())}
for x in images[:500]:
    r.classify(x); r.run_monolithic(x)
ee, mono = whole_call(r.classify), whole_call(r.run_monolithic)
exits = np.array([r.classify(x).exit_index for x in images])
invoke_us = []
for run in r.stage_invokers():
    for _ in range(300):
        run()
    t = np.empty(3000)
    for i in range(3000):
        t0 = clock(); run(); t[i] = clock() - t0
    invoke_us.append(float(np.median(t)) / 1e3)
ran = float(np.cumsum(invoke_us)[exits].mean())
print(json.dumps({"classify": ee, "run_monolithic": mono, "stage_invoke_us": invoke_us,
                  "mean_invokes_of_stages_run_us": ran, "outside_invokes_us": ee["mean_us"] - ran,
                  "speedup_p50": mono["p50_us"] / ee["p50_us"], "speedup_mean": mono["mean_us"] / ee["mean_us"],
                  "exit_shares": (np.bincount(exits, minlength=len(invoke_us)) / n).tolist()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--before", required=True, help="source tree of the older version")
    ap.add_argument("--after", default=str(Path(__file__).resolve().parents[1]), help="source tree of this version")
    ap.add_argument("--point", default="tuned")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None)
    add_option(ap)
    args = ap.parse_args()
    result = {"bundle": str(Path(args.bundle).resolve()),
              "verification": require_verified(args.bundle, args.allow_unverified), "point": args.point,
              "images": args.images,
              "repeat": args.repeat, "definition": "whole call timed from outside, uint8 array in -> result out; "
                                                   "per image the median over the repeats"}
    for name, tree in (("before", args.before), ("after", args.after)):
        proc = subprocess.run([sys.executable, "-c", PROBE, args.bundle, args.point, str(args.images),
                               str(args.repeat)], capture_output=True, text=True, check=True,
                              cwd=Path(tree).resolve(),  # `python -c` puts the working directory first on sys.path
                              env={**os.environ, "PYTHONPATH": str(Path(tree).resolve())})
        result[name] = {"source": str(Path(tree).resolve()),
                        "git": subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                                              text=True).stdout.strip() or None,
                        **json.loads(proc.stdout.strip().splitlines()[-1])}
        print(name, json.dumps(result[name]), file=sys.stderr)
    out = json.dumps(result, indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(out)
    print(out)


if __name__ == "__main__":
    main()
