#!/usr/bin/env bash
# Set up (if needed) and run the end-to-end pipeline on the bundled model into ./work/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/mixprec demo --work work/demo "$@"
