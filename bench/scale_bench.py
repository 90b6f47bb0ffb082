"""Engines side by side: DDP, DeepSpeed ZeRO-2/3 and FSDP2 with 2 processes on this machine.

    python bench/scale_bench.py                      # SmolLM2-135M full fine-tuning, 8 steps per engine
    python bench/scale_bench.py --steps 2 --engines ddp,zero3 --max-len 128 --per-task 10   # smoke run
    python bench/scale_bench.py --shape qwen2.5-0.5b --nproc 1 --bf16 --method full \
        --engines ddp,zero3_offload,fsdp          # one GPU: Qwen2.5-0.5B-shaped model vs the plain run
    python bench/scale_bench.py --shape qwen2.5-0.5b --nproc 1 --bf16 --method lora --engines ddp

Each engine is one `torchrun --nproc_per_node N` launch of `sftlab.train.trainer.train` on
the embedded SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised; or --model, or a random model of --shape as
bench/train_vs_trl.py makes it) with the demo dataset, packed rows of --max-len tokens,
--batch rows per process per step, full fine-tuning (or --method lora) in fp32 by default so
every engine computes the same thing (--bf16: bf16 mixed precision), AdamW. `ddp` with
--nproc 1 is the plain one-process run: the baseline. Printed per engine: each process's
peak RSS (the kernel's high-water mark, read by the process itself at the end) and, on a
GPU, its peak allocated CUDA memory; trained tokens/s over all processes (run.json, timed
around `trainer.train()`), the final loss, and `sftlab estimate --nproc N --distributed
ENGINE` for the same set-up (device total + offloaded, which on a CPU is the same RAM).

On a shared CPU machine the timings are noisy (the load average is printed); memory is not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULT_PREFIX, gib, load_note, print_table, report_result, run_child,  # noqa: E402
                    scratch_dir, self_peak_rss)
from train_vs_trl import SHAPES, make_random_model, peak_device_memory  # noqa: E402

ENGINES = ("ddp", "zero2", "zero3", "fsdp", "zero2_offload", "zero3_offload")


def child(opts: dict) -> None:
    """One process of an engine's run (started by torchrun)."""
    from sftlab.config import TrainConfig
    from sftlab.train.distributed import end_rank
    from sftlab.train.trainer import train

    config = TrainConfig.model_validate({
        "model": {"name_or_path": opts["model"]},
        "method": opts["method"],
        "data": {"train": opts["train"], "max_seq_length": opts["max_len"]},
        "training": {"learning_rate": 1e-5 if opts["method"] == "full" else 2e-4,
                     "per_device_train_batch_size": opts["batch"], "max_steps": opts["steps"],
                     "bf16": opts["bf16"], "logging_steps": 1, "save_steps": 10**6, "seed": 0},
        "distributed": opts["engine"],
        "output_dir": opts["out"],
    })
    info = train(config)
    report_result({"rank": int(os.environ.get("RANK", 0)), "peak_rss": self_peak_rss(),
                   "peak_cuda": peak_device_memory(), "tokens_per_s": info["trained_tokens_per_second"],
                   "train_loss": info["train_loss"], "engine": info["engine"]})
    end_rank(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="model (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="instead of --model: a random model of this architecture")
    ap.add_argument("--method", choices=("full", "lora"), default="full")
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (default fp32)")
    ap.add_argument("--engines", default="ddp,zero2,zero3,fsdp", help=f"comma-separated, from {', '.join(ENGINES)}")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1, help="rows per process per step")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--per-task", type=int, default=100, help="demo examples per task (4 tasks)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    from sftlab.demo.dataset import write_demo_dataset
    from sftlab.estimate import estimate_memory

    work = scratch_dir("scale-bench-")
    model = make_random_model(args.shape, work / args.shape) if args.shape else args.model
    train_path = write_demo_dataset(work / "data", seed=0, sizes={"train": args.per_task})["train"]
    threads = max(1, (os.cpu_count() or 1) // args.nproc)
    print(f"{args.nproc} processes x {threads} thread(s); {load_note()}", flush=True)
    results = {}
    for engine in args.engines.split(","):
        opts = {"model": model, "method": args.method, "bf16": args.bf16, "train": str(train_path),
                "max_len": args.max_len, "batch": args.batch, "steps": args.steps, "engine": engine,
                "out": str(work / engine)}
        print(f"== {engine}", flush=True)
        run = run_child([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                         __file__, "--child", json.dumps(opts)],
                        env={"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}, echo=False)
        ranks = sorted((json.loads(line[len(RESULT_PREFIX):]) for line in run.output.splitlines()
                        if line.startswith(RESULT_PREFIX)), key=lambda r: r["rank"])
        if run.returncode or len(ranks) != args.nproc:
            print(run.output[-3000:])
            raise SystemExit(f"{engine}: failed (exit {run.returncode})")
        est = estimate_memory(model, args.method, args.max_len, args.batch, dtype="bf16" if args.bf16 else "fp32",
                              optimizer="adamw", nproc=args.nproc,
                              distributed="none" if args.nproc == 1 and engine == "ddp" else engine)
        results[engine] = {"peak_rss": [r["peak_rss"] for r in ranks], "peak_cuda": [r["peak_cuda"] for r in ranks],
                           "tokens_per_s": ranks[0]["tokens_per_s"],
                           "train_loss": ranks[0]["train_loss"], "engine": ranks[0]["engine"],
                           "estimate": est.total + est.offloaded, "wall_s": round(run.wall_s, 1)}
        print(f"   {results[engine]}", flush=True)

    cuda = all(x is not None for r in results.values() for x in r["peak_cuda"])
    rows = [[e, " / ".join(gib(x) for x in r["peak_rss"]), *([" / ".join(gib(x) for x in r["peak_cuda"])] if cuda else []),
             gib(r["estimate"]), f"{r['tokens_per_s']:.1f}", f"{r['train_loss']:.4f}", f"{r['wall_s']:.0f}"]
            for e, r in results.items()]
    print_table(f"{args.shape or args.model} {args.method} fine-tuning, {'bf16' if args.bf16 else 'fp32'}, "
                f"{args.nproc} processes x batch {args.batch} x {args.max_len} tokens, {args.steps} steps ({load_note()})",
                ["engine", "peak RSS per process", *(["peak CUDA per process"] if cuda else []), "estimate per process",
                 "trained tokens/s", "train loss", "wall s"], rows)
    if "ddp" in results and "zero3" in results:
        ratio = max(results["zero3"]["peak_rss"]) / max(results["ddp"]["peak_rss"])
        print(f"ZeRO-3 / DDP peak RSS per process: {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
