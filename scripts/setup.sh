#!/usr/bin/env bash
# Creates .venv and installs modelserve at the pinned versions of constraints.txt.
# Usage: scripts/setup.sh [dev|bench|recipes]   (dev adds the test and lint tools; bench adds
# plotting; recipes adds pyspark and Ray for scripts/recipes.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extra=${1:-}

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "modelserve needs Python 3.11 or newer as '$python' (set PYTHON=...)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$python" -m venv .venv 2>/dev/null; then
    # Debian splits venv out of the interpreter package.
    rm -rf .venv
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    "$python" -m venv .venv
  fi
fi

target="."
[ -n "$extra" ] && target=".[$extra]"
stamp=".venv/.installed-${extra:-runtime}"
digest=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c constraints.txt -e "$target"
  if [ -n "$extra" ]; then
    # KServe's SDK for the client compatibility tests, without its own requirements: they pin
    # pandas, protobuf, psutil and python-dateutil below ours (for its model server, which the
    # tests do not run). What `import kserve` needs is in the dev extra.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
      -c constraints.txt kserve
  fi
  echo "$digest" > "$stamp"
fi
