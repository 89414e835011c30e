#!/usr/bin/env bash
# The online benchmark: modelserve against the raw model call (and, with --peers, MLServer and a
# tutorial FastAPI server). Writes bench/results/online.md and bench/results/online.png.
# Usage: bench/run.sh [--peers] [--repeat N] [--seconds S] [--skip-workers]
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

for arg in "$@"; do
  if [ "$arg" = --peers ]; then
    venv=bench/.peers-venv
    [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
    pins=$(grep -iE '^(scikit-learn|numpy|scipy|joblib)==' constraints.txt)
    digest=$(cat bench/peers/requirements.txt <(echo "$pins") | sha256sum | cut -c1-16)
    if [ "$(cat "$venv/.installed" 2>/dev/null)" != "$digest" ]; then
      # shellcheck disable=SC2086  # one pin per word
      "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r bench/peers/requirements.txt $pins
      echo "$digest" > "$venv/.installed"
    fi
  fi
done

exec .venv/bin/python -m bench.online "$@"
