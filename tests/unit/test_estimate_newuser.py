"""`sftlab.estimate` on real models' shapes a new user points it at: GPT-2 (Conv1D layers), MoE
(experts as 3-D tensors, k of them per token), QLoRA under sharding engines."""

from __future__ import annotations

import pytest

from sftlab.errors import SftlabError
from sftlab.estimate import activation_bytes_per_token, estimate_memory, model_shape


def _gpt2():
    from transformers import GPT2Config

    return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=100)


def test_gpt2_conv1d_layers_are_linear_layers():
    """GPT-2's layers are transformers' Conv1D, which PEFT's all-linear adapts: not 'no decoder layers'."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    config = _gpt2()
    est = estimate_memory(config, "lora", 32, 1, lora_r=4, dtype="fp32")
    model = GPT2LMHeadModel(config)
    assert est.n_params == sum(p.numel() for p in model.parameters())
    trainable, _ = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).get_nb_trainable_parameters()
    assert est.trainable_params == trainable


def _mixtral(k: int):
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=k)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_moe_activations_grow_with_the_experts_each_token_runs(method):
    """Each token runs k experts' MLPs on its own gathered copy (autograd keeps 4i + 2h values per copy and
    the router's 40 B of indices and weights; measured on this Mixtral, fp32, full: 6,541 B/token per layer
    for k=2, 10,717 for k=4, 4,176 apart)."""
    per_layer = {}
    for k in (2, 4):
        shape = model_shape(_mixtral(k))
        assert (shape.n_experts, shape.experts_per_token, shape.expert_intermediate) == (8, k, 96)
        per_layer[k] = activation_bytes_per_token(shape, method=method, compute_bytes=4, stream_bytes=4, lora_targets=[],
                                                  lora_r=8, lora_dropout=0.0, varlen=False)
    assert per_layer[4] - per_layer[2] == 2 * ((4 * 96 + 2 * 64) * 4 + 40)


@pytest.mark.parametrize("engine", ["zero3", "zero3_offload", "fsdp"])
def test_qlora_is_refused_where_training_refuses_it(engine):
    """docs/scaling.md: train refuses QLoRA under ZeRO-3 and FSDP; the estimate printed figures for it."""
    config = _mixtral(2)
    with pytest.raises(SftlabError, match=f"qlora cannot run under {engine}"):
        estimate_memory(config, "qlora", 32, 1, nproc=2, distributed=engine)
    assert estimate_memory(config, "qlora", 32, 1, nproc=2, distributed="zero2").total > 0


def test_a_config_without_its_sizes_is_refused_not_estimated_with_defaults(tmp_path):
    """{"model_type": "llama"} alone loads as LlamaConfig's defaults (Llama 2 7B's sizes): an estimate of
    another model. GPT-2's own names for the sizes (n_embd, n_layer) count as given."""
    import json

    from sftlab.estimate import load_model_config

    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SftlabError, match="does not give hidden_size, num_hidden_layers, vocab_size"):
        load_model_config(tmp_path / "bare")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2,
                                                               "n_head": 2, "vocab_size": 100}))
    assert load_model_config(tmp_path / "gpt2").hidden_size == 64


def test_a_model_that_is_not_a_causal_lm_is_one_short_line():
    """T5's refusal ended with transformers' list of every causal LM config class (about 200)."""
    from transformers import T5Config

    with pytest.raises(SftlabError) as e:
        model_shape(T5Config(d_model=32, num_layers=1, vocab_size=100))
    assert "'t5' config" in str(e.value) and "AutoModelForCausalLM" in str(e.value) and len(str(e.value)) < 300


def test_a_gpu_elsewhere_is_estimated_as_a_gpu(tiny_model_dir, capsys):
    """Planning a GPU run on a laptop: --device cuda computes in bf16 (auto) and counts no CPU kernel
    caches; with no GPU here it needs --memory to say what fits, instead of using this machine's RAM."""
    import torch

    from sftlab.cli import main

    gpu = estimate_memory(tiny_model_dir, "lora", 64, 2, device="cuda")
    cpu = estimate_memory(tiny_model_dir, "lora", 64, 2, device="cpu", dtype="bf16")
    assert (gpu.dtype, gpu.caches) == ("bf16", 0) and cpu.caches > 0
    assert gpu.total == cpu.total - cpu.caches
    if not torch.cuda.is_available():
        assert main(["estimate", str(tiny_model_dir), "--device", "cuda"]) == 0
        assert "Give --memory" in capsys.readouterr().out
        assert main(["estimate", str(tiny_model_dir), "--device", "cuda", "--memory", "80GiB"]) == 0
        assert "in 80.00 GiB; the largest batch" in capsys.readouterr().out


@pytest.mark.parametrize("r", [8, 16])
def test_moe_lora_counts_what_peft_adapts(r):
    """all-linear on a mixture of experts also adapts the router and the stacked expert tensors: the
    estimate counted the attention layers only (7,168 of PEFT's 94,336 at r=8 here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = _mixtral(2)
    peft = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=r, target_modules="all-linear"))
    assert estimate_memory(config, "lora", 32, 1, lora_r=r).trainable_params == peft.get_nb_trainable_parameters()[0]
    named = estimate_memory(config, "lora", 32, 1, lora_r=r, target_modules=["q_proj", "v_proj"])
    assert named.trainable_params == sum(p.numel() for n, p in get_peft_model(
        AutoModelForCausalLM.from_config(config), LoraConfig(r=r, target_modules=["q_proj", "v_proj"])).named_parameters()
        if "lora_" in n)


def test_qlora_on_experts_says_they_stay_unquantized():
    est = estimate_memory(_mixtral(2), "qlora", 32, 1)
    assert "expert weights (bitsandbytes quantizes linear layers only)" in est.notes["weights"]


def _deepseek_v3():
    """Three layers, the first dense (first_k_dense_replace), the others with 8 experts and a shared one."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(vocab_size=100, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                            q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


def test_a_mixture_of_experts_with_dense_layers_counts_each_layer_as_it_is():
    """DeepSeek-V3's first layers are dense: layer 0 stood for every layer, so FSDP's gathered layers and the
    parameters outside the decoder stack came from the dense layer's size (here 2 x 29,872 instead of
    2 x 67,248 parameters, and 87,616 outside the layers instead of 12,864)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = _deepseek_v3()
    model = AutoModelForCausalLM.from_config(config)
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    outside = sum(p.numel() for p in model.parameters()) - sum(layers)
    est = estimate_memory(config, "full", 32, 1, dtype="fp32", nproc=2, distributed="fsdp")
    assert est.n_params == sum(layers) + outside
    assert est.gathered == max(2 * max(layers), outside) * 4
    assert f"the {outside:,} parameters outside them" in est.notes["gathered"]
    trainable, _ = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).get_nb_trainable_parameters()
    assert estimate_memory(config, "lora", 32, 1, lora_r=4).trainable_params == trainable


def _qwen3_moe(dense: list[int]):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=100, hidden_size=64, intermediate_size=160, moe_intermediate_size=32,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                          num_experts_per_tok=2, mlp_only_layers=dense)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dense_and_sparse_layers_each_keep_their_own_activations(method):
    """Qwen3-MoE's mlp_only_layers: a dense and a sparse layer keep what one of each keeps in an all-dense and
    an all-sparse model, in either order (layer 0's kind stood for both)."""
    def activations(dense):
        return estimate_memory(_qwen3_moe(dense), method, 32, 1, dtype="fp32").activations

    assert activations([0]) == activations([1])
    assert 2 * activations([0]) == activations([0, 1]) + activations([])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="DeepSpeed on a CPU")
def test_deepspeed_on_a_cpu_is_estimated_in_fp32_as_it_trains(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """training.bf16 auto is off under DeepSpeed without a GPU (preflight.wants_bf16): the estimate counted bf16
    on a CPU with bf16 matmuls. On a GPU elsewhere (--device cuda) DeepSpeed trains in bf16."""
    import json

    from sftlab.cli import main
    from sftlab.train import preflight

    monkeypatch.setattr(preflight, "device_supports_bf16", lambda: True)
    config = tmp_path / "zero2.yaml"
    config.write_text(f"model: {{name_or_path: {tiny_model_dir}}}\ndata: {{train: x.jsonl}}\ndistributed: zero2\n")

    def dtype(*options):
        assert main(["estimate", str(config), "--json", *options]) == 0
        return json.loads(capsys.readouterr().out)["dtype"]

    assert dtype("--nproc", "2") == "fp32"
    assert dtype() == "fp32"  # one process runs DeepSpeed too, as a world of one
    assert dtype("--nproc", "2", "--device", "cuda") == "bf16"
    assert estimate_memory(tiny_model_dir, "lora", 32, 1, nproc=2, distributed="zero2").dtype == "fp32"
    assert estimate_memory(tiny_model_dir, "lora", 32, 1, nproc=2, distributed="ddp").dtype == "bf16"
