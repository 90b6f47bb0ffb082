"""Where a GPU training step's time goes: torch.profiler (CPU + CUDA) on a real `train()` run.

    python bench/profile_gpu.py --shape qwen2.5-0.5b                 # LoRA r16, 16 x 1024 Alpaca-shaped
    python bench/profile_gpu.py --shape qwen2.5-1.5b --method full --batch 8

The run is `sftlab.train.trainer.train` on a random model of `--shape` (train_vs_trl.py's shapes)
with Alpaca-shaped records, packed. After `--warmup` steps the profiler records `--steps` steps.
Printed: wall time per step against the GPU's busy time (the sum of its kernels' durations: a
step far longer than its kernels waits on the host: launches, Python, host syncs), the ops
with the most GPU time and the most host time, the host syncs (`aten::item`, device-to-host
copies, stream synchronisations) per step, and the peak allocated GPU memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alpaca_data import write_alpaca_dataset  # noqa: E402
from common import scratch_dir, train_with_callback  # noqa: E402
from train_vs_trl import SHAPES, make_random_model  # noqa: E402

SYNCS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
         "cudaMemcpy", "aten::nonzero")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--liger", choices=["auto", "false"], default="auto",
                    help="training.use_liger_kernel (auto: Liger's RMSNorm, RoPE, SwiGLU where installed)")
    ap.add_argument("--trace", type=Path, help="also write a Chrome trace here")
    args = ap.parse_args()

    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    work = scratch_dir("sftlab-profile-gpu-")
    model = make_random_model(args.shape, work / args.shape)
    data = write_alpaca_dataset(work / "train.jsonl", args.batch * (args.warmup + args.steps) * (args.max_len // 150 + 1))
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    state: dict = {}

    class Profile(TrainerCallback):
        def on_step_end(self, targs, st, control, **kw):
            if st.global_step == args.warmup:
                sync()
                state["prof"] = torch.profiler.profile(activities=activities, record_shapes=True)
                state["prof"].__enter__()
                state["t0"] = time.perf_counter()
            elif st.global_step == args.warmup + args.steps and "prof" in state:
                sync()
                state["wall"] = time.perf_counter() - state["t0"]
                state["prof"].__exit__(None, None, None)

    info = train_with_callback(Profile(), model, data, work / "run", method=args.method, batch=args.batch,
                               max_len=args.max_len, steps=args.warmup + args.steps,
                               training={"use_liger_kernel": "auto" if args.liger == "auto" else False})
    prof, wall, n = state["prof"], state["wall"], args.steps
    averages = prof.key_averages()
    # the kernels themselves (op rows of the averages would count each kernel's time again)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    print(f"\n{args.shape} {args.method}, {args.batch} x {args.max_len}, attention {info['attention']}, "
          f"bf16 {info['bf16']}, Liger {info['liger_kernels'] or 'off'}: {wall / n * 1e3:.1f} ms per step, "
          f"GPU kernels {busy / n * 1e3:.1f} ms per step ({100 * busy / wall:.0f} % busy, "
          f"{len(kernels) // n} kernels); peak allocated "
          f"{(torch.cuda.max_memory_allocated() if cuda else 0) / 1024**3:.2f} GiB")
    syncs = {e.key: e.count // n for e in averages if e.key.startswith(SYNCS)}
    print("host syncs and copies per step:", syncs)
    for key in (["self_device_time_total"] if cuda else []) + ["self_cpu_time_total"]:
        print(averages.table(sort_by=key, row_limit=args.top, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
