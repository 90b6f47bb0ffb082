"""Continuous batching in `sftlab serve` (torch): a request joins the running batch at the next decode step
and leaves it at its last token, and every request still gets exactly its unbatched greedy tokens."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture(scope="module")
def engine(tokenizer):
    """A tiny random Llama whose greedy tokens vary with the context (untied, std 0.1: the shared tiny model
    answers these prompts with one token repeated), with attention scores small enough that a wrong cache
    row, mask column or position changes them (checked by breaking each). No stop tokens: replies are as
    long as the tests ask."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftlab.serve.generation import TorchEngine

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         initializer_range=0.1, pad_token_id=tokenizer.pad_token_id)
    return TorchEngine(LlamaForCausalLM(config), tokenizer, [])


def _prompt(engine, n: int) -> list[int]:
    from sftlab.serve.generation import encode

    return encode(engine.tokenizer, messages=[{"role": "user", "content": "word " * n}])


def _greedy_without_cache(model, ids: list[int], n: int) -> list[int]:
    """The plainest reference: the whole sequence through the model for every token, one sequence, no cache."""
    import torch

    ids = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1).logits[0, -1].argmax()))
    return ids[-n:]


def test_requests_joining_and_leaving_mid_decode_get_their_unbatched_greedy_tokens(engine, monkeypatch):
    """Scripted schedule: a request decodes alone, others join it (shorter and longer prompts, two at once),
    some leave early (max_tokens; a stop token), their cache rows and the padding only they needed dropped,
    and each request's tokens equal the same request decoded alone and a no-cache greedy loop."""
    from sftlab.serve.generation import GenRequest

    plan = [(12, 30, 0), (2, 6, 4), (40, 20, 7), (5, 12, 7), (25, 9, 15)]  # (prompt words, max tokens, join at step)
    requests = [GenRequest(_prompt(engine, words), max_new) for words, max_new, _ in plan]
    references = [_greedy_without_cache(engine.model, r.ids, r.max_new_tokens) for r in requests]
    stop = references[3][4]  # a stop token: request 3 ends on it mid-batch (others too if they reach it)
    monkeypatch.setattr(engine, "stop_ids", {stop})
    references = [ref[:ref.index(stop)] if stop in ref else ref for ref in references]
    results, running, joins = {}, None, 0
    for step in range(60):
        joining = [r for r, (_, _, at) in zip(requests, plan) if at == step]
        if joining:
            new = engine.prefill(joining)
            joins += running is not None and len(running) > 0
            running = new if running is None else engine.join(running, new)
        if running is not None:
            engine.step(running)
            results.update((id(req), res) for req, res in running.pop_finished())
    assert joins == 3 and len(results) == len(requests) and not running
    assert results[id(requests[3])].finish_reason == "stop" and len(references[3]) < 5
    for r, ref in zip(requests, references):
        got = results[id(r)]
        assert got.tokens == ref and got.finish_reason == ("length" if len(ref) == r.max_new_tokens else "stop")
        assert got.tokens == engine.generate([GenRequest(r.ids, r.max_new_tokens)])[0].tokens


def _generate(backend, ids, max_tokens, **kw):
    return backend.generate(ids=ids, max_tokens=max_tokens, temperature=kw.pop("temperature", 0.0), top_p=1.0, **kw)


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_short_request_sent_while_a_long_one_decodes_finishes_first(engine, batching):
    """Sent after the long request's first token, the short one (4 tokens) joins at the next step and finishes
    while the long one (600 tokens) still decodes. Statically batched, it waits for the long one to finish."""
    from sftlab.serve.backends import BatchingBackend

    backend = BatchingBackend(engine, batching=batching, max_wait_ms=1)
    order, pieces = [], []

    async def run():
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def on_text(text):
            pieces.append(text)
            loop.call_soon_threadsafe(started.set)

        long = asyncio.ensure_future(_generate(backend, _prompt(engine, 20), 600, on_text=on_text))
        long.add_done_callback(lambda _: order.append("long"))
        await started.wait()
        short = await _generate(backend, _prompt(engine, 1), 4)
        order.append("short")
        return short, len(pieces), await long

    try:
        short, long_pieces_then, long = asyncio.run(run())
    finally:
        backend.close()
    assert (short.completion_tokens, long.completion_tokens) == (4, 600)
    if batching == "continuous":
        assert order == ["short", "long"]
        assert long_pieces_then < 600  # the long request was still decoding when the short one was answered
    else:
        assert order == ["long", "short"]


def test_staggered_requests_through_the_server_backend_equal_their_unbatched_greedy_text(engine, monkeypatch):
    """Each request is sent when the one before it has streamed 3 pieces, so each joins a running batch; the
    texts are the requests' unbatched greedy texts, and a seeded sampled request repeats its text alone."""
    from sftlab.serve.backends import BatchingBackend
    from sftlab.serve.generation import GenRequest

    joined, join = [], engine.join
    monkeypatch.setattr(engine, "join", lambda running, new: joined.append(len(running)) or join(running, new))
    backend = BatchingBackend(engine, max_wait_ms=1)
    plan = [(9, 40), (1, 12), (30, 25), (4, 3), (17, 30)]
    prompts = [_prompt(engine, words) for words, _ in plan]

    async def run():
        loop = asyncio.get_running_loop()
        tasks = []
        for ids, (_, max_new) in zip(prompts, plan):
            seen, count = asyncio.Event(), []

            def on_text(_, seen=seen, count=count):
                count.append(1)
                if len(count) == 3:
                    loop.call_soon_threadsafe(seen.set)

            tasks.append(asyncio.ensure_future(_generate(backend, ids, max_new, on_text=on_text)))
            await asyncio.wait({tasks[-1], asyncio.ensure_future(seen.wait())}, return_when=asyncio.FIRST_COMPLETED)
        sampled = asyncio.ensure_future(_generate(backend, prompts[1], 16, temperature=1.0, seed=11))
        return await asyncio.gather(*tasks), await sampled, await _generate(backend, prompts[1], 16, temperature=1.0,
                                                                              seed=11)

    try:
        outs, sampled_in_batch, sampled_alone = asyncio.run(run())
    finally:
        backend.close()
    assert backend.batching == "continuous" and sum(n > 0 for n in joined) >= 3
    decode = engine.tokenizer.decode
    for ids, (_, max_new), out in zip(prompts, plan, outs):
        alone = engine.generate([GenRequest(ids, max_new)])[0].tokens
        assert (out.text, out.completion_tokens) == (decode(alone, skip_special_tokens=True), max_new)
    assert sampled_in_batch.text == sampled_alone.text


def test_batching_modes_and_models_that_cannot_join(engine, tokenizer):
    """auto is continuous on a plain full-attention cache and static where rows cannot be merged (a sliding
    window here; the onnx engine); asking for continuous there is an error, not a silent fallback."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from sftlab.errors import SftlabError
    from sftlab.serve.backends import BatchingBackend, load_backend
    from sftlab.serve.generation import GenRequest, TorchEngine

    torch.manual_seed(0)
    sliding = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               sliding_window=8))
    windowed = TorchEngine(sliding, tokenizer, [])
    assert engine.joinable and not windowed.joinable
    for eng, mode, expected in [(engine, "auto", "continuous"), (engine, "static", "static"),
                                (windowed, "auto", "static")]:
        backend = BatchingBackend(eng, batching=mode)
        assert backend.batching == expected
        backend.close()
    with pytest.raises(SftlabError, match="continuous batching needs"):
        BatchingBackend(windowed, batching="continuous")
    with pytest.raises(SftlabError, match="continuous batching needs the torch backend"):
        load_backend("unused", "onnx", batching="continuous")
    # statically batched, a finished row rides along in a cache whose rows cannot be dropped
    prompts = [_prompt(engine, n) for n in (1, 12)]
    batched = windowed.generate([GenRequest(prompts[0], 3), GenRequest(prompts[1], 10)])
    assert [len(r.tokens) for r in batched] == [3, 10]
    assert [r.tokens for r in batched] == [windowed.generate([GenRequest(p, n)])[0].tokens
                                           for p, n in zip(prompts, (3, 10))]
