"""Continuous vs static batching in `sftlab serve`'s torch backend, side by side in one run.

    .venv/bin/python bench/serve_batching.py [--runs 3] [--threads 1] [--model default]
        [--long 3] [--long-tokens 96] [--short-tokens 8] [--requests 16] [--max-batch-size 8] [--no-check]

Both modes run on one model (SmolLM2-135M-Instruct by default, fp32) through `BatchingBackend` in-process
(no HTTP), taking turns within each run, on two workloads. A third column, "static, rows kept", is the
static engine as it was before continuous batching: a finished request's row stayed in the batch's
forward passes until the batch's longest reply ended (now static batching drops it too).

1. short behind long: --long requests of --long-tokens are sent; once each has streamed its first text,
   one short request of --short-tokens is sent. Reported: the short request's time to first token (its
   first streamed text) and total time, and the wall time until every request is answered.
2. throughput: --requests requests sent at once, max_tokens spread evenly from 8 to 128 (in a fixed
   shuffled order); completion tokens per second of wall time, and the mean time to each answer.

Greedy, and the engine's stop tokens are cleared so each reply has exactly its max_tokens: the work is
the same in both modes whatever the model writes. Every reply's text is compared with the same request
decoded alone (`TorchEngine.generate` of one request): "identical" means batching changed no token.
Median and range (min-max) over --runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time

TOPICS = ["cooking", "chess", "gardening", "running", "painting", "sleep", "saving money", "learning French",
          "public speaking", "writing", "photography", "swimming", "baking bread", "hiking", "music", "coding"]


def prompts(tokenizer, n: int, what: str) -> list[list[int]]:
    from sftlab.serve.generation import encode

    return [encode(tokenizer, messages=[{"role": "user", "content": f"{what} number {i + 1} about {TOPICS[i % 16]}."}])
            for i in range(n)]


async def short_behind_long(backend, longs, short, long_tokens: int, short_tokens: int) -> dict:
    loop = asyncio.get_running_loop()
    started = [asyncio.Event() for _ in longs]
    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(backend.generate(ids=ids, max_tokens=long_tokens, temperature=0.0, top_p=1.0,
                                                    on_text=lambda _, e=e: loop.call_soon_threadsafe(e.set)))
             for ids, e in zip(longs, started)]
    await asyncio.gather(*(e.wait() for e in started))
    first: list[float] = []
    t1 = time.perf_counter()
    out = await backend.generate(ids=short, max_tokens=short_tokens, temperature=0.0, top_p=1.0,
                                 on_text=lambda _: first or first.append(time.perf_counter()))  # worker thread
    t2 = time.perf_counter()
    long_outs = await asyncio.gather(*tasks)
    t3 = time.perf_counter()
    return {"ttft": first[0] - t1, "short": t2 - t1, "all": t3 - t0, "texts": [out.text] + [o.text for o in long_outs],
            "tokens": [out.completion_tokens] + [o.completion_tokens for o in long_outs]}


async def throughput(backend, ids_list, lengths) -> dict:
    t0 = time.perf_counter()
    latencies = []

    async def one(ids, n):
        out = await backend.generate(ids=ids, max_tokens=n, temperature=0.0, top_p=1.0)
        latencies.append(time.perf_counter() - t0)
        return out

    outs = await asyncio.gather(*(one(ids, n) for ids, n in zip(ids_list, lengths)))
    wall = time.perf_counter() - t0
    return {"tok_s": sum(o.completion_tokens for o in outs) / wall, "wall": wall,
            "latency": statistics.mean(latencies), "texts": [o.text for o in outs],
            "tokens": [o.completion_tokens for o in outs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="default")
    ap.add_argument("--long", type=int, default=3)
    ap.add_argument("--long-tokens", type=int, default=96)
    ap.add_argument("--short-tokens", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--no-check", action="store_true", help="skip decoding every request alone")
    ap.add_argument("--no-rows-kept", action="store_true", help="leave out the 'static, rows kept' column")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from sftlab.models import load_model, load_tokenizer
    from sftlab.serve.backends import BatchingBackend
    from sftlab.serve.generation import GenRequest, TorchEngine

    class RowsKept(TorchEngine):  # the static engine before continuous batching: finished rows ride along
        def prefill(self, requests):
            decoding = super().prefill(requests)
            decoding.joinable = False
            return decoding

    tokenizer = load_tokenizer(args.model)
    engine = TorchEngine(load_model(args.model), tokenizer, [tokenizer.eos_token_id])
    kept = RowsKept(engine.model, tokenizer, [tokenizer.eos_token_id])
    engine.stop_ids = kept.stop_ids = set()  # every reply runs to its max_tokens
    longs, (short,) = prompts(tokenizer, args.long, "Write a long essay"), prompts(tokenizer, 1, "Give one word")
    many = prompts(tokenizer, args.requests, "Give me tip")
    lengths = [8 + round(i * 120 / max(args.requests - 1, 1)) for i in range(args.requests)]
    random.Random(0).shuffle(lengths)
    load = [os.getloadavg()[0]]

    backends = {mode: BatchingBackend(engine, batching=mode, max_batch_size=args.max_batch_size)
                for mode in ("static", "continuous")}
    if not args.no_rows_kept:
        backends = {"static, rows kept": BatchingBackend(kept, batching="static", max_batch_size=args.max_batch_size),
                    **backends}
    for backend in backends.values():  # warm-up
        asyncio.run(throughput(backend, many[:2], [4, 4]))
    rows: dict[str, dict[str, list]] = {mode: {} for mode in backends}
    seen: dict[str, list] = {mode: [] for mode in backends}
    for run in range(args.runs):
        for mode, backend in backends.items():
            a = asyncio.run(short_behind_long(backend, longs, short, args.long_tokens, args.short_tokens))
            b = asyncio.run(throughput(backend, many, lengths))
            for key, value in [("ttft", a["ttft"]), ("short", a["short"]), ("all", a["all"]), ("tok_s", b["tok_s"]),
                               ("wall", b["wall"]), ("latency", b["latency"])]:
                rows[mode].setdefault(key, []).append(value)
            assert a["tokens"] == [args.short_tokens] + [args.long_tokens] * args.long and b["tokens"] == lengths
            seen[mode].append(a["texts"] + b["texts"])
            print(f"run {run + 1} {mode:17s} short behind long: ttft {a['ttft']:.2f} s, short {a['short']:.2f} s, "
                  f"all {a['all']:.2f} s | {args.requests} requests: {b['tok_s']:.1f} tok/s, wall {b['wall']:.2f} s, "
                  f"mean latency {b['latency']:.2f} s", flush=True)
    for backend in backends.values():
        backend.close()
    load.append(os.getloadavg()[0])

    check = ""
    if not args.no_check:
        alone = [tokenizer.decode(engine.generate([GenRequest(ids, n)])[0].tokens, skip_special_tokens=True)
                 for ids, n in [(short, args.short_tokens), *[(ids, args.long_tokens) for ids in longs],
                                *zip(many, lengths)]]
        check = ", ".join(f"{mode}: {sum(t == r for texts in seen[mode] for t, r in zip(texts, alone))}/"
                          f"{len(alone) * args.runs} replies identical to the request decoded alone"
                          for mode in backends)

    def cell(values, fmt):
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"

    print(f"\n{args.model}, fp32, {args.threads} thread(s), max_batch_size {args.max_batch_size}, {args.runs} runs: "
          f"median (min–max); load average {load[0]:.1f} → {load[1]:.1f}")
    print(f"short behind long: {args.long} × {args.long_tokens} tokens, then 1 × {args.short_tokens}; "
          f"throughput: {args.requests} requests at once, max_tokens 8..128 ({sum(lengths)} tokens)\n")
    print("| batching | short: first token s | short: total s | all answered s | tok/s | wall s | mean latency s |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {cell(r['ttft'], '{:.2f}')} | {cell(r['short'], '{:.2f}')} | {cell(r['all'], '{:.2f}')} "
              f"| {cell(r['tok_s'], '{:.1f}')} | {cell(r['wall'], '{:.2f}')} | {cell(r['latency'], '{:.2f}')} |")
    if check:
        print(f"\n{check}")


if __name__ == "__main__":
    main()
