"""Backends behind the HTTP server: local engines behind a batching queue, or Triton.

Batching, on one worker thread, so concurrent clients share the model's forward passes:
- continuous (the torch engine, on a model whose KV cache is plain full attention): between two decode
  steps, requests that arrived join the running batch (up to `max_batch_size` sequences) and finished or
  cancelled ones leave it, so a short request never waits for a long one to finish;
- static (the onnx engine, or `batching="static"`): requests arriving within `max_wait_ms` of each other
  are decoded together in one engine call; one that arrives meanwhile waits for that whole batch.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sftlab.errors import SftlabError
from sftlab.serve.generation import (GenRequest, IncrementalDecoder, Logprob, OnnxEngine, StopText, TorchEngine,
                                     stop_token_ids)

BACKENDS = ("torch", "onnx", "triton")
BATCHING = ("auto", "continuous", "static")  # auto: continuous where the engine can, else static


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[Logprob] | None = None  # the tokens of `text`, where the request asked for logprobs


class ReplyText:
    """A reply decoded token by token, its text cut before the first `stop` string (`cut`, a StopText), and where
    each token's text begins in it: a token belongs to the reply if it writes any of the text. Those a stop string
    is written in (but for text they write before it) and those after it do not, nor do their logprobs (as a
    stop token's do not)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.decoder, self.cut, self.starts, self.length = IncrementalDecoder(tokenizer), StopText(stop), [], 0

    def add(self, token: int) -> str:
        """The text that can be sent now (StopText.feed)."""
        self.starts.append(self.length)
        text = self.decoder.add(token)
        self.length += len(text)
        return self.cut.feed(text)

    @property
    def tokens(self) -> int:
        """How many of the tokens (the first ones) belong to the reply: all, unless a stop string cut it."""
        return bisect.bisect_left(self.starts, len(self.cut.text)) if self.cut.hit else len(self.starts)

    @property
    def sent(self) -> int:
        """How many write text the StopText has let out so far: those belong to it whatever comes next."""
        return bisect.bisect_left(self.starts, self.cut.sent)


def _settle(future: asyncio.Future, value=None, error: BaseException | None = None) -> None:
    if future.done():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class BatchingBackend:
    """A local engine (torch or onnx) fed by a queue on one worker thread, batching continuously or statically.
    `name` and `supports` (the parameters of generation.SAMPLING it implements) are the engine's."""

    def __init__(self, engine, *, max_batch_size: int = 8, max_wait_ms: float = 5.0, batching: str = "auto"):
        _one_of("batching", batching, BATCHING)
        self.name, self.supports = engine.name, engine.supports
        joinable = bool(getattr(engine, "joinable", False))
        if batching == "continuous" and not joinable:
            raise SftlabError("continuous batching needs the torch backend and a model whose KV cache is plain full "
                              "attention (not sliding-window, linear or shared layers); use batching 'static'")
        self.batching = "continuous" if joinable and batching != "static" else "static"
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.context_length = engine.context_length  # prompt + max_tokens must fit (None: not known)
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self._queue: queue.Queue = queue.Queue()
        loop = self._continuous_loop if self.batching == "continuous" else self._static_loop
        self._thread = threading.Thread(target=loop, name="sftlab-batcher", daemon=True)
        self._thread.start()

    async def generate(self, *, ids: list[int], messages=None, prompt=None, tools=None, max_tokens: int,
                       temperature: float, top_p: float, stop: list[str] = (), seed: int | None = None,
                       on_text: Callable[..., None] | None = None, **sampling) -> Completion:
        """The completion of one request (`sampling`: GenRequest's parameters of SAMPLING); `on_text` (called on
        the worker thread) gets its text as it is decoded, cut before the first `stop` string, and where the
        request asks for logprobs, those of the tokens that write the piece (ReplyText: one whose text is held back as
        the possible start of a stop string comes with the piece that lets it out, or not at all). A request
        cancelled while it waits (its client went away) leaves the engine's batch at the next token."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        reply = ReplyText(self.tokenizer, stop)
        request = GenRequest(ids, max_tokens, temperature, top_p, seed=seed, **sampling)
        asked, got, told = request.logprobs is not None, [], 0  # the logprobs of the tokens decoded, how many sent

        def send(piece: str) -> None:
            nonlocal told
            if on_text and asked:
                on_text(piece, got[told:reply.sent])
                told = reply.sent
            elif on_text:
                on_text(piece)

        def token(tok: int, logprob: Logprob | None) -> None:
            piece = reply.add(tok)
            request.done = reply.cut.hit
            if logprob is not None:
                got.append(logprob)
            if piece:
                send(piece)

        request.on_token = token
        self._queue.put((request, future, loop))
        try:
            result = await future
        except asyncio.CancelledError:
            request.done = True
            raise
        if tail := reply.cut.flush():
            send(tail)
        return Completion(reply.cut.text, "stop" if reply.cut.hit else result.finish_reason, len(ids),
                          len(result.tokens), result.logprobs[:reply.tokens] if asked else None)

    def _take(self, limit: int, wait: bool) -> tuple[list, bool]:
        """Up to `limit` queued requests, those cancelled while queued left out, and whether `close` was called.
        With `wait`, blocks for the first one, then collects more for `max_wait`; else only what is queued now."""
        items, closing = [], False
        if wait:
            first = self._queue.get()
            if first is None:
                return [], True
            items.append(first)
        deadline = time.monotonic() + self.max_wait
        while len(items) < limit:
            try:
                item = (self._queue.get(timeout=max(0.0, deadline - time.monotonic())) if wait
                        else self._queue.get_nowait())
            except queue.Empty:
                break
            if item is None:
                closing = True
                break
            items.append(item)
        return [item for item in items if not item[0].done], closing

    def _static_loop(self) -> None:
        closing = False
        while not closing:
            batch, closing = self._take(self.max_batch_size, wait=True)
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

    def _continuous_loop(self) -> None:
        """Iteration-level scheduling: before each decode step, requests that arrived are prefilled together and
        join the running batch (while it has room); a request leaves it at the token it finishes on (stop token,
        max_tokens, stop text, or its client gone)."""
        engine, running, owners, closing = self.engine, None, {}, False
        while True:
            idle = running is None or not running
            if idle and closing:
                return
            new = []
            room = self.max_batch_size - (0 if idle else len(running))
            if not closing and room > 0 and (idle or running.joinable):
                new, closing = self._take(room, wait=idle)
            try:
                if new:
                    owners.update((id(req), (fut, loop)) for req, fut, loop in new)
                    joining = engine.prefill([req for req, _, _ in new])
                    running = joining if idle else engine.join(running, joining)
                if running is not None:  # everyone's next token; the new ones took their first in prefill
                    engine.step(running)
                for req, res in running.pop_finished() if running is not None else ():
                    fut, loop = owners.pop(id(req))
                    loop.call_soon_threadsafe(_settle, fut, res)
            except Exception as e:  # reported to every request in the batch
                for fut, loop in owners.values():
                    loop.call_soon_threadsafe(_settle, fut, None, e)
                owners, running = {}, None

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)


class TritonBackend:
    """Forwards each request to a Triton server running an `sftlab export --to triton` repository;
    Triton's dynamic batcher does the batching. It `supports` what the repository's engine does (logprobs
    where the model has an output for them: repositories exported since it has), but `json_after`: a repository
    exported before it would constrain a reasoning reply from its first token."""

    name = "triton"

    def __init__(self, server, tokenizer, model_name: str):
        import tritonclient.http as httpclient

        self.server, self.tokenizer, self.model_name = server, tokenizer, model_name
        config = (Path(server.repository) / model_name / "config.pbtxt").read_text()
        engine = OnnxEngine if re.search(r'key: "engine" value: \{ string_value: "onnx" \}', config) else TorchEngine
        self.supports = engine.supports - {"json_after"} - (set() if 'name: "logprobs"' in config else {"logprobs"})
        self._http = httpclient
        self._local = threading.local()  # tritonclient's http client (gevent) is not thread-safe

    def _infer(self, inputs, params):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._http.InferenceServerClient(self.server.url, network_timeout=600)
        return client.infer(self.model_name, inputs, parameters=params)

    async def generate(self, *, ids: list[int], messages=None, prompt=None, tools=None, max_tokens: int,
                       temperature: float, top_p: float, stop: list[str] = (), seed: int | None = None,
                       on_text=None, **sampling) -> Completion:
        """The whole completion from Triton (no token stream): `stop` cuts it and its logprobs afterwards.
        `sampling`: GenRequest's parameters of SAMPLING (`logit_bias` sent as JSON: Triton's parameters are scalars;
        `json_schema` is JSON text already)."""
        import numpy as np

        chat = {"messages": messages, "tools": tools} if tools else messages
        text = json.dumps(chat) if messages is not None else prompt
        inp = self._http.InferInput("text", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[text.encode("utf-8")]], dtype=np.object_))
        params = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, **sampling}
        if seed is not None:
            params["seed"] = seed
        if "logit_bias" in params:
            params["logit_bias"] = json.dumps(params["logit_bias"])
        result = await asyncio.to_thread(self._infer, [inp], params)
        cut = StopText(stop)
        cut.feed(result.as_numpy("text")[0, 0].decode("utf-8"))
        finish = "stop" if cut.hit else result.as_numpy("finish_reason")[0, 0].decode()
        logprobs = None
        if sampling.get("logprobs") is not None:
            logprobs = [Logprob(tok, lp, [tuple(t) for t in top])
                        for tok, lp, top in json.loads(result.as_numpy("logprobs")[0, 0])]
            reply = ReplyText(self.tokenizer, stop)
            for entry in logprobs:
                reply.add(entry.token)
            logprobs = logprobs[:reply.tokens]
        return Completion(cut.text, finish, int(result.as_numpy("prompt_tokens")[0, 0]),
                          int(result.as_numpy("completion_tokens")[0, 0]), logprobs)

    def close(self) -> None:
        self.server.stop()


def load_backend(source: str, backend: str = "torch", *, max_batch_size: int = 8, max_wait_ms: float = 5.0,
                 precision: str = "fp32", workdir: Path | None = None, batching: str = "auto"):
    """A ready backend for SOURCE (run, HF folder, GGUF, `default`, an ONNX export or a Triton repository);
    `batching` (auto | continuous | static) for the torch and onnx backends (BatchingBackend)."""
    from sftlab.models import load_model, load_tokenizer

    _one_of("backend", backend, BACKENDS)
    _one_of("batching", batching, BATCHING)  # before the model loads (BatchingBackend checks it for API callers)
    if batching == "continuous" and backend != "torch":
        raise SftlabError(f"continuous batching needs the torch backend (the {backend} backend batches statically)")
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
    return BatchingBackend(engine, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, batching=batching)


def _one_of(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SftlabError(f"unknown {what} '{value}'; choose one of {', '.join(choices)}")


def _workdir() -> Path:
    import atexit
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="sftlab-serve-"))
    atexit.register(shutil.rmtree, path, True)
    return path
