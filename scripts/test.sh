#!/usr/bin/env bash
# One command: set everything up (once) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# pytest exits 5 when it collects no test: that is a failure here too.
exec .venv/bin/python -m pytest -q "$@"
