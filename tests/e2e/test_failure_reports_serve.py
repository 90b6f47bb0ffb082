"""Failure reports filed against other OpenAI-compatible servers, checked on `sftlab serve`'s own path: the
official `openai` client, the server, the batching backend and the torch engine on a tiny random Llama."""

from __future__ import annotations

import pytest

ASK = [{"role": "user", "content": "Tell me something."}]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def served(tokenizer):
    """(openai client, engine): a tiny random Llama whose greedy reply does not repeat one token (untied, std 0.1)
    and has no stop token, so replies run to max_tokens or a stop string."""
    import openai
    import torch
    from fastapi.testclient import TestClient
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftlab.serve.backends import BatchingBackend
    from sftlab.serve.generation import TorchEngine
    from sftlab.serve.openai_api import create_app

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                         pad_token_id=tokenizer.pad_token_id)
    engine = TorchEngine(LlamaForCausalLM(config), tokenizer, [])
    backend = BatchingBackend(engine, max_wait_ms=1)
    http = TestClient(create_app(backend, "tiny"))
    yield openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0), engine
    backend.close()


def _greedy(engine, **prompt) -> list[str]:
    """The texts of the first 12 greedy tokens, each decoded alone (as logprobs name them)."""
    from sftlab.serve.generation import GenRequest, encode

    tokens = engine.generate([GenRequest(encode(engine.tokenizer, **prompt), 12)])[0].tokens
    return [engine.tokenizer.decode([t]) for t in tokens]


def _cut(tokens: list[str], where: str) -> tuple[list[str], str, int]:
    """(stop strings, the reply cut at the first, how many tokens write it) for a reply of `tokens` (their texts)
    cut in its 6th token: at its start, inside it (after its first letter), or inside it after text held back as
    the start of another stop string that does not come (the 6th token's text then a "§")."""
    head, sixth, seventh = "".join(tokens[:5]), tokens[5], tokens[6]
    at = len(sixth) - len(sixth.lstrip()) + 1 if where == "inside" else 1 if where == "held" else 0
    stops = [(sixth + seventh)[at:]] + ([sixth + "§"] if where == "held" else [])
    return stops, head + sixth[:at], 6 if at else 5


@pytest.mark.parametrize("where", ["at a token", "inside", "held"])
def test_logprobs_are_those_of_the_tokens_that_write_the_text_cut_at_a_stop_string(served, where):
    """language-planner#3 (GPT-3's logprobs ran past the stop sequence, so the mean log-probability of the
    returned answer took in tokens it does not hold): the logprobs of a reply cut at a `stop` string are those of
    the tokens that write its text, whole, streamed and from /v1/completions, as for a reply cut at a stop token;
    the one the stop string begins in stays where it writes text before it. Usage still counts every token
    generated (the stop string's too, as OpenAI and vLLM bill them)."""
    client, engine = served
    chat, completion = _greedy(engine, messages=ASK), _greedy(engine, prompt=PROMPT)
    for tokens, call in [(chat, lambda **kw: client.chat.completions.create(model="tiny", messages=ASK, **kw)),
                         (completion, lambda **kw: client.completions.create(model="tiny", prompt=PROMPT, **kw))]:
        assert len(tokens[5].strip()) > 1  # a stop string can begin inside it, after its first letter
        stops, text, kept = _cut(tokens, where)
        reply = "".join(tokens)
        assert min(reply.find(stop) for stop in stops if stop in reply) == len(text)
        chat_call = tokens is chat
        params = dict(max_tokens=12, stop=stops, logprobs=True if chat_call else 1)
        whole = call(**params).choices[0]
        names = [e.token for e in whole.logprobs.content] if chat_call else whole.logprobs.tokens
        assert (whole.message.content if chat_call else whole.text) == text
        assert names == tokens[:kept] and whole.finish_reason == "stop"
        if chat_call:
            chunks = list(call(**params, stream=True, stream_options={"include_usage": True}))
            streamed = [e.token for c in chunks if c.choices and c.choices[0].logprobs
                        for e in c.choices[0].logprobs.content]
            assert streamed == tokens[:kept] and chunks[-1].usage.completion_tokens == 7
        else:
            assert whole.logprobs.text_offset == [len("".join(tokens[:k])) for k in range(kept)]
