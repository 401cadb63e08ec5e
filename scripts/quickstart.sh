#!/usr/bin/env bash
# Set everything up, then fine-tune the bundled SmolLM2-135M-Instruct on Rotten Tomatoes reviews (CPU, offline)
# and print target accuracy and control perplexity before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/lightning-ft fit --config configs/quickstart.yaml "$@"
