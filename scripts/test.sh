#!/usr/bin/env bash
# The whole test suite, set-up included: `bash scripts/test.sh` (the README's test command; .ci/run calls it).
#
#   0. builds the pinned environments it needs (scripts/env.sh) and one tiny seeded bundle, converted once
#   1. workstation environment: every test (tiny seeded models, real ONNX -> onnx2tf -> int8 conversions)
#   2. device-only environment (ai-edge-litert; no torch, TensorFlow or onnx): the runtime tests, same bundle
#   3. legacy environment (tflite-runtime 2.14 with numpy<2): the runtime tests, same bundle
#      (every run of tests/test_offload.py starts the real offload server from the server environment,
#      .venv-server: kserve, its own pins; EDGEEXIT_SERVER_PYTHON names its python)
#   4. arm64 under qemu emulation (Raspberry Pi 4 and Pi 5 CPUs): labels, exits and int8 outputs identical
#      to x86 on 1000 MNIST images, and the runtime tests; needs root (skipped with a notice otherwise,
#      or forced with EDGEEXIT_ARM64=1, disabled with EDGEEXIT_ARM64=0)
#
# Extra arguments go to the workstation pytest run (e.g. -k runner, -x). Exits non-zero if anything fails.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
t0=$(date +%s)
say() { printf '\n== %s (%ds)\n' "$1" $(( $(date +%s) - t0 )) >&2; }
work="$(mktemp -d "${TMPDIR:-/tmp}/edgeexit-tests.XXXXXX")"
trap 'rm -rf "$work"' EXIT

say "environments"
ws="$(bash scripts/env.sh workstation)"
dev="$(bash scripts/env.sh device)"
legacy="$(bash scripts/env.sh legacy)"
server="$(bash scripts/env.sh server)"
export EDGEEXIT_SERVER_PYTHON="$server/bin/python"   # tests/test_offload.py starts `edgeexit serve` with it

say "tiny seeded test bundle (converted once, shared by every environment)"
"$ws/bin/python" tests/make_test_bundle.py "$work/tiny-bundle"
export EDGEEXIT_TEST_BUNDLE="$work/tiny-bundle"

pytest_ok() {  # pytest's exit code 5 (no tests collected) is a failure here too
  "$@" || { rc=$?; echo "error: test run failed (exit $rc): $*" >&2; exit 1; }
}

say "1/4 workstation environment: all tests"
pytest_ok "$ws/bin/python" -m pytest -q -p no:cacheprovider "$@"

# the runtime tests: marked `runtime` (numpy, Pillow, click and a TFLite interpreter only; see pytest.ini),
# less the few torch tests inside those files
runtime_tests=(-m "runtime and not workstation")

say "2/4 device-only environment (ai-edge-litert, no torch/TensorFlow/onnx): runtime tests"
"$dev/bin/python" - <<'PY'
import importlib.util, sys
heavy = [m for m in ("torch", "tensorflow", "onnx", "onnx2tf") if importlib.util.find_spec(m)]
sys.exit(f"error: the device environment must not have {heavy}" if heavy else 0)
PY
pytest_ok "$dev/bin/python" -m pytest -q -p no:cacheprovider "${runtime_tests[@]}"

say "3/4 legacy environment (tflite-runtime 2.14, numpy<2): runtime tests"
pytest_ok "$legacy/bin/python" -m pytest -q -p no:cacheprovider "${runtime_tests[@]}"

arm="${EDGEEXIT_ARM64:-auto}"
if [ "$arm" = 0 ] || { [ "$arm" = auto ] && [ "$(id -u)" != 0 ]; }; then
  say "4/4 arm64 emulation: SKIPPED (needs root; run 'sudo scripts/arm64/run.sh ci', or EDGEEXIT_ARM64=1)"
else
  say "4/4 arm64 emulation (Raspberry Pi 4 / Pi 5 CPUs): outputs identical to x86, runtime tests"
  export EDGEEXIT_ARM64_DIR="${EDGEEXIT_ARM64_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeexit/arm64}"
  bash scripts/arm64/run.sh ci --bundle "$EDGEEXIT_TEST_BUNDLE"
fi
say "all tests passed"
