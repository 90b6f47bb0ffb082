"""The OpenAI server with the request parameters common clients send (the official `openai` client,
LangChain's and LlamaIndex's bodies): logprobs, penalties, logit_bias, response_format and vLLM's top_k, min_p
and repetition_penalty reach the backend, in OpenAI's response shapes; one the serving backend does not
implement, or one the server never implements (parallel_tool_calls, ...), is a 400 naming it, not silently
ignored; its default value, `null` for a nullable parameter, and harmless fields (`user`, `metadata`)
are accepted."""

from __future__ import annotations

import math

import pytest

from conftest import client_for, tokenizer_for

ASK = [{"role": "user", "content": "hi"}]
REPLY = "Hello there, world."
EXTRAS = {"presence_penalty": 0.5, "frequency_penalty": -1.0, "logit_bias": {"42": 10}, "top_k": 5, "min_p": 0.1,
          "repetition_penalty": 1.2}


@pytest.mark.parametrize("params", [
    {"parallel_tool_calls": False}, {"extra_body": {"function_call": {"name": "f"}}},
], ids=lambda p: next(iter(p.get("extra_body", p))))
def test_a_parameter_that_would_change_the_answer_is_a_400_naming_it(tokenizer, params):
    import openai

    client, backend = client_for(tokenizer, "hello")
    name = next(iter(params.get("extra_body", params)))
    with pytest.raises(openai.BadRequestError, match=f"{name}=.* is not supported") as e:
        client.chat.completions.create(model="tiny", messages=ASK, **params)
    assert (e.value.body["param"], e.value.body["code"]) == (name, "unsupported_value") and not backend.requests


@pytest.mark.parametrize("params", [{"echo": True}, {"best_of": 2}, {"suffix": "!"}])
def test_a_completion_parameter_that_would_change_the_answer_is_a_400(tokenizer, params):
    import openai

    client, backend = client_for(tokenizer, "hello")
    with pytest.raises(openai.BadRequestError, match="is not supported") as e:
        client.completions.create(model="tiny", prompt="hi", **params)
    assert e.value.body["param"] == next(iter(params)) and not backend.requests


def test_sampling_parameters_reach_the_backend(tokenizer):
    """Each as the engine takes it (logit_bias keyed by token id); vLLM's top_k -1 and every default are left out."""
    client, backend = client_for(tokenizer, "hello")
    client.chat.completions.create(model="tiny", messages=ASK, **{k: EXTRAS[k] for k in list(EXTRAS)[:3]},
                                   extra_body={k: EXTRAS[k] for k in list(EXTRAS)[3:]})
    client.completions.create(model="tiny", prompt="hi", presence_penalty=0, frequency_penalty=0, logit_bias={},
                              extra_body={"top_k": -1, "min_p": 0, "repetition_penalty": 1})
    assert {k: backend.requests[0].get(k) for k in EXTRAS} == EXTRAS | {"logit_bias": {42: 10.0}}
    assert not set(EXTRAS) & set(backend.requests[1])


@pytest.mark.parametrize("params", [
    {"presence_penalty": 0.5}, {"frequency_penalty": -1.0}, {"logit_bias": {"42": 10}}, {"logprobs": True},
    {"extra_body": {"min_p": 0.2}}, {"response_format": {"type": "json_object"}},
], ids=lambda p: next(iter(p.get("extra_body", p))))
def test_a_parameter_the_backend_does_not_implement_is_a_400_naming_it_and_the_backend(tokenizer, params):
    """The onnx engine has top_k and repetition_penalty only: those pass, the others are refused."""
    import openai

    client, backend = client_for(tokenizer, "hello", supports={"top_k", "repetition_penalty"}, name="onnx")
    name = next(iter(params.get("extra_body", params)))
    with pytest.raises(openai.BadRequestError, match=f"{name}=.* is not supported by this server's onnx backend") as e:
        client.chat.completions.create(model="tiny", messages=ASK, **params)
    assert (e.value.body["param"], e.value.body["code"]) == (name, "unsupported_value") and not backend.requests
    client.chat.completions.create(model="tiny", messages=ASK, extra_body={"top_k": 3, "repetition_penalty": 1.1})
    assert (backend.requests[0]["top_k"], backend.requests[0]["repetition_penalty"]) == (3, 1.1)


@pytest.mark.parametrize("params, param", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"42": 101}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"10000000": 1}}, "logit_bias"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, None), ({"extra_body": {"min_p": 1.5}}, "min_p"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"), ({"extra_body": {"top_k": -2}}, "top_k"),
])
def test_an_out_of_range_value_is_a_400(tokenizer, params, param):
    import openai

    client, backend = client_for(tokenizer, "hello")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, **params)
    assert param is None or param in str(e.value.body) and not backend.requests


def test_defaults_nulls_and_harmless_fields_are_accepted(tokenizer):
    client, backend = client_for(tokenizer, "hello", supports=())
    resp = client.chat.completions.create(
        model="tiny", messages=ASK, logprobs=False, top_logprobs=0, response_format={"type": "text"},
        presence_penalty=0, frequency_penalty=0.0, logit_bias={}, parallel_tool_calls=True, user="u1",
        metadata={"team": "a"}, store=False, temperature=None, top_p=None, n=None, stream=None, seed=None,
        extra_body={"some_other_field": 1, "top_k": -1, "repetition_penalty": 1, "min_p": None})
    assert resp.choices[0].message.content == "hello" and resp.choices[0].logprobs is None
    assert {k: backend.requests[0][k] for k in ("temperature", "top_p")} == {"temperature": 0.0, "top_p": 1.0}
    client.completions.create(model="tiny", prompt="hi", logprobs=None, echo=False, best_of=1, suffix="")
    assert "logprobs" not in backend.requests[1]


def test_max_completion_tokens_is_max_tokens_and_its_limit_names_it(tokenizer):
    import openai

    client, backend = client_for(tokenizer, "hello")
    client.chat.completions.create(model="tiny", messages=ASK, max_completion_tokens=7, stop="x")
    assert (backend.requests[0]["max_tokens"], backend.requests[0]["stop"]) == (7, ["x"])
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens is 5000") as e:
        client.chat.completions.create(model="tiny", messages=ASK, max_completion_tokens=5000)
    assert e.value.body["param"] == "max_completion_tokens"


def _token(tokenizer, tok: int) -> dict:
    text = tokenizer.decode([tok])
    return {"token": text, "bytes": list(text.encode())}


def test_chat_logprobs_in_openais_shape_whole_and_streamed(tokenizer):
    """`logprobs: true` with `top_logprobs: n`: one entry per token of the reply (its text, bytes, logprob and
    n alternatives), and the chunks of a stream carry those of their tokens, adding up to the same."""
    client, backend = client_for(tokenizer, REPLY)
    tokens = tokenizer(REPLY, add_special_tokens=False)["input_ids"]
    want = [_token(tokenizer, t) | {"logprob": -0.5 * (k + 1), "top_logprobs": [
        _token(tokenizer, t + 1) | {"logprob": -0.1}, _token(tokenizer, t) | {"logprob": -0.5 * (k + 1)}]}
        for k, t in enumerate(tokens)]
    resp = client.chat.completions.create(model="tiny", messages=ASK, logprobs=True, top_logprobs=2)
    assert backend.requests[0]["logprobs"] == 2
    assert [e.model_dump() for e in resp.choices[0].logprobs.content] == want
    assert "".join(e.token for e in resp.choices[0].logprobs.content) == resp.choices[0].message.content == REPLY
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, logprobs=True, top_logprobs=2,
                                                 stream=True))
    streamed = [e.model_dump() for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert streamed == want
    assert all(c.choices[0].logprobs is None or c.choices[0].delta.content for c in chunks)
    assert sum(bool(c.choices[0].logprobs) for c in chunks) == 3  # with each of the three pieces
    resp = client.chat.completions.create(model="tiny", messages=ASK, logprobs=True)
    assert all(e.top_logprobs == [] for e in resp.choices[0].logprobs.content) and backend.requests[-1]["logprobs"] == 0


def test_completion_logprobs_in_openais_shape_whole_and_streamed(tokenizer):
    """`logprobs: n` (0..5): tokens, their logprobs, the top n (and the chosen token) as {text: logprob}, and each
    token's offset in the completion's text, continued from chunk to chunk in a stream."""
    client, backend = client_for(tokenizer, REPLY)
    tokens = tokenizer(REPLY, add_special_tokens=False)["input_ids"]
    texts = [tokenizer.decode([t]) for t in tokens]
    for n in (0, 1, 2):  # the chosen token is added where it is not among the top n
        top = lambda k, t: ({tokenizer.decode([t + 1]): -0.1} if n else {}) | {texts[k]: -0.5 * (k + 1)}  # noqa: E731
        resp = client.completions.create(model="tiny", prompt="Say", logprobs=n)
        got = resp.choices[0].logprobs
        assert got.tokens == texts and "".join(texts) == resp.choices[0].text == REPLY
        assert got.token_logprobs == [-0.5 * (k + 1) for k in range(len(tokens))]
        assert got.top_logprobs == [top(k, t) for k, t in enumerate(tokens)]
        assert list(got.top_logprobs[0]) == list(top(0, tokens[0]))
        assert got.text_offset == [sum(map(len, texts[:k])) for k in range(len(tokens))]
        chunks = list(client.completions.create(model="tiny", prompt="Say", logprobs=n, stream=True))
        parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
        assert len(parts) == 3 and [x for p in parts for x in p.tokens] == got.tokens
        assert [x for p in parts for x in p.text_offset] == got.text_offset
        assert [x for p in parts for x in p.top_logprobs] == got.top_logprobs


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """The torch engine on the tiny model behind the server (continuous batching)."""
    from fastapi.testclient import TestClient

    import openai
    from sftlab.serve.backends import BatchingBackend
    from sftlab.serve.generation import TorchEngine
    from sftlab.serve.openai_api import create_app

    engine = TorchEngine.from_pretrained(tiny_model_dir)
    backend = BatchingBackend(engine)
    http = TestClient(create_app(backend, "tiny"))
    yield openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0), engine
    backend.close()


def test_the_torch_backend_sends_the_logprobs_of_its_tokens(served):
    """Greedy on the tiny model: each chosen token is its own top alternative with the same logprob, the top
    ones come best first, the tokens make up the reply, and a stream sends the same ones."""
    client, engine = served
    body = dict(model="tiny", messages=[{"role": "user", "content": "Count to three."}], max_tokens=6, logprobs=True,
                top_logprobs=3)
    resp = client.chat.completions.create(**body)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 6
    assert "".join(e.token for e in content) == resp.choices[0].message.content
    for e in content:
        assert e.top_logprobs[0].token == e.token and math.isclose(e.top_logprobs[0].logprob, e.logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.logprob < 0 and e.bytes == list(e.token.encode())
    chunks = list(client.chat.completions.create(**body, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    resp = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, logprobs=2)
    got = resp.choices[0].logprobs
    assert len(got.tokens) == 5 and "".join(got.tokens) == resp.choices[0].text
    assert all(len(top) <= 3 and top[t] == lp for top, t, lp in zip(got.top_logprobs, got.tokens, got.token_logprobs))


def test_the_torch_backend_applies_a_logit_bias(served):
    """A bias of 100 on one token makes the greedy reply that token, repeated; the others are as without it."""
    client, engine = served
    tok = engine.tokenizer.convert_tokens_to_ids("Paris")
    resp = client.completions.create(model="tiny", prompt="The capital", max_tokens=4, logit_bias={str(tok): 100})
    assert resp.choices[0].text == "Paris" * 4


@pytest.mark.parametrize("template", ["qwen3_8.jinja", "chatml"])
def test_a_chat_request_renders_its_prompt_once(tokenizer, monkeypatch, template):
    """The prompt's text gives both its tokens and whether it opens a `<think>` block (a think template's reply
    then begins in its reasoning)."""
    tok = tokenizer_for(tokenizer, template)
    client, backend = client_for(tok, "Let me see.\n</think>\n\nHello.")
    client.chat.completions.create(model="tiny", messages=ASK)  # the template's layout is read once, at first
    renders, render = [], tok.apply_chat_template
    monkeypatch.setattr(tok, "apply_chat_template", lambda *a, **k: renders.append(k) or render(*a, **k))
    message = client.chat.completions.create(model="tiny", messages=ASK).choices[0].message
    assert len(renders) == 1 and backend.requests[1]["ids"] == render(ASK, add_generation_prompt=True)["input_ids"]
    if template != "chatml":
        assert (message.content, message.model_extra["reasoning_content"]) == ("Hello.", "Let me see.")


@pytest.mark.parametrize("engine, supports", [
    ("torch", {"logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "min_p", "repetition_penalty",
               "json_schema"}),
    ("onnx", {"logprobs", "logit_bias", "top_k", "repetition_penalty"})])
def test_the_triton_backend_supports_what_its_engine_does(tokenizer, tmp_path, engine, supports):
    """Read off the repository's config (no server runs); logprobs only where the model has an output for them
    (a repository exported before it had none)."""
    from types import SimpleNamespace

    pytest.importorskip("tritonclient.http")
    from sftlab.export.triton import CONFIG
    from sftlab.serve.backends import TritonBackend

    (tmp_path / "m").mkdir()
    config = CONFIG.format(name="m", max_batch_size=4, queue_delay_us=1, engine=engine, default_max_tokens=8,
                           max_tokens_limit=8)
    (tmp_path / "m" / "config.pbtxt").write_text(config)
    backend = TritonBackend(SimpleNamespace(repository=tmp_path), tokenizer, "m")
    assert (backend.name, backend.supports) == ("triton", supports)
    older = "\n".join(line for line in config.splitlines() if 'name: "logprobs"' not in line)
    (tmp_path / "m" / "config.pbtxt").write_text(older)
    assert TritonBackend(SimpleNamespace(repository=tmp_path), tokenizer, "m").supports == supports - {"logprobs"}
