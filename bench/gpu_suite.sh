#!/usr/bin/env bash
# The GPU checks in one go (a GPU machine's time is scarce, so nothing here waits on a person):
#   tests  the CUDA-only tests (fused varlen attention, packed == unpacked in bf16, the fused LoRA
#          function against PEFT, a bf16 LoRA run with dropout, Liger against transformers' layers)
#   smoke  train_vs_trl.py on a tiny model, 3 steps: sftlab and TRL both run on CUDA; if the TRL
#          side fails with Liger's kernels, the benchmarks below run TRL without them (said so)
#   lora   sftlab vs TRL, Qwen2.5-0.5B-shaped (random weights), LoRA r16, Alpaca-shaped records
#   full   sftlab vs TRL, Qwen2.5-1.5B-shaped, full fine-tuning, no end checkpoint on either side
#          (18 GB a run: it held most of the stage's time)
#   profile  bench/profile_gpu.py: where a Qwen2.5-0.5B-shaped LoRA step's time goes
#
#   bash bench/gpu_suite.sh OUT [STAGES]     # STAGES: comma-separated, default tests,smoke,lora,full
#
# Logs (and the benchmarks' JSON) go to OUT. Python is $PYTHON (default python3); sftlab is
# imported from src/ when it is not installed. Stops at the first failed test or smoke run.
# On one H200: tests ~40 s, smoke ~1 min, lora ~4.5 min, profile ~50 s, full ~4.2 min (with the end
# checkpoints it ran past 7 minutes); a machine's start costs 1-2 minutes of a lease on top.
set -uo pipefail
out=${1:?usage: bash bench/gpu_suite.sh OUT [STAGES]}
stages=",${2:-tests,smoke,lora,full},"
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$py -c "import sftlab" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
liger=auto

stage() { [[ $stages == *",$1,"* ]] && echo "== $1 ($(date -u +%T))"; }

if stage tests; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'trl', trl.__version__, 'peft', peft.__version__)"
  timeout 240 $py -m pytest -q -n 0 -p no:cacheprovider tests/integration/test_cuda_paths.py 2>&1 | tee "$out/tests.log" \
    || exit 1
fi
if stage smoke; then
  timeout 240 $py bench/train_vs_trl.py --shape tiny-qwen --workload alpaca --per-task 20 --batch 4 --max-len 256 \
    --steps 3 --repeats 1 --sides trl,sftlab 2>&1 | tee "$out/smoke.log"
  grep -q "sftlab failed" "$out/smoke.log" && exit 1
  grep -q "trl failed" "$out/smoke.log" && liger=off && echo "TRL failed in the smoke run: the benchmarks run it without Liger"
fi
if stage lora; then
  timeout 360 $py bench/train_vs_trl.py --shape qwen2.5-0.5b --workload alpaca --per-task 500 --batch 16 \
    --max-len 1024 --steps 30 --repeats 3 --sides trl,sftlab --trl-liger $liger --json "$out/lora.json" 2>&1 \
    | tee "$out/lora.log"
fi
if stage full; then
  timeout 560 $py bench/train_vs_trl.py --shape qwen2.5-1.5b --method full --workload alpaca --per-task 500 \
    --batch 8 --max-len 1024 --steps 30 --repeats 3 --sides trl,sftlab --trl-liger $liger --no-end-save \
    --json "$out/full.json" 2>&1 \
    | tee "$out/full.log"
fi
if stage profile; then
  timeout 150 $py bench/profile_gpu.py --shape qwen2.5-0.5b 2>&1 | tee "$out/profile.log"
fi
echo "== done ($(date -u +%T))"
