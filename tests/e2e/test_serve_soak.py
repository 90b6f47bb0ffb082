"""Soak: 32 concurrent clients against a real `sftlab serve` process (tiny model) for
SFTLAB_SOAK_SECONDS (default 10), with malformed and oversized requests mixed into the good
ones. Every good request is answered correctly (the same prompt always gets the same greedy
answer), every bad one gets its 4xx, and the server's memory stays bounded."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

KEY = "soak-key"
CLIENTS = 32
MAX_BODY = 20_000
PROMPTS = ["What is 2 plus 2?", "Name a colour.", "Say hello.", "Count to three."]
MAX_GROWTH = 64 * 2**20  # bytes of RSS growth allowed after warm-up


def _chat(content: str, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 6, **extra}


async def _chunked(total: int):
    for _ in range(3):
        yield b"x" * (total // 3)


# kind -> (weight, expected status)
KINDS = {"chat": (8, 200), "stream": (3, 200), "completion": (3, 200), "bad_json": (1, 400), "bad_role": (1, 400),
         "deep_json": (1, 400), "surrogate": (1, 400), "too_long_prompt": (1, 400), "too_many_tokens": (1, 400),
         "no_key": (1, 401), "huge_declared": (1, 413), "huge_chunked": (1, 413)}


async def _one(client: httpx.AsyncClient, kind: str, rng: random.Random):
    """(status, the answer text for good requests, or None)."""
    prompt = rng.choice(PROMPTS)
    url = "/v1/chat/completions"
    if kind == "chat":
        r = await client.post(url, json=_chat(prompt))
        return r.status_code, (prompt, r.json()["choices"][0]["message"]["content"]) if r.status_code == 200 else None
    if kind == "stream":
        r = await client.post(url, json=_chat(prompt, stream=True))
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), r.text[-300:]
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
        return r.status_code, (prompt, text)
    if kind == "completion":
        r = await client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 6})
        return r.status_code, None
    if kind == "bad_json":
        r = await client.post(url, content=b'{"messages": [{"role": "user", "content": ',
                              headers={"Content-Type": "application/json"})
    elif kind == "deep_json":
        r = await client.post(url, content=b"[" * 10_000, headers={"Content-Type": "application/json"})  # < MAX_BODY
    elif kind == "surrogate":
        r = await client.post(url, content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                              headers={"Content-Type": "application/json"})
    elif kind == "bad_role":
        r = await client.post(url, json={"messages": [{"role": "wizard", "content": prompt}]})
    elif kind == "too_long_prompt":
        r = await client.post(url, json=_chat("word " * 300))
    elif kind == "too_many_tokens":
        r = await client.post(url, json=_chat(prompt, max_tokens=10_000))
    elif kind == "no_key":
        r = await client.post(url, json=_chat(prompt), headers={"Authorization": "Bearer wrong"})
    elif kind == "huge_declared":
        r = await client.post(url, content=b"x" * (MAX_BODY + 10_000))
    else:
        r = await client.post(url, content=_chunked(MAX_BODY + 4_000))
    assert "error" in r.json(), r.text[:200]  # OpenAI's error shape
    return r.status_code, None


def _start_server(model_dir: Path, tmp_path: Path, port: int) -> subprocess.Popen:
    (tmp_path / "key").write_text(KEY)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    env.pop("SFTLAB_API_KEY", None)
    cmd = [sys.executable, "-m", "sftlab.cli", "serve", str(model_dir), "--port", str(port), "--api-key-file",
           str(tmp_path / "key"), "--max-body-bytes", str(MAX_BODY), "--max-prompt-tokens", "64",
           "--max-tokens-limit", "32", "--max-concurrent", "64", "--model-name", "tiny"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"))


def _wait_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            httpx.get(url + "/health")
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("the server did not start")


async def _soak(url: str, seconds: float, pid: int) -> dict:
    server = psutil.Process(pid)
    kinds, weights = list(KINDS), [w for w, _ in KINDS.values()]
    counts: Counter = Counter()
    errors: list[str] = []
    answers: dict[str, set[str]] = {}
    rss = {"warm": None, "max": 0}
    warm_at = time.monotonic() + min(3.0, seconds / 4)
    end = time.monotonic() + seconds

    async def client(i: int):
        rng = random.Random(i)
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            while time.monotonic() < end:
                kind = rng.choices(kinds, weights)[0]
                try:
                    status, answer = await _one(c, kind, rng)
                except Exception as e:  # any transport error or broken body is a failure
                    errors.append(f"{kind}: {type(e).__name__}: {e}")
                    continue
                counts[kind] += 1
                if status != KINDS[kind][1]:
                    errors.append(f"{kind}: status {status}, expected {KINDS[kind][1]}")
                if answer:
                    answers.setdefault(answer[0], set()).add(answer[1])

    async def sample():
        while time.monotonic() < end:
            now = server.memory_info().rss
            rss["max"] = max(rss["max"], now)
            if rss["warm"] is None and time.monotonic() >= warm_at:
                rss["warm"] = now
            await asyncio.sleep(0.25)

    await asyncio.gather(sample(), *[client(i) for i in range(CLIENTS)])
    return {"counts": counts, "errors": errors, "answers": answers, "rss_warm": rss["warm"],
            "rss_end": server.memory_info().rss, "rss_max": rss["max"]}


def test_soak_32_clients_with_bad_requests_mixed_in(tiny_model_dir, tmp_path):
    from sftlab.serve.triton_server import free_port

    seconds = float(os.environ.get("SFTLAB_SOAK_SECONDS", "10"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_server(tiny_model_dir, tmp_path, port)
    try:
        _wait_up(proc, url, tmp_path / "server.log")
        start = time.monotonic()
        result = asyncio.run(_soak(url, seconds, proc.pid))
        took = time.monotonic() - start
        assert proc.poll() is None, "the server died"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    counts, errors = result["counts"], result["errors"]
    good = sum(n for k, n in counts.items() if KINDS[k][1] == 200)
    growth = result["rss_end"] - result["rss_warm"]
    print(f"\nsoak: {seconds:g} s ({took:.1f} s), {CLIENTS} clients, {sum(counts.values())} requests "
          f"({good} good, {sum(counts.values()) - good} bad: {dict(counts)}), {len(errors)} errors; "
          f"server RSS warm {result['rss_warm'] / 2**20:.1f} MiB, end {result['rss_end'] / 2**20:.1f} MiB, "
          f"max {result['rss_max'] / 2**20:.1f} MiB, growth {growth / 2**20:+.1f} MiB")
    assert errors == [], errors[:10]
    assert all(counts[k] > 0 for k in KINDS), counts  # every kind was really tried
    assert all(len(texts) == 1 for texts in result["answers"].values()), result["answers"]
    assert growth < MAX_GROWTH, f"server RSS grew {growth / 2**20:.1f} MiB"
