"""`sftlab align` (DPO) vs TRL's DPOTrainer run directly, side by side: same model, pairs and settings.

    python bench/align_vs_trl.py                    # embedded model, 12 steps, 3 repeats
    python bench/align_vs_trl.py --model PATH --steps 3 --repeats 1   # smoke run (e.g. a tiny model folder)

The default model is the embedded SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised).
Pairs come from the demo dataset: the reference answer is chosen, another example's answer of the
same task is rejected. Both sides train LoRA (r=16, all linear layers) with the reference = the
model with the adapter disabled, the same learning rate, batch, steps, precision (bf16 where the
CPU supports it) and no gradient checkpointing (TRL turns it on by default; off on both sides here,
like for like), the same base dtype (bf16 under bf16 autocast, as `model.dtype: auto` loads a
LoRA base; fp32 adapters on both sides), AdamW (`adamw_torch`), cosine schedule, seed 0. sftlab
runs `sftlab.train.align.align` (our loader and chat-template rendering, TRL's DPOTrainer on the
token ids); TRL gets the same pairs as conversational prompt/chosen/rejected
records and tokenises them itself.

Each run is its own process. Printed per side, median of `--repeats` runs: seconds per optimizer
step (timed around `trainer.train()`, so the first step's warm-up counts on both sides), peak RSS
of the process, final loss; then the sftlab/TRL ratios. CPU timings on a shared machine are noisy:
the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gib, load_note, print_table, report_result, run_child  # noqa: E402

LR, BETA, BATCH, MAX_LEN = 5e-5, 0.1, 4, 256


def write_pairs(path: Path, n: int) -> Path:
    """n preference pairs from the demo data: reference chosen, a same-task neighbour's answer rejected."""
    import random

    from sftlab.demo.dataset import generate_demo

    records = generate_demo({"train": max(8, n)}, seed=0)["train"]
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    rnd = random.Random(0)
    pairs = []
    for r in records:
        answer = r["messages"][-1]["content"]
        others = [o["messages"][-1]["content"] for o in by_task[r["task"]] if o["messages"][-1]["content"] != answer]
        if others:
            pairs.append({"prompt": r["messages"][:-1], "chosen": answer, "rejected": rnd.choice(others)})
    rnd.shuffle(pairs)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs[:n]))
    return path


def child_sftlab(args) -> None:
    from sftlab.config import AlignConfig, load_config
    from sftlab.train.align import align

    overrides = {"model.name_or_path": args.model, "method": "lora", "data.train": args.pairs,
                 "data.max_seq_length": MAX_LEN, "lora.dropout": 0.0, "align.beta": BETA,
                 "training.learning_rate": LR, "training.per_device_train_batch_size": BATCH,
                 "training.max_steps": args.steps, "training.logging_steps": 1, "training.warmup_ratio": 0.0,
                 "training.save_steps": 100000, "training.bf16": args.bf16, "output_dir": args.out}
    config = load_config(None, [f"{k}={v}" for k, v in overrides.items()], cls=AlignConfig)
    info = align(config, log=lambda *a: None)
    report_result({"seconds": info["train_seconds"], "loss": info["train_loss"]})


def child_trl(args) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from sftlab.models import load_model, load_tokenizer

    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines()]
    data = Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    model = load_model(args.model, dtype="bfloat16" if args.bf16 else "float32")  # the base sftlab loads
    config = DPOConfig(output_dir=args.out, learning_rate=LR, beta=BETA, per_device_train_batch_size=BATCH,
                       max_steps=args.steps, logging_steps=1, warmup_steps=0, save_strategy="no", max_length=MAX_LEN,
                       bf16=args.bf16, gradient_checkpointing=False, use_cpu=True, report_to="none",
                       lr_scheduler_type="cosine", optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, seed=0)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=load_tokenizer(args.model),
                         peft_config=peft)
    t0 = time.perf_counter()
    result = trainer.train()
    report_result({"seconds": time.perf_counter() - t0, "loss": result.training_loss})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="Model folder, run or 'default' (embedded SmolLM2).")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["sftlab", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--bf16", type=lambda s: s == "True", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        (child_sftlab if args.child == "sftlab" else child_trl)(args)
        return

    from sftlab.train.trainer import device_supports_bf16

    bf16 = device_supports_bf16()
    with tempfile.TemporaryDirectory() as tmp:
        pairs = write_pairs(Path(tmp) / "pairs.jsonl", args.steps * BATCH)
        runs: dict[str, list] = {"sftlab": [], "trl": []}
        for i in range(args.repeats):
            for side in runs:  # interleaved, so a burst of load hits both sides alike
                print(f"[{i + 1}/{args.repeats}] {side}", flush=True)
                run = run_child([sys.executable, __file__, "--child", side, "--model", args.model, "--steps",
                                 str(args.steps), "--pairs", str(pairs), "--out", f"{tmp}/{side}-{i}",
                                 "--bf16", str(bf16)], echo=False)
                if run.returncode != 0:
                    sys.exit(f"{side} run failed:\n{run.output[-3000:]}")
                runs[side].append(run)

    def spread(values, fmt):
        return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"

    step = {s: [r.result["seconds"] / args.steps for r in runs[s]] for s in runs}
    rss = {s: [r.peak_rss for r in runs[s]] for s in runs}
    loss = {s: [r.result["loss"] for r in runs[s]] for s in runs}
    ratio = {k: [a / b for a, b in zip(v["sftlab"], v["trl"])] for k, v in (("step", step), ("rss", rss))}
    print_table(f"DPO, LoRA r=16, {args.model}, batch {BATCH} pairs, {args.steps} steps, bf16={bf16}, "
                f"median (range) of {args.repeats}",
                ["", "s/step", "peak RSS", "train loss"],
                [[s, spread(step[s], "{:.2f}".format), spread(rss[s], gib), spread(loss[s], "{:.4f}".format)]
                 for s in runs]
                + [["sftlab / TRL (per round)", spread(ratio["step"], "{:.2f}x".format),
                    spread(ratio["rss"], "{:.2f}x".format), ""]])
    print(load_note())


if __name__ == "__main__":
    main()
