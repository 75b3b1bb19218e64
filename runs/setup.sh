#!/usr/bin/env bash
# Idempotent setup on a fresh machine: a virtual environment in .venv with the CPU build of PyTorch
# (pinned first, so no dependency can pull a CUDA build) and mixprec installed editable with dev extras
# (which include [ctensors], the compressed-tensors package the --format compressed-tensors tests check against).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet -e ".[dev]"
# The scale-out test starts a real PostgreSQL server (tests/pg_server.py): Debian's server binaries, installed
# once where apt-get exists and we are root (CI is); elsewhere the test skips when no apt-get could install them.
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && ! command -v pg_ctl >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
