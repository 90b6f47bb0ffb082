"""The torch engine's sampling parameters on a tiny model, checked against the model's own logits from a plain
forward pass (no cache, one sequence): logit_bias, presence/frequency penalties (over the reply) and the
repetition penalty (over prompt and reply) change exactly the logits they name, top_k and min_p leave exactly
the tokens they keep, logprobs are the log-softmax of the raw logits, every row of a batch gets its own, and
the greedy default path does none of this work. The onnx engine does what it supports as the torch engine."""

from __future__ import annotations

import pytest

PROMPT = "Once upon a time there was a"


@pytest.fixture(scope="module")
def engine(tokenizer):
    """Untied, std 0.1: logits spread enough that top_k, min_p and penalties pick differently. No stop tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftlab.serve.generation import TorchEngine

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         initializer_range=0.1, pad_token_id=tokenizer.pad_token_id)
    return TorchEngine(LlamaForCausalLM(config), tokenizer, [])


@pytest.fixture
def ids(engine):
    return engine.tokenizer(PROMPT)["input_ids"]


def _raw(engine, ids: list[int]):
    """The model's next-token logits after `ids`: the whole sequence through it, no cache."""
    import torch

    with torch.inference_mode():
        return engine.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


def _picked_from(engine, monkeypatch) -> list:
    """Records the logits the engine picks each token from (those of its first row)."""
    seen, pick = [], engine._pick
    monkeypatch.setattr(engine, "_pick", lambda logits, *a: seen.append(logits[0].clone()) or pick(logits, *a))
    return seen


def _expected(raw, prompt: list[int], reply: list[int], logit_bias=None, presence_penalty=0.0, frequency_penalty=0.0,
              repetition_penalty=1.0):
    """The reference, token by token: bias; repetition over prompt and reply; presence and frequency over the reply."""
    out = raw.clone()
    for tok, bias in (logit_bias or {}).items():
        out[tok] += bias
    for tok in set(prompt + reply):
        out[tok] = out[tok] / repetition_penalty if out[tok] > 0 else out[tok] * repetition_penalty
    for tok in set(reply):
        out[tok] -= presence_penalty + frequency_penalty * reply.count(tok)
    return out


@pytest.mark.parametrize("params", [
    {"presence_penalty": 1.5}, {"frequency_penalty": -1.0}, {"presence_penalty": -0.5, "frequency_penalty": 0.4},
    {"repetition_penalty": 1.8}, {"repetition_penalty": 0.6}, "bias",
    {"presence_penalty": 0.8, "frequency_penalty": 0.5, "repetition_penalty": 1.4, "bias": True},
], ids=str)
def test_penalties_and_logit_bias_shift_exactly_the_logits_they_name(engine, ids, monkeypatch, params):
    from sftlab.serve.generation import GenRequest

    params = {"bias": True} if params == "bias" else dict(params)
    if params.pop("bias", False):  # the prompt's first token down, the plain greedy reply's first up
        first = engine.generate([GenRequest(ids, 1)])[0].tokens[0]
        params["logit_bias"] = {ids[0]: -3.0, first: 2.5, 7: 100.0}
    seen = _picked_from(engine, monkeypatch)
    reply = engine.generate([GenRequest(ids, 8, **params)])[0].tokens
    assert len(seen) == len(reply) == 8
    for k, scores in enumerate(seen):
        want = _expected(_raw(engine, ids + reply[:k]), ids, reply[:k], **params)
        assert (scores - want).abs().max() < 1e-4, k
        assert reply[k] == int(want.argmax())


def test_logprobs_are_the_log_softmax_of_the_raw_logits(engine, ids):
    """Sampled at temperature 0.7 with a logit_bias and penalties: each token's logprob and its top 5 are those
    of the model's own logits, before any of them."""
    import torch

    from sftlab.serve.generation import GenRequest

    request = GenRequest(ids, 6, temperature=0.7, seed=3, logprobs=5, logit_bias={7: 5.0}, presence_penalty=1.0,
                         top_k=40)
    result = engine.generate([request])[0]
    assert len(result.logprobs) == len(result.tokens) == 6
    for k, entry in enumerate(result.logprobs):
        logp = torch.log_softmax(_raw(engine, ids + result.tokens[:k]), -1)
        values, top = logp.topk(5)
        assert entry.token == result.tokens[k] and abs(entry.logprob - float(logp[entry.token])) < 1e-4
        assert [t for t, _ in entry.top] == top.tolist()
        assert max(abs(a - b) for (_, a), b in zip(entry.top, values.tolist())) < 1e-4
    assert engine.generate([GenRequest(ids, 2, logprobs=0)])[0].logprobs[0].top == []


def test_a_reply_ending_on_a_stop_token_has_the_logprobs_of_its_tokens_alone(engine, ids, monkeypatch):
    from sftlab.serve.generation import GenRequest

    greedy = engine.generate([GenRequest(ids, 3)])[0].tokens
    monkeypatch.setattr(engine, "stop_ids", {greedy[2]} - set(greedy[:2]))
    result = engine.generate([GenRequest(ids, 5, logprobs=1)])[0]
    assert result.finish_reason == "stop" and [e.token for e in result.logprobs] == result.tokens == greedy[:2]


def _drawn_from(engine, monkeypatch) -> list:
    """Records the distributions the engine samples from."""
    import torch

    seen, draw = [], torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, *a, **k: seen.append(probs.clone()) or draw(probs, *a, **k))
    return seen


@pytest.mark.parametrize("params", [{"top_k": 7}, {"min_p": 0.2}, {"top_k": 30, "min_p": 0.1, "top_p": 0.6},
                                    {"top_k": 1}, {"min_p": 1.0}], ids=str)
def test_top_k_and_min_p_keep_exactly_their_tokens(engine, ids, monkeypatch, params):
    """At temperature 0.8: the k most likely, those at least min_p times as likely as the most likely (as vLLM
    and transformers: both on the tempered distribution), then top_p of what is left, in proportion."""
    import torch

    from sftlab.serve.generation import GenRequest

    seen = _drawn_from(engine, monkeypatch)
    reply = engine.generate([GenRequest(ids, 4, temperature=0.8, seed=1, **params)])[0].tokens
    for k, probs in enumerate(seen):
        p = torch.softmax(_raw(engine, ids + reply[:k]) / 0.8, -1)
        order = p.argsort(descending=True).tolist()[:params.get("top_k") or None]
        keep = [t for t in order if p[t] >= params.get("min_p", 0.0) * p[order[0]]]
        mass, kept, before = float(p[keep].sum()), [], 0.0
        for t in keep:
            if before / mass < params.get("top_p", 1.0):
                kept.append(t)
                before += float(p[t])
        assert sorted(probs.nonzero().flatten().tolist()) == sorted(kept), k
        assert torch.allclose(probs[kept] / probs.sum(), p[kept] / p[kept].sum(), atol=1e-5)
        assert reply[k] in kept


def test_each_row_of_a_batch_gets_its_own_parameters(engine, ids):
    """Rows with different parameters decoded together get what each gets alone (prompts of other lengths too)."""
    from sftlab.serve.generation import GenRequest

    other = engine.tokenizer("A short one")["input_ids"]
    requests = [GenRequest(ids, 6), GenRequest(other, 6, presence_penalty=1.5, repetition_penalty=1.3, logprobs=2),
                GenRequest(ids, 6, logit_bias={ids[-1]: 4.0}, frequency_penalty=0.8),
                GenRequest(other, 6, temperature=0.9, seed=5, top_k=5, min_p=0.1, logprobs=0)]
    together = engine.generate(requests)
    for request, got in zip(requests, together):
        alone = engine.generate([request])[0]
        assert got.tokens == alone.tokens
        assert [(e.token, [t for t, _ in e.top]) for e in got.logprobs] == [
            (e.token, [t for t, _ in e.top]) for e in alone.logprobs]
        assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(got.logprobs, alone.logprobs))
    assert together[0].tokens != together[2].tokens and together[1].logprobs and not together[0].logprobs


def test_the_greedy_default_path_does_no_extra_work(engine, ids, monkeypatch):
    """Defaults: no logits shifted, no logprobs computed, nothing drawn; the plain greedy tokens."""
    import torch

    from sftlab.serve.generation import GenRequest

    def never(*_):
        raise AssertionError("called on the default path")

    for name in ("_shift", "_logprobs"):
        monkeypatch.setattr(engine, name, never)
    monkeypatch.setattr(torch, "multinomial", never)
    result = engine.generate([GenRequest(ids, 5), GenRequest(ids[:3], 5, top_k=3, min_p=0.5)])
    for request, got in zip([ids, ids[:3]], result):
        want = list(request)
        for _ in range(5):
            want.append(int(_raw(engine, want).argmax()))
        assert got.tokens == want[-5:] and got.logprobs == []


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, tiny_model_dir):
    from sftlab.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "model"
    assert export_onnx(str(tiny_model_dir), out, precision="fp32").ok
    return out


@pytest.mark.slow
def test_the_onnx_engine_does_what_it_supports_as_the_torch_engine(onnx_dir, tiny_model_dir):
    """logprobs, logit_bias, repetition_penalty (greedy) as the torch engine on the same weights; what it does not
    implement is refused, not ignored."""
    from sftlab.serve.generation import GenRequest, OnnxEngine, TorchEngine

    onnx, torch_engine = OnnxEngine.from_pretrained(onnx_dir), TorchEngine.from_pretrained(tiny_model_dir)
    onnx.stop_ids = torch_engine.stop_ids = set()
    ids = torch_engine.tokenizer(PROMPT)["input_ids"]
    plain = torch_engine.generate([GenRequest(ids, 1)])[0].tokens[0]
    requests = [GenRequest(ids, 6, logprobs=3), GenRequest(ids, 6, logit_bias={plain: -50.0, 9: 3.0}, logprobs=1),
                GenRequest(ids, 6, repetition_penalty=2.5),
                GenRequest(ids, 6, repetition_penalty=1.5, logit_bias={9: 2.0})]
    for got, want in zip(onnx.generate(requests), torch_engine.generate(requests)):
        assert got.tokens == want.tokens
        assert [(e.token, [t for t, _ in e.top]) for e in got.logprobs] == [
            (e.token, [t for t, _ in e.top]) for e in want.logprobs]
        assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(got.logprobs, want.logprobs))
    for name, value in (("presence_penalty", 0.5), ("frequency_penalty", 0.5), ("min_p", 0.1)):
        with pytest.raises(ValueError, match=name):
            onnx.generate([GenRequest(ids, 2, **{name: value})])
