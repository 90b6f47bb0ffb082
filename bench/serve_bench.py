"""Server throughput and latency for each backend at 1, 8 and 32 concurrent clients.

    python bench/serve_bench.py [--backends torch onnx triton] [--max-tokens 32] [--model default]
                                [--onnx-dir bench/.cache/onnx/fp32] [--threads 1]

The onnx backend serves --onnx-dir when it exists (bench/onnx_bench.py builds it), else
exports the model first. Every engine gets --threads CPU threads.

Starts `sftlab serve`'s app in-process on 127.0.0.1 for each backend, fires chat requests
from N concurrent clients (N requests per level, at least 8), and reports requests/s,
completion tokens/s, and p50/p95 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time


def start(backend):
    import uvicorn

    from sftlab.serve.openai_api import Limits, create_app
    from sftlab.serve.triton_server import free_port

    port = free_port()
    app = create_app(backend, "bench", limits=Limits(max_tokens_limit=1024))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


async def level(url: str, clients: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    n = max(clients, 8)
    latencies, tokens = [], []
    sem = asyncio.Semaphore(clients)

    async def one(i: int):
        async with sem:
            t = time.perf_counter()
            r = await client.chat.completions.create(
                model="bench", max_tokens=max_tokens, temperature=0,
                messages=[{"role": "user", "content": f"Give me tip number {i} for learning to cook."}])
            latencies.append(time.perf_counter() - t)
            tokens.append(r.usage.completion_tokens)

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t
    await client.close()
    q = statistics.quantiles(latencies, n=20)
    return {"clients": clients, "requests": n, "req_s": n / wall, "tok_s": sum(tokens) / wall,
            "p50": statistics.median(latencies), "p95": q[18]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="+", default=["torch", "onnx", "triton"])
    ap.add_argument("--levels", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default="default")
    ap.add_argument("--onnx-dir", default="bench/.cache/onnx/fp32")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import os
    from pathlib import Path

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # also read by the Triton Python-backend process
    import torch

    torch.set_num_threads(args.threads)
    from sftlab.serve.backends import load_backend

    rows = []
    for name in args.backends:
        source = args.model
        if name == "onnx" and (Path(args.onnx_dir) / "genai_config.json").exists():
            source = args.onnx_dir
            from onnx_bench import set_onnx_threads

            set_onnx_threads(Path(source), args.threads)
        backend = load_backend(source, name, max_batch_size=8, max_wait_ms=5)
        server, url = start(backend)
        asyncio.run(level(url, 1, 4))  # warm-up
        for clients in args.levels:
            row = {"backend": name, **asyncio.run(level(url, clients, args.max_tokens))}
            print(row, flush=True)
            rows.append(row)
        server.should_exit = True
        backend.close()
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), chat requests, max_tokens={args.max_tokens}, "
          f"greedy, server on 127.0.0.1, {args.threads} thread(s)")
    print(f"{'backend':8s} {'clients':>7s} {'requests':>8s} {'req/s':>7s} {'tok/s':>7s} {'p50 s':>7s} {'p95 s':>7s}")
    for r in rows:
        print(f"{r['backend']:8s} {r['clients']:7d} {r['requests']:8d} {r['req_s']:7.2f} {r['tok_s']:7.1f} "
              f"{r['p50']:7.2f} {r['p95']:7.2f}")


if __name__ == "__main__":
    main()
