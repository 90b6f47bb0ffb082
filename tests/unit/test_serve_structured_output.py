"""Structured output (`response_format`): the torch engine picks each token among those the request's JSON schema
allows (llguidance), greedy or sampled, and ends where the JSON is complete. On the tiny random model, whose free
output is garbage, the reply parses and follows the schema; a free row batched with a constrained one is as
alone; logprobs stay the raw logits'. Where the prompt opens a reasoning block, the reply reasons freely and the
JSON follows its closer. The server takes OpenAI's `json_object` and `json_schema` (the SDK's `parse` too),
streamed or not, and answers an invalid schema, tools, a backend without it, or one that cannot constrain a reply
after its reasoning where the prompt opens one, with a 400 naming `response_format`."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest

from conftest import client_for, tokenizer_for

ASK = [{"role": "user", "content": "Give me a person as JSON."}]
COLORS = ["red", "green", "blue"]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "color": {"enum": COLORS}}, "required": ["name", "age", "color"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def _person(text: str) -> dict:
    """`text` parsed, checked against PERSON by hand."""
    value = json.loads(text)
    assert set(value) == {"name", "age", "color"}, value
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert type(value["age"]) is int and 0 <= value["age"] <= 150
    assert value["color"] in COLORS
    return value


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from sftlab.serve.generation import TorchEngine

    return TorchEngine.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def ids(engine):
    from sftlab.serve.generation import encode

    return encode(engine.tokenizer, messages=ASK)


def _text(engine, result) -> str:
    return engine.tokenizer.decode(result.tokens, skip_special_tokens=True)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 1},
                                      {"temperature": 0.7, "seed": 2, "top_k": 50}], ids=str)
def test_the_reply_follows_the_schema_and_ends_with_it(engine, ids, sampling):
    """Required properties, an enum, a bounded integer and string: the JSON is complete and valid, and the reply ends
    there ("stop"), far before max_tokens; the same seed repeats it. Free, the model writes no JSON at all."""
    from sftlab.serve.generation import GenRequest

    schema = json.dumps(PERSON)
    result = engine.generate([GenRequest(ids, 60, json_schema=schema, **sampling)])[0]
    assert result.finish_reason == "stop" and len(result.tokens) < 40
    _person(_text(engine, result))
    if sampling:
        assert engine.generate([GenRequest(ids, 60, json_schema=schema, **sampling)])[0].tokens == result.tokens
    with pytest.raises(json.JSONDecodeError):
        json.loads(_text(engine, engine.generate([GenRequest(ids, 8, **sampling)])[0]))


def test_a_reply_cut_at_max_tokens_is_the_start_of_the_complete_one(engine, ids):
    from sftlab.serve.generation import GenRequest

    whole, cut = engine.generate([GenRequest(ids, 60, json_schema=json.dumps(PERSON)),
                                  GenRequest(ids, 6, json_schema=json.dumps(PERSON))])
    assert (cut.finish_reason, cut.tokens) == ("length", whole.tokens[:6])


def test_json_object_is_any_object(engine, ids):
    """`{"type": "object"}`: the token `{}` pushed up by a logit_bias is the whole reply (the grammar is then complete);
    sampled, the reply is the start of an object (the random model never closes its strings)."""
    from llguidance import LLMatcher

    from sftlab.serve.generation import GenRequest, json_grammar

    empty = engine.tokenizer.convert_tokens_to_ids("{}")
    obj = '{"type": "object"}'
    biased, sampled = engine.generate([GenRequest(ids, 10, json_schema=obj, logit_bias={empty: 100.0}),
                                       GenRequest(ids, 12, json_schema=obj, temperature=1.0, seed=3)])
    assert biased.finish_reason == "stop" and json.loads(_text(engine, biased)) == {}
    assert sampled.finish_reason == "length" and _text(engine, sampled).startswith("{")
    assert LLMatcher(engine._grammar_tokenizer, json_grammar(obj)).consume_tokens(sampled.tokens)


def test_logprobs_are_those_of_the_raw_logits(engine, ids):
    """The first token is one the schema allows (`{...`), not the model's own first choice, whose logprob stays on
    top: logprobs are the log-softmax before the mask."""
    import torch

    from sftlab.serve.generation import GenRequest

    result = engine.generate([GenRequest(ids, 3, json_schema=json.dumps(PERSON), logprobs=1)])[0]
    with torch.inference_mode():
        raw = torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
    first = result.logprobs[0]
    assert first.token == result.tokens[0] != int(raw.argmax()) and first.top[0][0] == int(raw.argmax())
    assert abs(first.logprob - float(raw[first.token])) < 1e-4


def test_rows_with_and_without_a_schema_batch_as_alone(engine, ids):
    """Static (one batch) and continuous (a free row joins a constrained one mid-decoding, and the other way):
    each row's tokens are those it gets alone."""
    from sftlab.serve.generation import GenRequest, encode

    other = encode(engine.tokenizer, messages=[{"role": "user", "content": "Tell me a story."}])
    requests = [GenRequest(ids, 30, json_schema=json.dumps(PERSON)), GenRequest(other, 6),
                GenRequest(other, 30, json_schema=json.dumps(PERSON), temperature=0.9, seed=4)]
    alone = [engine.generate([r])[0].tokens for r in requests]
    assert [r.tokens for r in engine.generate(requests)] == alone
    for first, second in ((0, 1), (1, 0)):
        decoding = engine.prefill([requests[first]])
        engine.step(decoding)
        decoding = engine.join(decoding, engine.prefill([requests[second]]))
        done = {}
        while True:
            done.update((id(req), res.tokens) for req, res in decoding.pop_finished())
            if not decoding:
                break
            engine.step(decoding)
        assert [done[id(requests[first])], done[id(requests[second])]] == [alone[first], alone[second]]


def test_no_per_token_work_without_a_schema(engine, ids, monkeypatch):
    from sftlab.serve.generation import GenRequest

    def never(*_):
        raise AssertionError("a grammar's mask on a request without one")

    monkeypatch.setattr(engine, "_constrain", never)
    engine.generate([GenRequest(ids, 4), GenRequest(ids, 4, temperature=0.8, seed=1, logit_bias={5: 1.0})])


@pytest.fixture(scope="module")
def served(engine):
    """The torch engine on the tiny model behind the server (continuous batching), and an OpenAI client of it."""
    import openai
    from fastapi.testclient import TestClient

    from sftlab.serve.backends import BatchingBackend
    from sftlab.serve.openai_api import create_app

    backend = BatchingBackend(engine)
    http = TestClient(create_app(backend, "tiny"))
    yield openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
    backend.close()


def test_the_openai_sdk_parses_the_reply_into_its_model(served):
    """`client.chat.completions.parse(response_format=Model)`, as LangChain's with_structured_output sends it."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=150)
        color: Literal["red", "green", "blue"]

    for sampling in ({}, {"temperature": 1.0, "seed": 7}):
        resp = served.chat.completions.parse(model="tiny", messages=ASK, response_format=Person, max_tokens=60,
                                             **sampling)
        choice = resp.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Person)
        _person(choice.message.content)


def test_a_streamed_reply_is_the_same_json(served):
    body = dict(model="tiny", messages=ASK, response_format=FORMAT, max_tokens=60, temperature=0.8, seed=5)
    whole = served.chat.completions.create(**body).choices[0]
    chunks = list(served.chat.completions.create(**body, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "stop"
    _person(whole.message.content)
    resp = served.completions.create(model="tiny", prompt="A person:", max_tokens=60,
                                     extra_body={"response_format": FORMAT})
    _person(resp.choices[0].text)


@pytest.mark.parametrize("fmt, sent", [
    ({"type": "json_object"}, '{"type": "object"}'), (FORMAT, json.dumps(PERSON)), ({"type": "text"}, None)],
    ids=["json_object", "json_schema", "text"])
def test_response_format_reaches_the_backend_as_a_json_schema(tokenizer, fmt, sent):
    client, backend = client_for(tokenizer, "{}")
    client.chat.completions.create(model="tiny", messages=ASK, response_format=fmt)
    client.completions.create(model="tiny", prompt="hi", extra_body={"response_format": fmt})
    assert [r.get("json_schema") for r in backend.requests] == [sent, sent]


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "("}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
    {"type": "json_schema", "json_schema": {"name": "x"}}, {"type": "json_schema"}, {"type": "xml"},
], ids=["type", "pattern", "ref", "no schema", "no json_schema", "xml"])
def test_an_invalid_response_format_is_a_400_naming_it(tokenizer, fmt):
    import openai

    client, backend = client_for(tokenizer, "{}")
    with pytest.raises(openai.BadRequestError, match="response_format") as e:
        client.chat.completions.create(model="tiny", messages=ASK, response_format=fmt)
    assert e.value.body["param"].startswith("response_format") and not backend.requests


def test_response_format_with_tools_or_in_an_opened_reasoning_on_another_backend_is_a_400(tokenizer):
    """Tools offered (the reply could be a call) are refused; a prompt that opens `<think>` (the reply begins in
    reasoning) is refused by a backend that cannot constrain the reply after it (naming it), and reaches one that
    can with the reasoning's closer; a template that merely may write reasoning first (Qwen 3) is constrained from
    the first token."""
    import openai

    from sftlab.serve.generation import SAMPLING

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    qwen3_8 = tokenizer_for(tokenizer, "qwen3_8.jinja")
    cases = [(tokenizer_for(tokenizer, "chatml"), {}, {"tools": [tool]}, "tools"),
             (qwen3_8, {"supports": set(SAMPLING) - {"json_after"}, "name": "triton"}, {}, "triton backend")]
    for tok, kind, extra, reason in cases:
        client, backend = client_for(tok, "{}", **kind)
        with pytest.raises(openai.BadRequestError, match=reason) as e:
            client.chat.completions.create(model="tiny", messages=ASK, response_format=FORMAT, **extra)
        assert e.value.body["param"] == "response_format" and not backend.requests
    client, backend = client_for(tokenizer_for(tokenizer, "chatml"), "{}")
    client.chat.completions.create(model="tiny", messages=ASK, response_format=FORMAT, tools=[tool], tool_choice="none")
    client, backend = client_for(qwen3_8, 'Hm.\n</think>\n\n{"a": 1}')
    message = client.chat.completions.create(model="tiny", messages=ASK, response_format=FORMAT).choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == ("Hm.", '{"a": 1}')
    assert backend.requests[-1]["json_after"] == "\n</think>\n\n"
    client, backend = client_for(tokenizer_for(tokenizer, "qwen3.jinja"), '{"a": 1}')
    resp = client.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"})
    assert resp.choices[0].message.content == '{"a": 1}' and "json_after" not in backend.requests[-1]


class Scripted:
    """A model made to write `tokens` first (their logits raised far above the others'), then as it would."""

    def __init__(self, model, tokens: list[int]):
        self.model, self.tokens = model, list(tokens)

    def __call__(self, **kwargs):
        out = self.model(**kwargs)
        if self.tokens:
            out.logits[:, -1, self.tokens.pop(0)] += 1e4
        return out


@contextmanager
def scripted(engine, text: str, *tokens: int):
    """The engine's model made to write `text`, then `tokens`, for one request."""
    model = engine.model
    engine.model = Scripted(model, engine.tokenizer(text, add_special_tokens=False)["input_ids"] + list(tokens))
    try:
        yield
    finally:
        engine.model = model


@pytest.fixture(scope="module")
def thinking(tiny_model_dir):
    """The torch engine on the tiny model with a template whose prompt opens `<think>` (Qwen 3 8B's; the tokens it
    adds, past the model's, are not in its prompts)."""
    from sftlab.serve.generation import TorchEngine

    engine = TorchEngine.from_pretrained(tiny_model_dir)
    engine.tokenizer = tokenizer_for(engine.tokenizer, "qwen3_8.jinja")
    return engine


REASONED = "Let me think: a person.\n</think>\n\n"


def test_after_an_opened_reasoning_the_reply_reasons_freely_then_follows_the_schema(thinking):
    """Written into reasoning that is not JSON, and the template's `\n\n` after the closer: both are let through,
    then the JSON follows the schema; without json_after the same script is masked from the first token."""
    from sftlab.serve.generation import GenRequest, encode

    ids = encode(thinking.tokenizer, messages=ASK)
    with scripted(thinking, REASONED):
        result = thinking.generate([GenRequest(ids, 80, json_schema=json.dumps(PERSON),
                                               json_after="\n</think>\n\n")])[0]
    with scripted(thinking, REASONED):
        masked = thinking.generate([GenRequest(ids, 80, json_schema=json.dumps(PERSON))])[0]
    text = _text(thinking, result)
    assert result.finish_reason == "stop" and text.startswith(REASONED)
    _person(text[len(REASONED):])
    _person(_text(thinking, masked))


def test_what_the_closer_s_token_writes_after_it_begins_the_json(thinking):
    """A token `>"` ends `</think>` and opens a JSON string: the grammar goes on from inside the string."""
    from sftlab.serve.generation import GenRequest, encode

    ids = encode(thinking.tokenizer, messages=ASK)
    with scripted(thinking, "Hm.\n</think", thinking.tokenizer.convert_tokens_to_ids('>"')):
        result = thinking.generate([GenRequest(ids, 20, json_schema='{"type": "string", "maxLength": 5}',
                                               json_after="\n</think>\n\n")])[0]
    text = _text(thinking, result)
    assert result.finish_reason == "stop" and text.startswith('Hm.\n</think>"')
    assert len(json.loads(text[len("Hm.\n</think>"):])) <= 5


def test_the_server_sends_the_reasoning_and_the_schema_s_json(thinking):
    """Streamed or not, the reasoning is reasoning_content and the content is the JSON."""
    import openai
    from fastapi.testclient import TestClient

    from sftlab.serve.backends import BatchingBackend
    from sftlab.serve.openai_api import create_app

    backend = BatchingBackend(thinking)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", max_retries=0,
                           http_client=TestClient(create_app(backend, "tiny")))
    body = dict(model="tiny", messages=ASK, response_format=FORMAT, max_tokens=80)
    try:
        with scripted(thinking, REASONED):
            choice = client.chat.completions.create(**body).choices[0]
        with scripted(thinking, REASONED):
            deltas = [c.choices[0].delta for c in client.chat.completions.create(**body, stream=True) if c.choices]
    finally:
        backend.close()
    assert choice.finish_reason == "stop" and choice.message.model_extra["reasoning_content"] == REASONED.split("\n")[0]
    _person(choice.message.content)
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == REASONED.split("\n")[0]
    assert "".join(d.content or "" for d in deltas) == choice.message.content


def test_a_backend_without_it_is_a_400_naming_the_backend(tokenizer):
    import openai

    from sftlab.serve.generation import OnnxEngine

    assert "json_schema" not in OnnxEngine.supports
    client, backend = client_for(tokenizer, "{}", supports={"logprobs"}, name="onnx")
    with pytest.raises(openai.BadRequestError, match="response_format=.* not supported by this server's onnx") as e:
        client.chat.completions.create(model="tiny", messages=ASK, response_format=FORMAT)
    assert (e.value.body["param"], e.value.body["code"]) == ("response_format", "unsupported_value")
    assert not backend.requests


@pytest.mark.parametrize("written", ["<|END_THINKING|><|START_RESPONSE|>", "<|END_THINKING|>\n<|START_RESPONSE|>"])
def test_the_engine_finds_a_closer_as_the_reply_layout_does(tokenizer, written):
    """A closer with whitespace between its pieces (Command A's `<|END_THINKING|><|START_RESPONSE|>`, here as
    the template may write it with a newline) is found however the model spaces it, as the server's reply
    layout splits the reply: the engine looked for the exact text and constrained nothing after it."""
    from sftlab.serve.generation import _Reasoning
    from sftlab.serve.reasoning import AnswerLayout

    closer = "<|END_THINKING|>\n<|START_RESPONSE|>"
    reasoning = _Reasoning(tokenizer, closer)
    ids = tokenizer.encode(f"Hm, a person. {written}" + '{"a"', add_special_tokens=False)
    after = [reasoning.closed(t) for t in ids]
    first = next(k for k, a in enumerate(after) if a is not None)
    assert "<|START_RESPONSE|>" in tokenizer.decode(ids[:first + 1])
    assert "<|START_RESPONSE|>" not in tokenizer.decode(ids[:first])
    assert after[first] + tokenizer.decode(ids[first + 1:]) == '{"a"'
    layout = AnswerLayout(opener="<|START_THINKING|>", closer=closer, opened=True)
    assert layout.split(f"Hm, a person. {written}" + '{"a"') == ("Hm, a person.", '{"a"')
