#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite offline on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m pytest -q "$@"
