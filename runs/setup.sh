#!/usr/bin/env bash
# Idempotent setup on a fresh machine: a virtual environment in .venv with the CPU build of PyTorch
# (pinned first, so no dependency can pull a CUDA build) and mixprec installed editable with dev extras
# (which include [ctensors], the compressed-tensors package the --format compressed-tensors tests check against),
# plus the gguf extra (llama-cpp-python, built here from its sdist; skip it with MIXPREC_NO_GGUF=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
EXTRAS=dev
if [ "${MIXPREC_NO_GGUF:-0}" != 1 ]; then
  EXTRAS=dev,gguf
  if ! .venv/bin/python -c "import llama_cpp" >/dev/null 2>&1; then
    if { ! command -v cmake || ! command -v g++; } >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cmake g++ >/dev/null
    fi
    # llama-cpp-python ships only an sdist (3-6 min on 2 cores; pip caches the wheel). A native build enables
    # ggml's AMX kernels, which crash where the CPU reports AMX but the sandbox forbids it: build for AVX2.
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
      .venv/bin/pip install --quiet "llama-cpp-python==0.3.36"
  fi
fi
.venv/bin/pip install --quiet -e ".[$EXTRAS]"
# The scale-out test starts a real PostgreSQL server (tests/pg_server.py): Debian's server binaries, installed
# once where apt-get exists and we are root (CI is); elsewhere the test skips when no apt-get could install them.
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && ! command -v pg_ctl >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
