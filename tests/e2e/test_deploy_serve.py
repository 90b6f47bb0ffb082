"""The OpenAI-compatible server on a tiny model, queried with the official `openai` client."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

API_KEY = "test-key"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    import uvicorn

    from sftlab.serve.backends import load_backend
    from sftlab.serve.openai_api import Limits, create_app
    from sftlab.serve.triton_server import free_port

    backend = load_backend(str(tiny_model_dir), "torch", max_batch_size=8, max_wait_ms=10)
    app = create_app(backend, "tiny", api_key=API_KEY,
                     limits=Limits(max_body_bytes=20_000, max_prompt_tokens=64, max_tokens_limit=32, default_max_tokens=8))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", backend
    srv.should_exit = True
    thread.join(timeout=10)
    backend.close()


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0)


def _reference(tiny_model_dir, messages, max_new_tokens):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_chat_completion_is_pytorch_greedy(client, tiny_model_dir):
    messages = [{"role": "user", "content": "Tell me a fact about owls."}]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert resp.choices[0].message.content == _reference(tiny_model_dir, messages, 12)
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 12 and resp.usage.prompt_tokens > 5
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_streaming_equals_non_streaming(client):
    messages = [{"role": "user", "content": "Count to five."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10).choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, stream=True))
    assert len(chunks) >= 3  # role chunk, content, finish
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_endpoint(client):
    resp = client.completions.create(model="tiny", prompt="The weather today is", max_tokens=5)
    assert resp.choices[0].finish_reason in ("stop", "length") and resp.usage.completion_tokens <= 5


def test_errors_are_openai_shaped(server, client):
    import httpx
    import openai

    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 200}])
    assert e.value.body["code"] == "context_length_exceeded"

    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1000)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])

    r = httpx.post(server[0] + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   content=b"x" * 30_000)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"


def test_32_concurrent_requests_are_all_answered(server):
    import openai

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(32)]
        tasks = [aclient.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=6)
                 for p in prompts]
        return await asyncio.gather(*tasks)

    answers = asyncio.run(run())
    assert len(answers) == 32 and len({a.id for a in answers}) == 32
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)


def test_batched_and_single_decoding_agree(server):
    from sftlab.serve.generation import GenRequest, encode

    engine = server[1].engine
    prompts = [encode(engine.tokenizer, messages=[{"role": "user", "content": "x " * n}]) for n in (1, 7, 15)]
    batched = engine.generate([GenRequest(p, 8) for p in prompts])
    single = [engine.generate([GenRequest(p, 8)])[0] for p in prompts]
    assert [b.tokens for b in batched] == [s.tokens for s in single]


def test_chat_session_keeps_history_and_resets(tiny_model_dir, monkeypatch):
    import sftlab.serve.chat as chat_mod

    inputs = iter(["hello", "and again", "/reset", "fresh start", "/exit"])
    seen = []
    original = chat_mod.ChatSession.reply

    def spy(self, text, emit):
        seen.append(len(self.history))
        return original(self, text, emit)

    monkeypatch.setattr(chat_mod.ChatSession, "reply", spy)
    chat_mod.chat_loop(str(tiny_model_dir), max_tokens=4, read=lambda _: next(inputs))
    assert seen == [0, 2, 0]  # second turn sees the first exchange; /reset clears it


def test_stop_strings_cut_the_text_streamed_or_not(client):
    """OpenAI's `stop`: the text ends before the first stop string, finish_reason "stop", and the
    stream holds back a stop string's start until it knows, so both forms send the same text."""
    messages = [{"role": "user", "content": "Tell me a fact about owls."}]
    sampling = dict(model="tiny", messages=messages, max_tokens=24, temperature=1.0, seed=3)  # varied, repeatable
    whole = client.chat.completions.create(**sampling).choices[0].message.content
    stop = next(whole[i:i + 3] for i in range(4, len(whole) - 3) if whole[i:i + 3].strip())
    cut = whole[:whole.index(stop)]
    resp = client.chat.completions.create(**sampling, stop=[stop, "never seen"])
    assert (resp.choices[0].message.content, resp.choices[0].finish_reason) == (cut, "stop")
    chunks = list(client.chat.completions.create(**sampling, stop=stop, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == resp.usage.completion_tokens


def test_seeded_sampling_repeats_and_text_parts_and_model_lookup(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Write "}, {"type": "text", "text": "a poem."}]}]
    runs = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=1.0,
                                           seed=7).choices[0].message.content for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    assert client.models.retrieve("tiny").id == "tiny"


def test_a_request_for_another_model_is_a_404_naming_the_served_one(server, client):
    import httpx
    import openai

    for call in (lambda: client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}]),
                 lambda: client.completions.create(model="gpt-4o", prompt="Hi", max_tokens=2),
                 lambda: client.models.retrieve("gpt-4o")):
        with pytest.raises(openai.NotFoundError, match="this server serves 'tiny'") as e:
            call()
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    r = httpx.post(server[0] + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},  # no model: the one served
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and r.json()["model"] == "tiny"


def test_empty_prompt_and_too_long_for_the_model_are_400s(server, client):
    import openai

    with pytest.raises(openai.BadRequestError, match="the prompt is empty") as e:
        client.completions.create(model="tiny", prompt="", max_tokens=4)
    assert e.value.body["param"] == "prompt"
    backend = server[1]
    context, backend.context_length = backend.context_length, 20
    try:
        with pytest.raises(openai.BadRequestError, match="exceed the model's context of 20 tokens"):
            client.completions.create(model="tiny", prompt="one two three four five", max_tokens=32)
    finally:
        backend.context_length = context


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_cancelled_request_leaves_the_engine_at_its_next_token(tiny_model_dir, monkeypatch, batching):
    """A client that goes away cancels its request: the engine stops decoding it, not at max_tokens."""
    import sftlab.serve.generation as generation
    from sftlab.serve.backends import BatchingBackend
    from sftlab.serve.generation import TorchEngine, encode

    engine = TorchEngine.from_pretrained(tiny_model_dir)
    engine.stop_ids = set()  # no end-of-turn token can end it early
    produced, take = {}, generation.take_token  # tokens each request got from the engine

    def counting(result, request, tok, stop_ids):
        produced[id(request)] = request, len(result.tokens) + 1  # the request kept: ids stay unique
        return take(result, request, tok, stop_ids)

    monkeypatch.setattr(generation, "take_token", counting)
    backend = BatchingBackend(engine, batching=batching)
    ids = encode(engine.tokenizer, messages=[{"role": "user", "content": "hi"}])

    async def run():
        seen = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(backend.generate(ids=ids, max_tokens=400, temperature=0.0, top_p=1.0,
                                                      on_text=lambda _: loop.call_soon_threadsafe(seen.set)))
        await seen.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        done = await backend.generate(ids=ids, max_tokens=3, temperature=0.0, top_p=1.0)
        assert done.completion_tokens == 3

    try:
        asyncio.run(run())
    finally:
        backend.close()
    assert backend.batching == batching
    assert len(produced) == 2 and max(n for _, n in produced.values()) < 100  # far fewer than the 400 asked for
