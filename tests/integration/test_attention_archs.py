"""The default attention across architectures, on the path train() takes: the model loaded as
train() loads it, `choose_attention`, batches collated with flatten/bucket as train() sets them,
and `selective_loss_sum`. Loss and gradients of the packed batch must equal those of every
example alone under transformers' eager attention (fp32). Architectures whose attention
sftlab_varlen cannot compute must be routed to transformers' attention, with one log line."""

from __future__ import annotations

import logging

import pytest
import torch
from test_train_invariants import demo_examples, packed_rows

from sftlab.errors import SftlabError
from sftlab.train.attention import NAME, VERIFIED, can_flatten, choose_attention, register, varlen_attention_forward

WINDOW = 8  # sliding window far shorter than the examples (52-75 tokens), so it matters
SLIDING_FIRST = ["sliding_attention", "full_attention"]

# model_type -> tiny config overrides; each must end on sftlab_varlen and match exactly
VARLEN_ARCHS = {
    "llama": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),  # layer 1 slides
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "mistral": dict(sliding_window=WINDOW),
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=SLIDING_FIRST),
    "phi3": dict(sliding_window=WINDOW),
    "gpt_oss": dict(sliding_window=WINDOW, layer_types=SLIDING_FIRST, num_local_experts=4, num_experts_per_tok=2),
}
# model_type -> (overrides, the reason the log line must give); each must keep transformers' attention
FALLBACK_ARCHS = {
    "llama4_text": (dict(attention_chunk_size=WINDOW, intermediate_size_mlp=128, num_local_experts=2),
                    "chunked_attention"),
    "gemma2": (dict(sliding_window=WINDOW, attn_logit_softcapping=0.5), "attn_logit_softcapping"),
    "olmo2": ({}, "not among those tested"),
}


@pytest.fixture(scope="module")
def examples(tokenizer):
    return demo_examples(tokenizer)[:6]


def save_tiny(model_type, tokenizer, path, **overrides):
    """A tiny random `model_type` (hidden 64, 2 layers) saved with the sizes in `overrides` in place of these."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=tokenizer.pad_token_id,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = AutoConfig.for_model(model_type, **{**sizes, **overrides})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def loss_and_grads(model, batches):
    from sftlab.train.loss import selective_loss_sum

    model.train().zero_grad()
    total, count = 0.0, 0
    for batch in batches:
        loss_sum, n = selective_loss_sum(model, batch)
        loss_sum.backward()
        total, count = total + loss_sum.item(), count + n
    return total, count, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_default_path_equals_each_example_alone(path, tokenizer, examples):
    """Returns the attention train() chose."""
    from sftlab.data.pack import collate, shape_bucket
    from sftlab.models import load_model

    reference = load_model(path, dtype="float32", attn_implementation="eager")
    alone = loss_and_grads(reference, [collate([[e]]) for e in examples])

    model = load_model(path, dtype="float32")  # as build_model loads it, then:
    choose_attention(model, None, packing=True)
    flatten = can_flatten(model)
    rows = packed_rows(examples)
    batch = collate(rows, flatten=flatten, bucket=True)
    lengths = [sum(len(e) for e in row) for row in rows]
    assert batch["input_ids"].shape == ((1, shape_bucket(sum(lengths))) if flatten else
                                        (len(rows), shape_bucket(max(lengths))))
    packed = loss_and_grads(model, [batch])

    assert packed[1] == alone[1]
    assert packed[0] == pytest.approx(alone[0], rel=1e-6)
    assert packed[2].keys() == alone[2].keys()
    for name, grad in alone[2].items():
        torch.testing.assert_close(packed[2][name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
    return model.config._attn_implementation


def test_verified_architectures_are_the_tested_ones():
    assert VERIFIED == set(VARLEN_ARCHS)


@pytest.mark.parametrize("model_type", list(VARLEN_ARCHS))
def test_varlen_packed_equals_each_example_alone(model_type, tokenizer, examples, tmp_path):
    path = save_tiny(model_type, tokenizer, tmp_path, **VARLEN_ARCHS[model_type])
    assert assert_default_path_equals_each_example_alone(path, tokenizer, examples) == NAME


@pytest.mark.parametrize("model_type", list(FALLBACK_ARCHS))
def test_fallback_is_logged_once_and_equal(model_type, tokenizer, examples, tmp_path, caplog):
    overrides, reason = FALLBACK_ARCHS[model_type]
    path = save_tiny(model_type, tokenizer, tmp_path, **overrides)
    with caplog.at_level(logging.INFO, logger="sftlab.train"):
        chosen = assert_default_path_equals_each_example_alone(path, tokenizer, examples)
    assert chosen != NAME
    lines = [r.getMessage() for r in caplog.records if r.name == "sftlab.train"]
    assert len(lines) == 1 and reason in lines[0] and model_type in lines[0], lines


def test_explicit_varlen_is_refused_where_it_would_be_wrong(tokenizer, tmp_path):
    from sftlab.models import load_model

    register()
    path = save_tiny("llama4_text", tokenizer, tmp_path, **FALLBACK_ARCHS["llama4_text"][0])
    model = load_model(path, dtype="float32", attn_implementation=NAME)
    with pytest.raises(SftlabError, match="chunked_attention"):
        choose_attention(model, NAME)


@pytest.mark.parametrize("model_type,refusal", [("llama", None), ("falcon", "AttentionInterface")])
def test_explicit_varlen_through_build_model(model_type, refusal, tokenizer, tmp_path):
    """As `sftlab train` asks for it: set where it computes the model's attention, refused with a
    reason where not, also for a model whose constructor reads the name (Falcon's)."""
    from sftlab.config import TrainConfig
    from sftlab.train.trainer import build_model

    extra = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4) if model_type == "falcon" else {}
    if model_type == "falcon":
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model("falcon", vocab_size=len(tokenizer), **extra)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
        path = str(tmp_path)
    else:
        path = save_tiny(model_type, tokenizer, tmp_path)
    config = TrainConfig.model_validate({"model": {"name_or_path": path, "attn_implementation": NAME},
                                         "method": "full", "data": {"train": "x.jsonl"}})
    if refusal:
        with pytest.raises(SftlabError, match=f"{NAME} cannot run {model_type}: .*{refusal}"):
            build_model(config, use_bf16=False)
    else:
        assert build_model(config, use_bf16=False).config._attn_implementation == NAME


def test_packing_is_refused_where_the_mask_ignores_position_restarts(tokenizer, tmp_path):
    """gpt-oss (transformers 5.24) builds its sdpa/eager masks without position_ids: packed
    examples would attend to each other."""
    from sftlab.models import load_model

    path = save_tiny("gpt_oss", tokenizer, tmp_path, **VARLEN_ARCHS["gpt_oss"])
    model = load_model(path, dtype="float32", attn_implementation="eager")
    with pytest.raises(SftlabError, match="data.packing"):
        choose_attention(model, "eager", packing=True)
    choose_attention(model, "eager", packing=False)  # one example per row: nothing to leak


STATEFUL = {  # model_type -> (tiny config overrides, the layer kinds the refusal names)
    "lfm2": (dict(layer_types=["conv", "full_attention"]), "conv"),
    # Nemotron-H lists its feed-forward layers among its layer types: not named as carrying state
    "nemotron_h": (dict(layers_block_type=["linear_attention", "moe", "full_attention", "mlp"], mamba_num_heads=2,
                        mamba_head_dim=64, n_groups=1, ssm_state_size=16, chunk_size=16, n_routed_experts=4,
                        num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32),
                   "linear_attention"),
}


@pytest.mark.parametrize("model_type", list(STATEFUL))
@pytest.mark.parametrize("packing", [True, False])
def test_packing_is_refused_where_a_layer_carries_state_along_the_row(packing, model_type, tokenizer, tmp_path):
    """LFM2's short convolutions (as Mamba's and gated-delta layers' states) run along the whole
    row whatever the attention mask says: packed examples would see each other, through build_model
    as `sftlab train` loads the model. One example per row has nothing to leak."""
    from sftlab.config import TrainConfig
    from sftlab.train.trainer import build_model

    overrides, kinds = STATEFUL[model_type]
    path = save_tiny(model_type, tokenizer, tmp_path, **overrides)
    config = TrainConfig.model_validate({"model": {"name_or_path": path}, "method": "full",
                                         "data": {"train": "x.jsonl", "packing": packing}})
    if packing:
        with pytest.raises(SftlabError, match=rf"data.packing: .* {model_type} \(its {kinds} layers carry state.*"
                                              "data.packing=false"):
            build_model(config, use_bf16=False)
    else:
        assert not can_flatten(build_model(config, use_bf16=False))


@pytest.mark.parametrize("model_type,apart", [
    ("llama", True), ("qwen3_moe", True),  # attention that reads the restarts, per-token experts
    ("opt", False),  # learned positions and a mask from attention_mask, not from position_ids
    ("mamba", False), ("qwen3_next", False),  # state-space and gated-delta layers
])
def test_examples_kept_apart_reads_every_kind_of_layer(model_type, apart):
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftlab.train.attention import examples_kept_apart

    config = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "qwen3_next":
        config.layer_types = ["linear_attention", "full_attention"]
    torch.manual_seed(0)
    assert examples_kept_apart(AutoModelForCausalLM.from_config(config).eval()) is apart


def test_unknown_arguments_reaching_varlen_are_errors():
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    passed = dict(position_ids=torch.arange(6)[None], use_cache=False, output_attentions=False, cu_seq_lens_k=None,
                  max_length_q=None, not_set=None)
    out, _ = varlen_attention_forward(module, q, k, v, None, **passed)
    assert out.shape == (1, 6, 2, 4)
    for bad, match in [(dict(softcap=30.0), "softcap"), (dict(is_causal=False), "is_causal=False"),
                       (dict(attention_bias=torch.zeros(1)), "attention_bias")]:
        with pytest.raises(SftlabError, match=match):
            varlen_attention_forward(module, q, k, v, None, **passed, **bad)
    module.is_causal = False  # an encoder-style layer
    with pytest.raises(SftlabError, match="is_causal=False"):
        varlen_attention_forward(module, q, k, v, None, **passed)


def test_dora_on_a_mixture_of_experts_is_a_clear_error(tokenizer, tmp_path):
    """PEFT cannot apply DoRA to fused expert weights, which all-linear picks on a MoE model: one
    error naming the way out (the attention projections), and that way out trains."""
    from sftlab.config import TrainConfig
    from sftlab.train.trainer import build_model

    path = save_tiny("qwen3_moe", tokenizer, tmp_path, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

    def config(**lora):
        return TrainConfig.model_validate({"model": {"name_or_path": path}, "method": "dora", "lora": lora,
                                           "data": {"train": "x.jsonl"}})

    with pytest.raises(SftlabError, match=r"method dora: PEFT cannot apply DoRA .*lora.target_modules=\[q_proj"):
        build_model(config(), use_bf16=False)
    build_model(config(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), use_bf16=False)
