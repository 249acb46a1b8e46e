#!/usr/bin/env bash
# Set up, then run the whole test suite (fast tiny-model tests and the real-model ones).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
