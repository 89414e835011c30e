#!/usr/bin/env bash
# Installs modelserve and serves the bundled example models on http://127.0.0.1:8000.
# Extra arguments go to `modelserve serve` (for instance --port 9000 --workers 2).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/modelserve serve "$@"
