"""Batched generation (sftlab.evaluation.generate) vs plain HF `generate` one prompt at a time.

Same model (the embedded SmolLM2-135M-Instruct: Q4_1 GGUF, dequantised), same prompts, same
greedy decoding and stop tokens, same run. Prints both throughputs (generated tokens/s) and their ratio; the
goal is >= 4x. Also reports how many answers are identical (left padding can flip a
near-tied greedy choice in a real model, so equality is reported, not assumed).

    .venv/bin/python bench/generate_bench.py [--n 64] [--batch-size 16] [--max-new-tokens 32] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_note, print_table  # noqa: E402

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def prompts(n: int) -> list[list[dict]]:
    """Short instruction prompts of varied length, like an evaluation split."""
    kinds = [
        lambda i: f"Convert this date to ISO format: {MONTHS[i % 12]} {i % 28 + 1}, {1990 + i % 30}",
        lambda i: f"Is the number {i * 7 + 3} even or odd? Answer with one word.",
        lambda i: f"Classify the sentiment of this review as positive or negative: "
                  f"'{'I loved it, great acting' if i % 2 else 'Boring plot and bad sound'} (review {i})'",
        lambda i: f"Rewrite politely: give me the report number {i} now.",
        lambda i: f"Name the capital city of the country with this ISO code: {['FR', 'DE', 'JP', 'BR', 'IN'][i % 5]}. "
                  f"Reply with the city only.",
    ]
    return [[{"role": "user", "content": kinds[i % len(kinds)](i)}] for i in range(n)]


def one_by_one(model, tokenizer, batch, max_new_tokens, stops):
    """What a user writes without sftlab: apply the template, generate, decode, per prompt."""
    import torch

    answers, tokens = [], 0
    with torch.inference_mode():
        for messages in batch:
            enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id)
            new = out[0, enc["input_ids"].shape[1]:].tolist()
            new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
            tokens += len(new)
            answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from sftlab.evaluation.generate import generate_ids, stop_token_ids
    from sftlab.models import load_model, load_tokenizer

    model, tokenizer = load_model(args.model).eval(), load_tokenizer(args.model)
    stops = stop_token_ids(tokenizer, model)
    batch = prompts(args.n)
    print(f"{args.n} prompts, max_new_tokens={args.max_new_tokens}, batch size {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}; {load_note()}")

    generate_ids(model, tokenizer, batch[:2], max_new_tokens=4, progress=False)  # warm-up
    t0 = time.perf_counter()
    ids = generate_ids(model, tokenizer, batch, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       progress=False)
    batched_s = time.perf_counter() - t0
    batched = [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
    batched_tokens = sum(len(x) for x in ids)

    t0 = time.perf_counter()
    single, single_tokens = one_by_one(model, tokenizer, batch, args.max_new_tokens, stops)
    single_s = time.perf_counter() - t0

    same = sum(a == b for a, b in zip(batched, single))
    rows = [
        ["HF generate, one prompt at a time", f"{single_s:.1f}", str(single_tokens), f"{single_tokens / single_s:.1f}"],
        [f"sftlab generate_batch (batch {args.batch_size})", f"{batched_s:.1f}", str(batched_tokens),
         f"{batched_tokens / batched_s:.1f}"],
    ]
    print_table("Greedy generation, same prompts, same run", ["method", "seconds", "new tokens", "tokens/s"], rows)
    print(f"speed-up (prompts/s): {single_s / batched_s:.2f}x   "
          f"(tokens/s: {(batched_tokens / batched_s) / (single_tokens / single_s):.2f}x)   "
          f"identical answers: {same}/{args.n}   {load_note()}")


if __name__ == "__main__":
    main()
