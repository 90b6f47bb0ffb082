"""Backends behind the HTTP server: local engines behind a small batching queue, or Triton.

Batching: requests arriving within `max_wait_ms` of each other (up to `max_batch_size`) are
decoded together in one engine call on a worker thread, so concurrent clients share the
model's forward passes instead of queueing one by one.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sftlab.errors import SftlabError
from sftlab.serve.generation import (GenRequest, IncrementalDecoder, OnnxEngine, StopText, TorchEngine,
                                     stop_token_ids)

BACKENDS = ("torch", "onnx", "triton")


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def _settle(future: asyncio.Future, value=None, error: BaseException | None = None) -> None:
    if future.done():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class BatchingBackend:
    """A local engine (torch or onnx) fed by a batching queue on one worker thread."""

    def __init__(self, engine, *, max_batch_size: int = 8, max_wait_ms: float = 5.0):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.context_length = engine.context_length  # prompt + max_tokens must fit (None: not known)
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="sftlab-batcher", daemon=True)
        self._thread.start()

    async def generate(self, *, ids: list[int], messages=None, prompt=None, tools=None, max_tokens: int,
                       temperature: float, top_p: float, stop: list[str] = (), seed: int | None = None,
                       on_text: Callable[[str], None] | None = None) -> Completion:
        """The completion of one request; `on_text` (called on the worker thread) gets its text as
        it is decoded, cut before the first `stop` string. A request cancelled while it waits
        (its client went away) leaves the engine's batch at the next token."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        decoder, cut = IncrementalDecoder(self.tokenizer), StopText(stop)
        request = GenRequest(ids, max_tokens, temperature, top_p, seed=seed)

        def token(tok: int) -> None:
            piece = cut.feed(decoder.add(tok))
            request.done = cut.hit
            if piece and on_text:
                on_text(piece)

        request.on_token = token
        self._queue.put((request, future, loop))
        try:
            result = await future
        except asyncio.CancelledError:
            request.done = True
            raise
        if (tail := cut.flush()) and on_text:
            on_text(tail)
        return Completion(cut.text, "stop" if cut.hit else result.finish_reason, len(ids),
                          len(result.tokens))

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            batch = [item for item in batch if not item[0].done]  # cancelled while queued
            if not batch:
                continue
            try:
                results = self.engine.generate([req for req, _, _ in batch])
            except Exception as e:  # reported to every waiting request
                for _, fut, loop in batch:
                    loop.call_soon_threadsafe(_settle, fut, None, e)
                continue
            for (_, fut, loop), res in zip(batch, results):
                loop.call_soon_threadsafe(_settle, fut, res)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)


class TritonBackend:
    """Forwards each request to a Triton server running an `sftlab export --to triton` repository;
    Triton's dynamic batcher does the batching."""

    def __init__(self, server, tokenizer, model_name: str):
        import tritonclient.http as httpclient

        self.server, self.tokenizer, self.model_name = server, tokenizer, model_name
        self._http = httpclient
        self._local = threading.local()  # tritonclient's http client (gevent) is not thread-safe

    def _infer(self, inputs, params):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._http.InferenceServerClient(self.server.url, network_timeout=600)
        return client.infer(self.model_name, inputs, parameters=params)

    async def generate(self, *, ids: list[int], messages=None, prompt=None, tools=None, max_tokens: int,
                       temperature: float, top_p: float, stop: list[str] = (), seed: int | None = None,
                       on_text=None) -> Completion:
        """The whole completion from Triton (no token stream): `stop` cuts it afterwards."""
        import numpy as np

        chat = {"messages": messages, "tools": tools} if tools else messages
        text = json.dumps(chat) if messages is not None else prompt
        inp = self._http.InferInput("text", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[text.encode("utf-8")]], dtype=np.object_))
        params = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        if seed is not None:
            params["seed"] = seed
        result = await asyncio.to_thread(self._infer, [inp], params)
        cut = StopText(stop)
        cut.feed(result.as_numpy("text")[0, 0].decode("utf-8"))
        finish = "stop" if cut.hit else result.as_numpy("finish_reason")[0, 0].decode()
        return Completion(cut.text, finish, int(result.as_numpy("prompt_tokens")[0, 0]),
                          int(result.as_numpy("completion_tokens")[0, 0]))

    def close(self) -> None:
        self.server.stop()


def load_backend(source: str, backend: str = "torch", *, max_batch_size: int = 8, max_wait_ms: float = 5.0,
                 precision: str = "fp32", workdir: Path | None = None):
    """A ready backend for SOURCE (run, HF folder, GGUF, `default`, an ONNX export or a Triton repository)."""
    from sftlab.models import load_model, load_tokenizer

    if backend not in BACKENDS:
        raise SftlabError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    path = Path(source).expanduser()
    if backend == "triton":
        from sftlab.serve.triton_server import TritonServer

        repo = path
        if not any(path.glob("*/config.pbtxt")):
            from sftlab.export.triton import export_triton

            repo = Path(workdir or _workdir()) / "triton-repo"
            print("\n".join(export_triton(source, repo).lines()), flush=True)
        name = next(repo.glob("*/config.pbtxt")).parent.name
        tokenizer = load_tokenizer(str(repo / name / "1" / "weights"))
        print("Starting the Triton server ...", flush=True)
        return TritonBackend(TritonServer(repo).start(), tokenizer, name)
    if backend == "onnx":
        onnx_dir = path
        if not (path / "genai_config.json").exists():
            from sftlab.export.onnx import export_onnx

            onnx_dir = Path(workdir or _workdir()) / "onnx"
            print("\n".join(export_onnx(source, onnx_dir, precision=precision).lines()), flush=True)
        engine = OnnxEngine.from_pretrained(onnx_dir)
    else:
        tokenizer = load_tokenizer(source)
        model = load_model(source)
        if hasattr(model, "merge_and_unload"):  # a run's adapter: merge in memory for speed
            model = model.merge_and_unload()
        engine = TorchEngine(model, tokenizer, stop_token_ids(tokenizer, model.generation_config.eos_token_id))
    return BatchingBackend(engine, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)


def _workdir() -> Path:
    import atexit
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="sftlab-serve-"))
    atexit.register(shutil.rmtree, path, True)
    return path
