"""Data preparation: tokenize + mask + pack N conversations, cold and cached, sftlab vs TRL.

    python bench/data_prep_bench.py                 # 50,000 conversations
    python bench/data_prep_bench.py --examples 2000 # smoke run

The data: demo-task conversations of 1 to 3 turns (so lengths and turn counts vary),
OpenAI-messages JSONL. Each measurement runs in a fresh process and times only the
preparation (after imports and the tokenizer load), from the JSONL file to packed rows:

- sftlab: `prepare_examples` (read, validate, render with the chat template, mask every
  assistant turn) + `make_rows` (best-fit-decreasing packing), as `sftlab train` does;
  "cached" is a second run with the same inputs (the render cache).
- TRL: `load_dataset("json")`, messages -> prompt/completion (TRL's documented way to get
  a completion-only loss with a template that has no generation markers: it masks all
  but the last assistant turn, which is less work than sftlab's), then the SFTTrainer's
  own preparation (tokenize, completion mask, BFD packing) run by its constructor with a
  tiny model; "cached" is a second run sharing the `datasets` cache.

Both sides run with TOKENIZERS_PARALLELISM=true (the tokenizers library's default): the
fast tokenizer may use both cores for a batch. sftlab tokenizes in batches, so it does;
TRL's preparation tokenizes one example at a time, so the setting does not change it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gib, load_note, print_table, report_result, run_child  # noqa: E402


def write_conversations(path: Path, n: int, seed: int = 0) -> None:
    """n conversations of 1-3 demo-task turns, each made unique by an index."""
    from sftlab.demo.dataset import TASKS

    rng = random.Random(seed)
    makers = list(TASKS.values())
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            messages = []
            for turn in range(rng.randint(1, 3)):
                item = rng.choice(makers)(rng)
                prompt = f"{item['prompt']}\n(request {i}.{turn})"
                messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": item["answer"]}]
            f.write(json.dumps({"messages": messages}) + "\n")


def prep_sftlab(opts: dict) -> None:
    from sftlab.config import DataConfig
    from sftlab.models import cache_dir, load_tokenizer
    from sftlab.train.dataset import make_rows, prepare_examples

    tokenizer = load_tokenizer(opts["model"])
    data = DataConfig(train=opts["data"], max_seq_length=opts["max_len"], packing=True)
    t0 = time.perf_counter()
    examples, stats = prepare_examples(opts["data"], tokenizer, data, cache_dir() / "tokenized")
    rows = make_rows(examples, data.max_seq_length, packing=True)
    seconds = time.perf_counter() - t0
    report_result({"seconds": seconds, "examples": len(examples), "rows": len(rows), "cached": stats.cached,
                   "tokens": stats.tokens, "trained_tokens": stats.trained_tokens})


def prep_trl(opts: dict) -> None:
    import torch
    from datasets import load_dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from sftlab.models import load_tokenizer

    tokenizer = load_tokenizer(opts["model"])
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = SFTConfig(output_dir=opts["out"], max_length=opts["max_len"], packing=True, report_to="none",
                     use_cpu=not torch.cuda.is_available(), bf16=False)
    t0 = time.perf_counter()
    data = load_dataset("json", data_files=opts["data"], split="train")
    data = data.map(lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
                    remove_columns=data.column_names)
    trainer = SFTTrainer(model=tiny, args=args, train_dataset=data, processing_class=tokenizer)
    seconds = time.perf_counter() - t0
    rows = trainer.train_dataset
    tokens = sum(len(x) for x in rows["input_ids"])
    report_result({"seconds": seconds, "examples": len(data), "rows": len(rows), "tokens": tokens})


def warm_up(opts: dict) -> None:
    """Load the tokenizer once before the timed runs, so that converting the embedded model
    (first use of a fresh SFTLAB_CACHE) counts in no side's time or peak RSS."""
    from sftlab.models import load_tokenizer

    load_tokenizer(opts["model"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=50_000)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--model", default="default", help="whose tokenizer and chat template (default: embedded SmolLM2)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        opts = json.loads(args.child)
        {"sftlab": prep_sftlab, "trl": prep_trl, "warmup": warm_up}[opts["side"]](opts)
        return

    work = Path(tempfile.mkdtemp(prefix="sftlab-prep-"))
    data = work / "conversations.jsonl"
    write_conversations(data, args.examples)
    print(f"data: {data} ({args.examples} conversations, {data.stat().st_size / 1e6:.1f} MB); {load_note()}", flush=True)
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true", "SFTLAB_CACHE": str(work / "sftlab-cache"),
           "HF_DATASETS_CACHE": str(work / "hf-datasets-cache")}
    warm = run_child([sys.executable, __file__, "--child", json.dumps({"side": "warmup", "model": args.model})], env=env)
    if warm.returncode != 0:
        raise SystemExit("loading the tokenizer failed")
    results: dict[str, dict] = {}
    for side in ("sftlab", "trl"):
        for phase in ("cold", "cached"):
            opts = {"side": side, "data": str(data), "max_len": args.max_len, "model": args.model, "out": str(work / "trl-out")}
            run = run_child([sys.executable, __file__, "--child", json.dumps(opts)], env=env, echo=False)
            if run.returncode != 0:
                print(run.output[-4000:])
                raise SystemExit(f"{side} {phase} failed")
            results[f"{side} {phase}"] = {**run.result, "peak_rss": run.peak_rss}
            print(f"{side} {phase}: {run.result['seconds']:.2f} s", flush=True)
    rows = [[name, f"{r['seconds']:.2f}", str(r["examples"]), str(r["rows"]), str(r["tokens"]), gib(r["peak_rss"])]
            for name, r in results.items()]
    print_table(f"tokenize + mask + pack {args.examples:,} conversations (max_len {args.max_len})",
                ["", "seconds", "examples", "packed rows", "tokens", "peak RSS"], rows)
    cold = results["trl cold"]["seconds"] / results["sftlab cold"]["seconds"]
    cached = results["trl cached"]["seconds"] / results["sftlab cached"]["seconds"]
    print(f"sftlab is {cold:.1f}x faster than TRL cold, {cached:.1f}x cached "
          f"(sftlab cached: {results['sftlab cached']['seconds']:.2f} s). {load_note()}")


if __name__ == "__main__":
    main()
