"""Per-request work done once: a `response_format` schema is compiled to its grammar once, though the server checks
it and the torch engine builds its matcher from it; the template's string quote (Gemma 4's `<|"|>`), which each
request's decoder asks for, is probed once per tokenizer and template. The results are as before."""

from __future__ import annotations

import json

import pytest

from conftest import tokenizer_for

ASK = [{"role": "user", "content": "Give me a number."}]
NUMBER = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["n"], "additionalProperties": False}


@pytest.fixture
def compiled(monkeypatch) -> list[str]:
    """The schemas llguidance compiles to grammars from now on (a cold cache)."""
    import llguidance

    from sftlab.serve.generation import json_grammar

    real, schemas = llguidance.LLMatcher, []

    class Counting:
        validate_grammar_with_warnings = staticmethod(real.validate_grammar_with_warnings)

        def __new__(cls, *args, **kwargs):
            return real(*args, **kwargs)

        @staticmethod
        def grammar_from_json_schema(schema, **kwargs):
            schemas.append(schema)
            return real.grammar_from_json_schema(schema, **kwargs)

    monkeypatch.setattr(llguidance, "LLMatcher", Counting)
    json_grammar.cache_clear()
    return schemas


def test_a_schema_is_compiled_once_though_checked_and_constrained(tiny_model_dir, compiled):
    import openai
    from fastapi.testclient import TestClient

    from sftlab.serve.backends import BatchingBackend
    from sftlab.serve.generation import TorchEngine
    from sftlab.serve.openai_api import create_app

    backend = BatchingBackend(TorchEngine.from_pretrained(tiny_model_dir))
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", max_retries=0,
                           http_client=TestClient(create_app(backend, "tiny")))
    fmt = {"type": "json_schema", "json_schema": {"name": "number", "schema": NUMBER}}
    try:
        replies = [client.chat.completions.create(model="tiny", messages=ASK, response_format=fmt, max_tokens=20,
                                                  temperature=1.0, seed=seed).choices[0] for seed in (1, 2)]
    finally:
        backend.close()
    assert compiled == [json.dumps(NUMBER)]
    for choice in replies:
        assert choice.finish_reason == "stop" and 0 <= json.loads(choice.message.content)["n"] <= 9


def test_an_invalid_schema_is_still_refused_each_time(compiled):
    from sftlab.serve.generation import json_grammar

    for _ in range(2):
        with pytest.raises(ValueError):
            json_grammar('{"type": "nonsense"}')
    assert len(compiled) == 2


@pytest.mark.parametrize("name, quote", [("gemma4.jinja", '<|"|>'), ("chatml", "")])
def test_the_string_quote_is_probed_once_per_tokenizer_and_template(tokenizer, monkeypatch, name, quote):
    """Once per template and tokenizer: per request's decoder, and per copy of the tokenizer (evaluation loads a
    run's and its base's), the answer is kept. (A decoder also probes the reasoning markers, once.)"""
    import copy

    from sftlab.serve.generation import IncrementalDecoder, _kept_specials, _string_quote, string_quote
    from sftlab.serve.reasoning import reasoning_markers

    for cached in (_string_quote, _kept_specials, reasoning_markers):
        cached.cache_clear()
    tok = tokenizer_for(tokenizer, name)
    renders, render = [], tok.apply_chat_template
    monkeypatch.setattr(tok, "apply_chat_template", lambda *a, **k: renders.append(k) or render(*a, **k))
    ids = tok(f'call:f{{a:{quote}x{quote}}}', add_special_tokens=False)["input_ids"]
    decoded, probed = [], []
    for _ in range(3):  # a request's decoder each
        decoder = IncrementalDecoder(tok)
        decoded.append("".join(decoder.add(t) for t in ids))
        probed.append(len(renders))
    assert string_quote(tok) == quote and decoded == [f"call:f{{a:{quote}x{quote}}}"] * 3
    assert probed[0] and probed == probed[:1] * 3  # by the first decoder alone
    assert string_quote(copy.deepcopy(tok)) == quote and len(renders) == probed[0]
    tok.chat_template += "\n"
    assert string_quote(tok) == quote and len(renders) == probed[0] + 1  # a new template is probed anew
    other = copy.deepcopy(tok)
    other.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    monkeypatch.setattr(other, "apply_chat_template", lambda *a, **k: renders.append(k) or render(*a, **k))
    assert string_quote(other) == quote and len(renders) == probed[0] + 2  # so is a tokenizer with other tokens
