"""Tiny random models of architectures found wrong by a sweep over transformers' causal LMs (an external
checker's way: a tiny model of each, then `sftlab train` with LoRA and in full, and `sftlab estimate`), on the
model `sftlab train` builds: each either builds, runs a training step and has the trainable count the estimate
gives, or is refused with one line saying why."""

from __future__ import annotations

import pytest
import torch
from test_attention_archs import STATEFUL, save_tiny

from sftlab.errors import SftlabError

# model_type -> tiny config overrides beyond the common sizes, and what was wrong
ARCHS = {
    # its forward takes input_ids alone (no inputs_embeds) and puts prompt tokens before them: the check that packed
    # examples stay apart could not run, training packed them unchecked (with a warning), and they saw each other
    "cpmant": dict(dim_ff=128, dim_head=16, prompt_length=4, prompt_types=4, segment_types=4,
                   position_bias_num_buckets=32, position_bias_max_distance=64),
    # the grouped o_a_proj (an nn.Linear reading [..., groups, in]): LoRA all-linear was a RuntimeError traceback
    "deepseek_v4": dict(head_dim=8, num_key_value_heads=4, qk_rope_head_dim=8, q_lora_rank=32, o_lora_rank=16,
                        o_groups=2, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        index_head_dim=16, index_n_heads=2),
    # head_dim varies per layer (per_layer_config): `sftlab estimate` was a traceback
    "gemma4_unified_text": dict(per_layer_config={"1": {"head_dim": 32}}),
    # z_L_init has requires_grad=False: the estimate counted it as trained in full fine-tuning
    "hrm_text": dict(num_layers_per_stack=1),
    # the gated norm of its linear attention takes gate=None and fails on it: `sftlab estimate` was a traceback
    "kimi_linear": dict(head_dim=8, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, linear_head_dim=16, linear_num_heads=4, num_experts=4,
                        num_experts_per_token=2, num_expert_group=1, topk_group=1, moe_intermediate_size=32,
                        layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"]),
    # the router's e_score_correction_bias (requires_grad=False) came back trainable from loading: trained count + 4
    "laguna": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                   mlp_layer_types=["dense", "sparse"]),
}
# packing refused with one line (and one example per row trains)
PACKING_REFUSED = {"cpmant", "kimi_linear"}


@pytest.fixture(scope="module")
def examples(tokenizer):
    from test_train_invariants import demo_examples

    return demo_examples(tokenizer)[:3]


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_a_step_trains_and_the_estimate_counts_what_trains(model_type, tokenizer, examples, tmp_path):
    from sftlab.config import TrainConfig
    from sftlab.data.pack import collate
    from sftlab.estimate import estimate_memory
    from sftlab.train.loss import selective_loss_sum
    from sftlab.train.trainer import build_model

    path = save_tiny(model_type, tokenizer, tmp_path, **ARCHS[model_type])

    def config(method, packing=True):
        return TrainConfig.model_validate({"model": {"name_or_path": path}, "method": method, "lora": {"r": 4},
                                           "data": {"train": "x.jsonl", "packing": packing}})

    if model_type in PACKING_REFUSED:
        with pytest.raises(SftlabError, match=f"data.packing: examples packed in one row would see each other in "
                                              f"{model_type} .*set data.packing=false"):
            build_model(config("lora"), use_bf16=False)
    for method in ("lora", "full"):
        model = build_model(config(method, packing=model_type not in PACKING_REFUSED), use_bf16=False)
        loss_sum, n = selective_loss_sum(model.train(), collate([examples]))
        assert n > 0 and torch.isfinite(loss_sum)
        loss_sum.backward()
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        estimated = estimate_memory(path, method, seq_len=64, batch=1, lora_r=4).trainable_params
        assert estimated == trained, method


def test_the_estimate_of_nemotron_h_reads_its_layer_count_from_its_block_types(tokenizer, tmp_path):
    """Nemotron-H's config.json gives its layers as layers_block_type (num_hidden_layers is derived from it):
    `sftlab estimate` refused it as a config that leaves the layer count to the class's default."""
    from sftlab.config import TrainConfig
    from sftlab.estimate import estimate_memory
    from sftlab.train.trainer import build_model

    path = save_tiny("nemotron_h", tokenizer, tmp_path, **STATEFUL["nemotron_h"][0])
    model = build_model(TrainConfig.model_validate({"model": {"name_or_path": path}, "method": "full",
                                                    "data": {"train": "x.jsonl", "packing": False}}), use_bf16=False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate_memory(path, "full", seq_len=64, batch=1).trainable_params == trained


@pytest.mark.parametrize("axial,rows", [(True, "exactly 256 tokens"), (False, "a multiple of 16 tokens")])
def test_reformer_is_refused_in_one_line(axial, rows, tokenizer, tmp_path):
    """Reformer's forward trains only on rows of one length (its axial position embeddings' product, else a multiple
    of its attention chunks): `sftlab train` was a ValueError traceback at the first step."""
    from sftlab.config import TrainConfig
    from sftlab.train.trainer import build_model

    path = save_tiny("reformer", tokenizer, tmp_path, is_decoder=True, attn_layers=["local", "local"],
                     axial_pos_embds=axial, axial_pos_shape=[16, 16], axial_pos_embds_dim=[32, 32],
                     attention_head_size=16, feed_forward_size=128, local_attn_chunk_length=16,
                     max_position_embeddings=256)
    config = TrainConfig.model_validate({"model": {"name_or_path": path}, "method": "full",
                                         "data": {"train": "x.jsonl", "packing": False}})
    with pytest.raises(SftlabError, match=f"^model: ReformerModelWithLMHead trains only on rows of {rows} .*cannot "
                                          "train this model$"):
        build_model(config, use_bf16=False)


def test_packing_is_checked_on_a_lora_base_loaded_in_bf16(tokenizer, tmp_path):
    """XLNet's weights in bf16 run only under autocast, as training runs them: the check that packed examples stay
    apart ran without it and could not drive the model, so LoRA under bf16 trained packed unchecked (examples seeing
    each other) while full fine-tuning (fp32 weights) refused packing."""
    from sftlab.config import TrainConfig
    from sftlab.train.trainer import build_model

    path = save_tiny("xlnet", tokenizer, tmp_path, d_model=64, n_layer=2, n_head=4, d_head=16, d_inner=128)
    config = TrainConfig.model_validate({"model": {"name_or_path": path}, "method": "lora", "lora": {"r": 4},
                                         "data": {"train": "x.jsonl", "packing": True}})
    with pytest.raises(SftlabError, match="data.packing: examples packed in one row would see each other in xlnet "):
        build_model(config, use_bf16=True)


def test_the_packing_refusal_names_only_the_layers_that_carry_state(tokenizer, tmp_path):
    """Qwen4-exp's indexed_attention layers keep packed examples apart (their top-k indexer attends through the mask);
    the refusal named them among the layers carrying state along the row, beside its linear_attention ones."""
    from sftlab.config import TrainConfig
    from sftlab.train.trainer import build_model

    path = save_tiny("qwen4_exp_text", tokenizer, tmp_path, layer_types=["linear_attention", "indexed_attention"],
                     num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                     linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                     hc_lowrank=8, ngram_vocab_size_base=1000, make_ngram_vocab_size_divisible_by=8, split_ngram_parts=4,
                     heads_per_ngram=2, ple_embed_dim=64, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16,
                     indexer_budget=64, indexer_compress_ratio=4)
    config = TrainConfig.model_validate({"model": {"name_or_path": path}, "method": "full",
                                         "data": {"train": "x.jsonl", "packing": True}})
    with pytest.raises(SftlabError, match=r"in qwen4_exp_text \(its linear_attention layers carry state along the row\)"):
        build_model(config, use_bf16=False)
