#!/usr/bin/env bash
# Set everything up, then run the whole test suite (offline; W&B offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# report.html is checked in a real headless browser: Debian's chromium where apt-get can install it (about 30 s;
# the test states that it is skipped where no browser can be installed)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
    >/dev/null 2>&1 || echo "chromium could not be installed: the report.html browser check will be skipped"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
export PATH="$PWD/.venv/bin:$PATH"
# two workers on two cores, one test file per worker at a time (a file's session fixtures, e.g. the conformance
# matrix's shared fits and torchrun groups, are then built once)
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 "$@"
