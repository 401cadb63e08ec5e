#!/usr/bin/env bash
# Set everything up, then run the whole test suite (offline; W&B offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
export PATH="$PWD/.venv/bin:$PATH"
# two workers on two cores, one test file per worker at a time (a file's session fixtures, e.g. the conformance
# matrix's shared fits and torchrun groups, are then built once)
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 "$@"
