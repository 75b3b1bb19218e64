#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite offline on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# several tests run worker processes side by side; passive OpenMP waiting keeps them from spinning on
# each other's cores (a 4-14x slowdown of small ops when oversubscribed)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
.venv/bin/python -m pytest -q "$@"
