"""Data preparation: tokenize + mask + pack N conversations, cold and cached, sftlab vs TRL.

    python bench/data_prep_bench.py                 # 10,000 conversations, 3 rounds (~15 min on a busy 2-core CPU)
    python bench/data_prep_bench.py --examples 2000 --repeats 1   # smoke run

The data: demo-task conversations of 1 to 3 turns (so lengths and turn counts vary),
OpenAI-messages JSONL. Each measurement runs in a fresh process and times the same work on
both sides, from the JSONL file to packed rows of token ids and labels (after imports and the
tokenizer load):

- sftlab: `prepare_examples` (read, validate, render with the chat template, mask every
  assistant turn) + `make_rows` (best-fit-decreasing packing), as `sftlab train` does. One
  process: the chat template is rendered in Python while a worker thread runs the Rust
  tokenizer on the previous chunk (which may use both cores).
- TRL 1.16: `load_dataset("json")`, messages -> prompt/completion (TRL's documented way to get
  a completion-only loss with a template that has no generation markers: it masks all but
  the last assistant turn, which is less work than sftlab's), then the SFTTrainer's own
  preparation (chat template, tokenize, completion mask, labels, BFD packing). TRL has no
  public function for that preparation alone, so it is timed as SFTTrainer construction
  minus the same construction with `dataset_kwargs={"skip_prepare_dataset": True}` (its
  public switch to skip it), both after a warm-up construction in the same process. It runs
  with `dataset_num_proc` (`--trl-num-proc`) = None (TRL's default: `datasets` maps in the
  calling process, as sftlab does), = 1 (`datasets` 5 then runs the map in one worker
  process, with TOKENIZERS_PARALLELISM turned off there) and = the number of CPUs (what a
  user would give it to use every core).

"cached" is a second process with the same inputs: sftlab's render cache, TRL's `datasets`
cache. Every round starts from empty caches. Both sides run with TOKENIZERS_PARALLELISM=true
(the tokenizers library's default). The summary gives the median and range over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_note, print_table, report_result, run_child, scratch_dir  # noqa: E402
from train_vs_trl import load_messages_as_prompt_completion  # noqa: E402


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
    from sftlab.models import load_tokenizer
    from sftlab.train.dataset import make_rows, prepare_examples

    tokenizer = load_tokenizer(opts["model"])
    data = DataConfig(train=opts["data"], max_seq_length=opts["max_len"], packing=True)
    t0 = time.perf_counter()
    examples, stats = prepare_examples(opts["data"], tokenizer, data, Path(opts["cache"]))
    rows = make_rows(examples, data.max_seq_length, packing=True)
    seconds = time.perf_counter() - t0
    tokens = sum(len(e) for row in rows for e in row)
    report_result({"seconds": seconds, "examples": len(examples), "rows": len(rows), "cached": stats.cached,
                   "tokens": tokens, "processes": 1})


def prep_trl(opts: dict) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from sftlab.models import load_tokenizer

    tokenizer = load_tokenizer(opts["model"])
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))

    def construct(data, skip: bool) -> tuple[float, SFTTrainer]:
        args = SFTConfig(output_dir=opts["out"], max_length=opts["max_len"], packing=True, report_to="none",
                         use_cpu=not torch.cuda.is_available(), bf16=False, dataset_num_proc=opts["num_proc"],
                         dataset_kwargs={"skip_prepare_dataset": True} if skip else None)
        t = time.perf_counter()
        trainer = SFTTrainer(model=tiny, args=args, train_dataset=data, processing_class=tokenizer)
        return time.perf_counter() - t, trainer

    t0 = time.perf_counter()
    data = load_messages_as_prompt_completion(opts["data"])
    read = time.perf_counter() - t0
    construct(data, skip=True)  # warm-up: first construction pays one-off set-up costs
    base, _ = construct(data, skip=True)
    full, trainer = construct(data, skip=False)
    rows = trainer.train_dataset
    tokens = sum(len(x) for x in rows["input_ids"])
    report_result({"seconds": read + full - base, "read": read, "construct": full, "construct_skip": base,
                   "examples": len(data), "rows": len(rows), "tokens": tokens, "processes": opts["num_proc"] or 1})


def warm_up(opts: dict) -> None:
    """Load the tokenizer once before the timed runs, so that converting the embedded model
    (first use of a fresh SFTLAB_CACHE) counts in no side's time or peak RSS."""
    from sftlab.models import load_tokenizer

    load_tokenizer(opts["model"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3, help="rounds, each from empty caches")
    ap.add_argument("--trl-num-proc", default=f"none,1,{os.cpu_count()}",
                    help="TRL dataset_num_proc values to run, comma-separated: none (TRL's default, in its own "
                         "process), 1, the number of CPUs")
    ap.add_argument("--model", default="default", help="whose tokenizer and chat template (default: embedded SmolLM2)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        opts = json.loads(args.child)
        {"sftlab": prep_sftlab, "trl": prep_trl, "warmup": warm_up}[opts["side"]](opts)
        return

    work = scratch_dir("sftlab-prep-")
    data = work / "conversations.jsonl"
    write_conversations(data, args.examples)
    print(f"data: {data} ({args.examples} conversations, {data.stat().st_size / 1e6:.1f} MB); {load_note()}", flush=True)
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true", "SFTLAB_CACHE": str(work / "sftlab-cache")}
    warm = run_child([sys.executable, __file__, "--child", json.dumps({"side": "warmup", "model": args.model})], env=env)
    if warm.returncode != 0:
        raise SystemExit("loading the tokenizer failed")
    setups = [("sftlab", "-")] + [(f"trl num_proc={n.strip()}", None if n.strip() == "none" else int(n))
                                  for n in args.trl_num_proc.split(",") if n.strip()]
    results: dict[str, list[dict]] = {}
    failed: list[str] = []
    for rnd in range(args.repeats):
        for name, num_proc in setups:
            cache = work / f"cache-{rnd}-{name.replace(' ', '_')}"  # empty for each round's cold run
            for phase in ("cold", "cached"):
                opts = {"side": "sftlab" if num_proc == "-" else "trl", "data": str(data), "max_len": args.max_len,
                        "model": args.model, "out": str(work / "trl-out"), "num_proc": num_proc, "cache": str(cache)}
                run = run_child([sys.executable, __file__, "--child", json.dumps(opts)],
                                env={**env, "HF_DATASETS_CACHE": str(cache)}, echo=False)
                if run.returncode != 0:
                    print(run.output[-4000:])
                    print(f"round {rnd + 1} {name} {phase} failed (exit {run.returncode}); going on", flush=True)
                    failed.append(f"{name} {phase}#{rnd + 1}")
                    continue
                results.setdefault(f"{name} {phase}", []).append({**run.result, "peak_rss": run.peak_rss, "round": rnd})
                extra = (f" (read {run.result['read']:.2f} + construct {run.result['construct']:.2f} "
                         f"- construct without preparation {run.result['construct_skip']:.2f})") if num_proc != "-" else ""
                print(f"round {rnd + 1}/{args.repeats} {name} {phase}: {run.result['seconds']:.2f} s{extra}; {load_note()}",
                      flush=True)

    def spread(values: list[float], fmt: str) -> str:
        med = statistics.median(values)
        return f"{med:{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})" if len(values) > 1 else format(med, fmt)

    rows = [[name, spread([r["seconds"] for r in rs], ".2f"), str(rs[0]["processes"]), str(rs[0]["examples"]),
             str(rs[0]["rows"]), str(rs[0]["tokens"]), spread([r["peak_rss"] / 1024**3 for r in rs], ".2f")]
            for name, rs in results.items()]
    print_table(f"tokenize + mask + pack {args.examples:,} conversations (max_len {args.max_len}), "
                f"median (min–max) over {args.repeats} rounds",
                ["", "seconds", "working processes", "examples", "packed rows", "tokens", "peak RSS (GiB)"], rows)
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in results.items()}
    for name, _ in setups[1:]:
        for phase in ("cold", "cached"):
            mine, theirs = results.get(f"sftlab {phase}"), results.get(f"{name} {phase}")
            if not mine or not theirs:
                continue
            by_round = {r["round"]: r["seconds"] for r in mine}
            paired = [t["seconds"] / by_round[t["round"]] for t in theirs if t["round"] in by_round]
            print(f"{name} {phase} / sftlab {phase}: x{median[f'{name} {phase}'] / median[f'sftlab {phase}']:.2f} "
                  f"(per round {min(paired):.2f}–{max(paired):.2f})")
    print(load_note() + " (other processes on the machine make timings noisy)")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
