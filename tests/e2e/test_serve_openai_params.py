"""The OpenAI server with the request parameters common clients send (the official `openai` client,
LangChain's and LlamaIndex's bodies): a parameter that would change the answer and is not implemented
(logprobs, response_format, penalties, ...) is a 400 naming it, not silently ignored; its default
value, `null` for a nullable parameter, and harmless fields (`user`, `metadata`) are accepted."""

from __future__ import annotations

import pytest

from conftest import client_for

ASK = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("params", [
    {"logprobs": True}, {"logprobs": True, "top_logprobs": 2},
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}},
    {"presence_penalty": 0.5}, {"frequency_penalty": -1.0}, {"logit_bias": {"42": 10}},
    {"parallel_tool_calls": False}, {"extra_body": {"top_k": 5}}, {"extra_body": {"repetition_penalty": 1.2}},
], ids=lambda p: next(iter(p.get("extra_body", p))))
def test_a_parameter_that_would_change_the_answer_is_a_400_naming_it(tokenizer, params):
    import openai

    client, backend = client_for(tokenizer, "hello")
    name = next(iter(params.get("extra_body", params)))
    with pytest.raises(openai.BadRequestError, match=f"{name}=.* is not supported") as e:
        client.chat.completions.create(model="tiny", messages=ASK, **params)
    assert (e.value.body["param"], e.value.body["code"]) == (name, "unsupported_value") and not backend.requests


@pytest.mark.parametrize("params", [{"echo": True}, {"logprobs": 2}, {"best_of": 2}, {"suffix": "!"}])
def test_a_completion_parameter_that_would_change_the_answer_is_a_400(tokenizer, params):
    import openai

    client, backend = client_for(tokenizer, "hello")
    with pytest.raises(openai.BadRequestError, match="is not supported") as e:
        client.completions.create(model="tiny", prompt="hi", **params)
    assert e.value.body["param"] == next(iter(params)) and not backend.requests


def test_defaults_nulls_and_harmless_fields_are_accepted(tokenizer):
    client, backend = client_for(tokenizer, "hello")
    resp = client.chat.completions.create(
        model="tiny", messages=ASK, logprobs=False, response_format={"type": "text"}, presence_penalty=0,
        frequency_penalty=0.0, parallel_tool_calls=True, user="u1", metadata={"team": "a"}, store=False,
        temperature=None, top_p=None, n=None, stream=None, seed=None, extra_body={"some_other_field": 1})
    assert resp.choices[0].message.content == "hello"
    assert {k: backend.requests[0][k] for k in ("temperature", "top_p")} == {"temperature": 0.0, "top_p": 1.0}


def test_max_completion_tokens_is_max_tokens_and_its_limit_names_it(tokenizer):
    import openai

    client, backend = client_for(tokenizer, "hello")
    client.chat.completions.create(model="tiny", messages=ASK, max_completion_tokens=7, stop="x")
    assert (backend.requests[0]["max_tokens"], backend.requests[0]["stop"]) == (7, ["x"])
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens is 5000") as e:
        client.chat.completions.create(model="tiny", messages=ASK, max_completion_tokens=5000)
    assert e.value.body["param"] == "max_completion_tokens"
