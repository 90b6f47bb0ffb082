#!/usr/bin/env bash
# One command: set everything up (once) and run the whole test suite.
# VENV / PYTHON pick another venv and interpreter (see setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Two pytest-xdist workers (TEST_WORKERS; 0 runs in one process), each at one thread (see
# tests/conftest.py: the torchrun tests run while no other test does). worksteal: the
# durations are uneven. pytest exits 5 when it collects no test: that is a failure here too.
exec "${VENV:-.venv}/bin/python" -m pytest -q -n "${TEST_WORKERS:-2}" --dist worksteal "$@"
