"""Check `sftlab estimate` against the real peak RSS of a few training steps on CPU.

    python bench/estimate_check.py                      # tiny model + SmolLM2-135M, several setups
    python bench/estimate_check.py --model default --only lora-fp32

Each setup builds the model with sftlab's own `build_model` and trains `--steps`
optimizer steps with sftlab's loss on random tokens (half of each row trained) in its own
child process; the kernel's peak RSS of that child is compared with
`estimate_memory(...).total`. Goal: within +-25 %. Each child runs twice: with glibc's
default malloc and with a fixed 1 MiB mmap threshold (freed blocks go back to the OS).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gib, load_note, print_table, report_result, run_child  # noqa: E402

# name -> estimate_memory options (loss "selective" = sftlab's loss, "full" = plain HF logits)
SETUPS = {
    "full-fp32": dict(method="full", dtype="fp32"),
    "full-bf16": dict(method="full", dtype="bf16"),
    "lora-fp32": dict(method="lora", dtype="fp32"),
    "lora-bf16": dict(method="lora", dtype="bf16"),
    "lora-bf16-gc": dict(method="lora", dtype="bf16", gradient_checkpointing=True),
    "lora-bf16-hf-loss": dict(method="lora", dtype="bf16", loss="full"),
    "qlora-bf16": dict(method="qlora", dtype="bf16"),
}
# glibc's default malloc raises its mmap threshold as large blocks are freed and then keeps
# freed activations in its heap; a fixed threshold returns them to the OS.
ALLOCATORS = {"glibc": {}, "mmap-1MiB": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}}


def train_steps(opts: dict) -> None:
    """Child: build the model exactly as `sftlab train` does, train a few steps on random tokens."""
    import torch

    from sftlab.config import TrainConfig
    from sftlab.train.loss import selective_loss_sum
    from sftlab.train.trainer import build_model

    torch.manual_seed(0)
    autocast = opts["dtype"] == "bf16"
    config = TrainConfig.model_validate({
        "model": {"name_or_path": opts["model"], "attn_implementation": "sdpa"},
        "data": {"train": "unused.jsonl"},
        "method": opts["method"],
        "lora": {"r": opts["lora_r"], "alpha": 2 * opts["lora_r"], "dropout": opts["lora_dropout"]},
        "training": {"gradient_checkpointing": opts.get("gradient_checkpointing", False)},
    })
    model = build_model(config, autocast)
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vocab = model.config.vocab_size
    batch, seq = opts["batch"], opts["seq_len"]
    for _ in range(opts["steps"]):
        ids = torch.randint(0, vocab, (batch, seq))
        labels = ids.clone()
        labels[:, : seq // 2] = -100  # the second half of each row is trained
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if opts.get("loss") == "full":
                loss = model(input_ids=ids, labels=labels, use_cache=False).loss
            else:
                loss_sum, n = selective_loss_sum(model, {"input_ids": ids, "labels": labels})
                loss = loss_sum / n
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
    report_result({"loss": loss.item()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="model(s) to check (default: tiny random Llama and 'default')")
    ap.add_argument("--only", action="append", choices=sorted(SETUPS), help="setups to run (default: all)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--allocator", action="append", choices=sorted(ALLOCATORS), help="malloc setting(s) to measure under (default: both)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        train_steps(json.loads(args.child))
        return

    from sftlab.estimate import estimate_memory

    models = args.model or [str(_tiny_model()), "default"]
    rows = []
    for model in models:
        for name in args.only or SETUPS:
            setup = SETUPS[name]
            opts = dict(setup, model=model, batch=args.batch, seq_len=args.seq_len, steps=args.steps,
                        lora_r=args.lora_r, lora_dropout=args.lora_dropout)
            est = estimate_memory(model, setup["method"], args.seq_len, args.batch, lora_r=args.lora_r,
                                  lora_dropout=args.lora_dropout, dtype=setup["dtype"], loss=setup.get("loss", "selective"),
                                  gradient_checkpointing=setup.get("gradient_checkpointing", False))
            row = [Path(model).name, name, gib(est.total)]
            for alloc in args.allocator or ALLOCATORS:
                run = run_child([sys.executable, __file__, "--child", json.dumps(opts)],
                                env={"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", **ALLOCATORS[alloc]}, echo=False)
                if run.returncode != 0:
                    print(run.output[-3000:])
                    raise SystemExit(f"{name} failed")
                row += [gib(run.peak_rss), f"{est.total / run.peak_rss - 1:+.0%}"]
            print("  ".join(row), flush=True)
            rows.append(row)
    columns = ["model", "setup", "estimate"]
    for alloc in args.allocator or ALLOCATORS:
        columns += [f"measured ({alloc})", "error"]
    print_table(f"estimate vs measured peak RSS, batch {args.batch} x {args.seq_len}, {args.steps} steps", columns, rows)
    print(load_note())


def _tiny_model() -> Path:
    """The test suite's tiny random Llama (hidden 64, 2 layers) with SmolLM2's tokenizer."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import TOKENIZER_DIR, make_tiny_llama
    from transformers import AutoTokenizer

    out = Path(tempfile.gettempdir()) / f"sftlab-bench-tiny-{os.getuid()}"
    if not (out / "config.json").exists():
        out.mkdir(exist_ok=True)
        make_tiny_llama(out, AutoTokenizer.from_pretrained(TOKENIZER_DIR))
    return out


if __name__ == "__main__":
    main()
