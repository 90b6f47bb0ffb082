"""Mixtures of experts a new user tries with transformers 5 (experts as stacked 3-D tensors): with
`output_router_logits` the router's load-balancing loss trains as transformers' own loss adds it, whichever
attribute the architecture keeps its coefficient under."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sftlab.cli import main
from sftlab.train.loss import IGNORE, selective_loss_sum

VOCAB = 64
MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# model type -> its own sizes, and where its config keeps the load-balancing coefficient
ARCHS = {
    "mixtral": dict(router_aux_loss_coef=0.5),
    "qwen3_moe": dict(router_aux_loss_coef=0.5),
    "olmoe": dict(router_aux_loss_coef=0.5),
    "gpt_oss": dict(router_aux_loss_coef=0.5, layer_types=["sliding_attention", "full_attention"], sliding_window=8),
    "jetmoe": dict(aux_loss_coef=0.5, kv_channels=16, num_key_value_heads=4),
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0),
                 ffn_config=dict(moe_num_experts=4, moe_top_k=2, ffn_hidden_size=32, moe_loss_weight=0.5)),
}


def tiny_moe(model_type: str):
    sizes = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, **MOE)
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, output_router_logits=True,
                                  **{**sizes, **ARCHS[model_type]})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_router_gradients_are_those_of_transformers_own_loss(model_type):
    """The gradient of sftlab's loss (summed over a micro-batch's trained tokens / their count, as the
    trainer divides it) equals that of the model's own loss with labels, the routers' included: the
    load-balancing term is neither dropped nor weighted otherwise. JetMoe keeps its coefficient as
    `aux_loss_coef` and DBRX in ffn_config.moe_loss_weight: reading config.router_aux_loss_coef was an
    AttributeError at the first training step."""
    model = tiny_moe(model_type)
    ids = torch.randint(VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = IGNORE  # a prompt
    position_ids = torch.arange(12).expand(2, -1)
    reference = model(input_ids=ids, labels=labels, position_ids=position_ids, use_cache=False)
    assert reference.aux_loss > 0.1  # the load-balancing term matters at this size
    reference.loss.backward()
    expected = grads(model)
    loss_sum, n = selective_loss_sum(model, {"input_ids": ids, "labels": labels, "position_ids": position_ids})
    (loss_sum / n).backward()
    got = grads(model)
    assert got.keys() == expected.keys()
    routers = [k for k, g in expected.items() if g.dim() == 2 and g.shape[0] == 4]  # [experts, hidden]
    assert routers
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def jetmoe_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("jetmoe")
    config = AutoConfig.for_model("jetmoe", vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, kv_channels=16, intermediate_size=64,
                                  num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                                  aux_loss_coef=0.5, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_train_names_the_load_balancing_coefficient_of_a_jetmoe(jetmoe_dir, tmp_path, capsys):
    """`sftlab train` on a JetMoe asking for its router logits: an AttributeError traceback
    ('JetMoeConfig' object has no attribute 'router_aux_loss_coef') before the first step."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in ("a", "b", "c")))
    assert main(["train", "-", f"model.name_or_path={jetmoe_dir}", f"data.train={data}", "data.max_seq_length=64",
                 "training.max_steps=1", "training.bf16=false", "method=full", f"output_dir={tmp_path / 'run'}"]) == 0
    assert "router load-balancing loss x 0.5 added to the training loss" in capsys.readouterr().out


@pytest.fixture(scope="module")
def phimoe_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("phimoe")
    config = AutoConfig.for_model("phimoe", vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                  num_local_experts=4, num_experts_per_tok=2, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_all_linear_leaves_out_a_router_peft_cannot_wrap_and_the_estimate_counts_what_trains(phimoe_dir, tmp_path,
                                                                                          capsys):
    """PhiMoE's router is an nn.Linear whose forward returns (logits, routing weights, experts): all-linear
    wrapped it and the first step was an AttributeError traceback in PEFT ('tuple' object has no attribute
    'dtype'). It is left out; the estimate's trainable count is PEFT's; naming it is one error line."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in ("a", "b", "c")))
    args = ["train", "-", f"model.name_or_path={phimoe_dir}", f"data.train={data}", "data.max_seq_length=64",
            "training.max_steps=1", "training.bf16=false", "lora.r=4"]
    assert main([*args, f"output_dir={tmp_path / 'run'}"]) == 0
    trained = json.loads((tmp_path / "run" / "run.json").read_text())["trainable_params"]
    assert "lora.target_modules all-linear: PEFT leaves mlp.router without an adapter" in capsys.readouterr().out
    assert main(["estimate", str(phimoe_dir), "--method", "lora", "--lora-r", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_params"] == trained
    assert main([*args, "lora.target_modules=[q_proj,router]", f"output_dir={tmp_path / 'named'}"]) == 1
    err = capsys.readouterr().err
    assert "picks 'router', which PEFT cannot adapt on PhimoeForCausalLM" in err and "Traceback" not in err


@pytest.mark.parametrize("model_type", ["deepseek_v3", "glm4_moe"])
def test_the_estimate_counts_the_linear_layers_peft_adapts_on_a_moe_with_shared_experts(model_type):
    """On the MoEs PEFT maps from their transformers 4 names, all-linear takes every gate_proj/up_proj/down_proj
    for the experts' stacked tensors: the first (dense) layer's MLP and the shared experts get no adapter. The
    estimate counted them among its LoRA layers ('r=4 on 16 linear layers'), and their LoRA activations."""
    from peft import LoraConfig, get_peft_model

    from sftlab.estimate import model_shape

    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                  n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                  n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                                  q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                  v_head_dim=16)
    with torch.device("meta"):
        peft = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=1, target_modules="all-linear"))
    adapted = {n.removeprefix("base_model.model.") for n, m in peft.named_modules()
               if hasattr(m, "lora_A") and isinstance(m.get_base_layer(), torch.nn.Linear)}
    estimated = {n for n, _, _ in model_shape(config).lora_candidates}
    assert "model.layers.1.mlp.shared_experts.gate_proj" not in adapted  # PEFT's doing, checked
    assert estimated == adapted


def test_no_warning_that_the_fused_expert_patterns_are_ignored_when_they_apply(recwarn):
    """On Mixtral-type models PEFT sets rank and alpha 2 x r on the stacked gate_up_proj, then warns that these
    patterns 'did not match any targeted module and were ignored' (in each estimate, train, eval and export):
    they apply, as the adapters' shapes show."""
    from peft import LoraConfig, get_peft_model

    from sftlab.estimate import model_shape

    model_shape(tiny_moe("mixtral").config)
    assert not [w for w in recwarn if "pattern keys" in str(w.message)]
    peft = get_peft_model(tiny_moe("mixtral"), LoraConfig(r=4, target_modules="all-linear"))
    experts = peft.base_model.model.model.layers[0].mlp.experts
    assert experts.base_layer.lora_A["default"].weight.shape[0] == 4 * 2 * 4  # gate_up_proj: 4 experts x 2r


# more mixtures of experts a new user tries: model type -> its sizes beyond the common ones (multi-head latent
# attention: as many key/value heads as heads, head_dim the rotary part)
MORE_MOES = {
    "minimax": dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"],
                    block_size=16),
    "longcat_flash": dict(n_routed_experts=4, moe_topk=2, expert_ffn_hidden_size=32, ffn_hidden_size=64, num_layers=1,
                          q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                          zero_expert_num=2, head_dim=8, num_key_value_heads=4),
    "afmoe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_dense_layers=1,
                  num_shared_experts=1, layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                  global_attn_every_n_layers=2),
    "deepseek_v2": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8, num_key_value_heads=4),
}


@pytest.mark.parametrize("model_type", list(MORE_MOES))
def test_the_estimate_counts_what_trains_on_more_mixtures_of_experts(model_type, tokenizer, tmp_path, capsys):
    """MiniMax, LongCat-Flash, AFMoE and DeepSeek-V2 through `sftlab estimate` and the model `sftlab train` builds
    (LoRA all-linear and full: `sftlab train`, eval and the merged export ran on each). LongCat-Flash's config.json
    gives num_layers (num_hidden_layers is twice it), and the estimate refused it as a config without
    num_hidden_layers ('the estimate would use LongcatFlashConfig's defaults')."""
    from sftlab.config import TrainConfig, load_config
    from sftlab.train.trainer import build_model

    path = tmp_path / model_type
    sizes = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    config = AutoConfig.for_model(model_type, **{**sizes, **MORE_MOES[model_type]})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    # MiniMax's linear attention carries state along a packed row, and AFMoE's mask ignores the restarts: refused
    overrides = [f"model.name_or_path={path}", f"data.train={tmp_path / 'd.jsonl'}", "data.packing=false", "lora.r=4"]
    for method in ("lora", "full"):
        model = build_model(load_config(None, [*overrides, f"method={method}"], cls=TrainConfig), use_bf16=False)
        capsys.readouterr()
        assert main(["estimate", str(path), "--method", method, "--lora-r", "4", "--seq-len", "64", "--batch", "1",
                     "--json"]) == 0
        estimate = json.loads(capsys.readouterr().out)
        assert estimate["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad), method
