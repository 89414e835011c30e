#!/usr/bin/env bash
# Installs modelserve with its dev tools and runs every check: ruff, mypy --strict, the
# import-linter layering contracts, pytest, then
# the container image smoke test (deploy/smoke-image.sh: SKIPPED, with the reason, where podman
# cannot run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
# The README's examples are checked with the real curl.
if ! command -v curl >/dev/null; then
  apt-get update -qq && apt-get install -y -qq curl >/dev/null
fi
# The metrics tests run the real promtool and Prometheus server.
scripts/prometheus.sh
# The API docs test opens /docs in a real headless Chromium.
scripts/chromium.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy --strict"
mypy
echo "== import-linter (the layering contracts in pyproject.toml)"
lint-imports
echo "== pytest"
pytest "$@"
echo "== image smoke test"
deploy/smoke-image.sh
