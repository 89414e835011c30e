#!/usr/bin/env bash
# Installs modelserve with its dev tools and runs every check: ruff, mypy --strict, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
export PATH="$PWD/.venv/bin:$PATH"

echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy --strict"
mypy
echo "== pytest"
pytest "$@"
