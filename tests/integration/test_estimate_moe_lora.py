"""LoRA on a mixture of experts' stacked expert tensors (all-linear): what autograd keeps per decoder layer
equals the estimate's activations + weight copies for that layer. PEFT merges each expert stack with its
adapter (W + B x A) at every forward and the expert matmuls keep the merged stack: without it the
estimate was 2.5-2.8x low on this Mixtral; on a bf16 base the adapters' bf16 copies count too. Under
autocast on fp32 weights the experts still compute in fp32 (transformers' grouped_mm is not autocast's)
and their adapters get no bf16 copy (PEFT folds them in the stacks' dtype): 0.92 of the estimate before."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sftlab.estimate import estimate_memory  # noqa: E402

B, S, R = 2, 32, 8


def _config(layers: int):
    from transformers import MixtralConfig

    config = MixtralConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
    config._attn_implementation = "sdpa"
    return config


def _saved_bytes(layers: int, weights: str, compute: str) -> int:
    """Bytes of the distinct storages autograd keeps in a forward pass (parameters excluded), on the
    model as `sftlab train` builds it: PEFT's all-linear, fused LoRA layers, bf16 autocast where `compute`
    is bf16."""
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralForCausalLM

    from sftlab.train.lora_fused import fuse_lora_layers
    from sftlab.train.loss import skip_lora_input_casts_under_autocast

    torch.manual_seed(0)
    model = MixtralForCausalLM(_config(layers))
    if weights == "bf16":
        model = model.to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=R, target_modules="all-linear"))
    fuse_lora_layers(model)
    skip_lora_input_casts_under_autocast(model)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 1000, (B, S), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == "bf16"):
            model.train().get_base_model().model(input_ids=ids, use_cache=False)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


def _estimated_bytes(layers: int, weights: str, compute: str) -> int:
    est = estimate_memory(_config(layers), "lora", S, B, lora_r=R, dtype=compute, weights_dtype=weights)
    return est.activations + est.weight_copies


@pytest.mark.parametrize("weights,compute", [("fp32", "fp32"), ("bf16", "bf16"), ("fp32", "bf16")])
def test_lora_on_experts_counts_what_autograd_keeps_per_layer(weights, compute):
    measured = _saved_bytes(3, weights, compute) - _saved_bytes(2, weights, compute)
    estimated = _estimated_bytes(3, weights, compute) - _estimated_bytes(2, weights, compute)
    assert 0.97 < measured / estimated < 1.03, (measured, estimated)
