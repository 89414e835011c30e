#!/usr/bin/env bash
# The online benchmark: modelserve against the raw model call (and, with --peers, MLServer, a
# tutorial FastAPI server and Triton). Writes bench/results/online.md and bench/results/online.png.
# Usage: bench/run.sh [--peers] [--only SERVER]... [--repeat N] [--seconds S] [--skip-workers]
#        [--large-only] [--grpc-only] [--out DIR]
#
# REST load comes from wrk, gRPC load from h2load (Debian's nghttp2-client): both compiled, so
# one core of load keeps the server's core busy. --grpc-only measures gRPC alone, with the REST
# runs its targets compare with.
#
# --peers installs MLServer and the tutorial server into bench/.peers-venv, and Triton (through
# PyTriton, which ships the tritonserver binary and its Python backend) into bench/.triton-venv.
# The two cannot share one environment: PyTriton 0.7 needs numpy < 2, MLServer loads the joblib
# artifacts with modelserve's numpy and scikit-learn. Triton's Python-backend stub is linked
# against Debian's libpython3.11, so its venv is made from Debian's interpreter
# (/usr/bin/python3.11, or TRITON_PYTHON); a venv of another 3.11 build fails at model load
# (`RLock._recursion_count`). The first --peers run downloads PyTriton (55 MB); every Triton
# start copies its binaries into bench/.work/triton-workspace and takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(nproc)" -lt 2 ]; then
  echo "the benchmark needs two cores: one for the server, one for the load generator" >&2
  exit 1
fi
scripts/setup.sh bench
if ! command -v wrk >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi
if ! command -v h2load >/dev/null; then
  apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null
fi

# install_into VENV REQUIREMENTS PACKAGE...: the requirements and modelserve's pins of the
# packages, reinstalled only when either changes.
install_into() {
  local venv=$1 requirements=$2 pins digest
  shift 2
  pins=$(grep -iE "^($(IFS='|'; echo "$*"))==" constraints.txt)
  digest=$(cat "$requirements" <(echo "$pins") | sha256sum | cut -c1-16)
  if [ "$(cat "$venv/.installed" 2>/dev/null)" != "$digest" ]; then
    # shellcheck disable=SC2086  # one pin per word
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" $pins
    echo "$digest" > "$venv/.installed"
  fi
}

for arg in "$@"; do
  if [ "$arg" = --peers ]; then
    venv=bench/.peers-venv
    [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
    # Every server loads the same artifacts with the same library versions.
    install_into "$venv" bench/peers/requirements.txt scikit-learn numpy scipy joblib

    venv=bench/.triton-venv
    python=${TRITON_PYTHON:-/usr/bin/python3.11}
    if [ ! -x "$venv/bin/python" ]; then
      if ! { [ -x "$python" ] && "$python" -m venv "$venv" 2>/dev/null; }; then
        # Debian splits venv out of the interpreter package.
        rm -rf "$venv"
        apt-get update -qq && apt-get install -y -qq python3.11-venv >/dev/null
        "$python" -m venv "$venv"
      fi
    fi
    if ! ldconfig -p | grep -q 'libpython3\.11\.so\.1\.0'; then
      apt-get update -qq && apt-get install -y -qq libpython3.11 >/dev/null
    fi
    install_into "$venv" bench/peers/triton-requirements.txt onnxruntime
  fi
done

exec .venv/bin/python -m bench.online "$@"
