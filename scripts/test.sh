#!/usr/bin/env bash
# One command: set everything up (once) and run the whole test suite.
# VENV / PYTHON pick another venv and interpreter (see setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# pytest exits 5 when it collects no test: that is a failure here too.
exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
