#!/usr/bin/env bash
# Run edgeexit inside the emulated arm64 rootfs built by scripts/arm64/setup.sh, as on a Raspberry Pi.
#
#   scripts/arm64/run.sh [--cpu a72|a76] [--bind DIR]... exec -- CMD [ARG...]   any command (venv on PATH)
#   scripts/arm64/run.sh [--cpu a72|a76] tests [PYTEST ARGS...]                  the test suite (default: tests/)
#   scripts/arm64/run.sh [--cpu a72|a76] outputs BUNDLE INPUTS.npz OUT.npz       labels, exits, int8 outputs
#   scripts/arm64/run.sh ci [--reuse | --bundle DIR]                             everything below, for CI
#
# --cpu a72 emulates a Raspberry Pi 4 (QEMU_CPU=cortex-a72 and a Pi 4 /proc/cpuinfo), a76 a Raspberry Pi 5
# (cortex-a76). Default a72. Each command runs in a private mount namespace: /proc/cpuinfo is replaced by
# scripts/arm64/cpuinfo-<cpu>.txt (the TFLite interpreter's CPU detection crashes on the host's x86 one) and
# this repository is mounted at the same path, used as the source (PYTHONPATH), so edits need no re-setup.
# Paths in EDGEEXIT_TEST_BUNDLE and in 'outputs' arguments are mounted at the same path too.
#
# 'ci' = setup.sh, then on the host (workstation env .venv): a tiny seeded bundle and 1000 MNIST test
# images; the outputs on x86 and on both emulated CPUs; scripts/same_outputs.py compare; the runtime
# tests whose outcome can depend on the CPU on a72 (interpreter, Runner, rules, bundle checks, board detection,
# bench and tune numerics; see ARM64_TESTS below). Left to the native runs, where they are the same Python code
# on the same interpreter calls: the CLI's subprocess tests, the hostile corpus, the docs and the budget
# controller's simulation (under emulation they took two thirds of this stage). Non-zero exit on any failure. Results in runs/arm64/. --reuse keeps an existing
# runs/arm64/bundle and inputs.npz instead of converting again; --bundle DIR uses
# that bundle instead of converting one.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
arm64_dir="${EDGEEXIT_ARM64_DIR:-$here/.arm64}"
root="$arm64_dir/rootfs"
die() { echo "error: $1" >&2; exit "${2:-1}"; }
# the runtime tests 'ci' runs emulated (see above)
ARM64_TESTS=(tests -m "runtime and not workstation" --ignore=tests/test_cli_board.py --ignore=tests/test_cli_device.py
             --ignore=tests/test_hostile.py --ignore=tests/test_docs.py --ignore=tests/test_control.py
             --ignore=tests/test_offload.py)  # offload: an x86 server process, protocol code only

# ---- the namespaced inner part (re-invoked by 'unshare'): mounts, then chroot -------------------------
if [ "${1:-}" = __inner ]; then
  shift; cpu="$1"; binds="$2"; shift 2
  mount -t proc proc "$root/proc"
  mount --bind "$here/scripts/arm64/cpuinfo-$cpu.txt" "$root/proc/cpuinfo"
  mount --rbind /dev "$root/dev"
  mount --rbind /sys "$root/sys"  # CPU lists (possible/present) for the interpreter's CPU detection
  mount -t tmpfs tmpfs "$root/tmp"
  IFS=: read -r -a dirs <<< "$here:$binds"
  for d in "${dirs[@]}"; do
    [ -n "$d" ] || continue
    mkdir -p "$root$d"; mount --bind "$d" "$root$d"
  done
  pass=()
  while IFS='=' read -r name _; do pass+=("$name=${!name}"); done < <(env | grep -E '^EDGEEXIT_[A-Z0-9_]*=' || true)
  exec env -i HOME=/root LANG=C.UTF-8 PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    QEMU_CPU="cortex-$cpu" PYTHONPATH="$here" PYTHONDONTWRITEBYTECODE=1 "${pass[@]}" \
    chroot "$root" /bin/sh -c 'cd "$1" && shift && exec "$@"' sh "$here" "$@"
fi

cpu=a72; binds=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) cpu="${2:-}"; shift 2 ;;
    --bind) binds="$binds:$(realpath "$2")"; shift 2 ;;
    *) break ;;
  esac
done
case "$cpu" in a72|a76) ;; *) die "--cpu must be a72 (Raspberry Pi 4) or a76 (Raspberry Pi 5), got '$cpu'" 2 ;; esac
cmd="${1:-}"; [ $# -gt 0 ] && shift

in_arm64() {  # in_arm64 CMD... : run CMD in the rootfs with the chosen CPU
  [ "$(id -u)" = 0 ] || die "root is needed for chroot and private mounts, got uid $(id -u); run it with sudo" 2
  [ -x "$root/opt/venv/bin/python" ] || die "no arm64 environment in $root; run: sudo scripts/arm64/setup.sh" 2
  grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
    || die "qemu-aarch64 binfmt handler is not enabled (host rebooted?); run: sudo scripts/arm64/setup.sh" 2
  if [ -n "${EDGEEXIT_TEST_BUNDLE:-}" ]; then binds="$binds:$(realpath "$(dirname "$EDGEEXIT_TEST_BUNDLE")")"; fi
  unshare -m --propagation private -- "$here/scripts/arm64/run.sh" __inner "$cpu" "$binds" "$@"
}

case "$cmd" in
  exec)
    [ "${1:-}" = -- ] && shift
    [ $# -gt 0 ] || die "exec needs a command, e.g. run.sh exec -- python -c 'import platform; print(platform.machine())'" 2
    in_arm64 "$@" ;;
  tests)
    [ $# -gt 0 ] || set -- tests  # default: the whole suite; or pass test files and pytest options
    in_arm64 python -m pytest -p no:cacheprovider -q "$@" ;;
  outputs)
    [ $# -eq 3 ] || die "outputs needs BUNDLE INPUTS.npz OUT.npz, got $# arguments" 2
    for p in "$1" "$2"; do [ -e "$p" ] || die "outputs: '$p' does not exist" 2; done
    mkdir -p "$(dirname "$3")"
    binds="$binds:$(realpath "$1"):$(realpath "$(dirname "$2")"):$(realpath "$(dirname "$3")")"
    in_arm64 python scripts/same_outputs.py dump "$(realpath "$1")" "$(realpath "$2")" \
      "$(realpath "$(dirname "$3")")/$(basename "$3")" ;;
  ci)
    out="$here/runs/arm64"; mkdir -p "$out"
    "$here/scripts/arm64/setup.sh" >/dev/null
    py="$here/.venv/bin/python"
    [ -x "$py" ] || py="$("$here/scripts/env.sh" workstation)/bin/python"
    t0=$(date +%s)
    if [ "${1:-}" = --reuse ] && [ -f "$out/bundle/manifest.json" ] && [ -f "$out/inputs.npz" ]; then
      echo "[arm64] reusing $out/bundle and $out/inputs.npz" >&2
    elif [ "${1:-}" = --bundle ]; then
      [ -f "${2:-}/manifest.json" ] || die "ci --bundle needs a bundle directory, got '${2:-}'" 2
      "$py" "$here/scripts/same_outputs.py" prepare --out "$out" --count 1000 --bundle "$2"
    else
      "$py" "$here/scripts/same_outputs.py" prepare --out "$out" --count 1000
    fi
    "$py" "$here/scripts/same_outputs.py" dump "$out/bundle" "$out/inputs.npz" "$out/x86_64.npz"
    for c in a72 a76; do
      "$here/scripts/arm64/run.sh" --cpu "$c" outputs "$out/bundle" "$out/inputs.npz" "$out/aarch64-$c.npz"
    done
    "$py" "$here/scripts/same_outputs.py" compare "$out/x86_64.npz" "$out/aarch64-a72.npz" "$out/aarch64-a76.npz" \
      --json "$out/compare.json"
    EDGEEXIT_TEST_BUNDLE="$out/bundle" "$here/scripts/arm64/run.sh" --cpu a72 tests "${ARM64_TESTS[@]}"
    echo "[arm64] ci passed in $(( $(date +%s) - t0 )) s after setup" >&2 ;;
  *) die "unknown command '$cmd'; use exec, tests, outputs or ci (see the top of $0)" 2 ;;
esac
