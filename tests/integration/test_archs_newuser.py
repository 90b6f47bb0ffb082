"""A new user's first commands on tiny random models of architectures beyond Llama (as the
hf-internal-testing/tiny-random-* models are): each either works or refuses with a reason,
never a traceback."""

from __future__ import annotations

import json

import pytest

from sftlab.cli import main


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory, tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("mamba")
    config = AutoConfig.for_model("mamba", vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, state_size=8,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["full", "lora"])
def test_estimate_on_a_state_space_model_is_one_error_line(mamba_dir, capsys, method):
    """Mamba has no attention heads, and the activation formulas are those of attention layers: it was an
    AttributeError traceback ('MambaConfig' object has no attribute 'num_attention_heads')."""
    assert main(["estimate", str(mamba_dir), "--method", method, "--seq-len", "128", "--batch", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot estimate MambaForCausalLM ('mamba')") and "Traceback" not in err


def test_lora_all_linear_on_mamba_names_the_layers_peft_can_adapt_and_those_train(mamba_dir, tmp_path, capsys):
    """PEFT's all-linear picks out_proj, then refuses it on Mamba-type models (a ValueError traceback through
    sftlab train); the error now names the layers to write, and those train."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in ("a", "b", "c", "d")))
    args = ["train", "-", f"model.name_or_path={mamba_dir}", f"data.train={data}", "data.packing=false",
            "data.max_seq_length=64", "training.max_steps=1", "training.bf16=false", "lora.r=4"]
    assert main([*args, f"output_dir={tmp_path / 'a'}"]) == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert "'out_proj', which PEFT cannot adapt on MambaForCausalLM" in line
    targets = line.rsplit("lora.target_modules=", 1)[1]
    assert targets == "[dt_proj,in_proj,x_proj]"
    assert main([*args, f"lora.target_modules={targets}", f"output_dir={tmp_path / 'b'}"]) == 0
    assert (tmp_path / "b" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("model_type, given, width", [
    ("opt", dict(ffn_dim=300, word_embed_proj_dim=64), 300), ("gptj", dict(n_inner=200, rotary_dim=8), 200),
    ("gpt2", {}, 256), ("falcon", dict(ffn_hidden_size=96), 96), ("llama", dict(intermediate_size=128), 128)])
def test_the_estimate_reads_the_mlp_width_under_each_architectures_name_for_it(model_type, given, width):
    """OPT's ffn_dim and GPT-J's n_inner were read as 4 x hidden."""
    from transformers import AutoConfig

    from sftlab.estimate import model_shape

    config = AutoConfig.for_model(model_type, num_hidden_layers=1, vocab_size=128, hidden_size=64, num_attention_heads=4,
                                  **given)
    assert model_shape(config).intermediate == width


def test_lora_on_a_tied_lm_head_is_refused_before_training(tiny_model_dir, tmp_path, capsys):
    """peft#2018 / unsloth#219: a LoRA on an lm_head tied to the input embeddings trained, then its merge
    changed the embeddings too and the export failed its check (PEFT only warns)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in ("a", "b")))
    args = ["train", "-", f"model.name_or_path={tiny_model_dir}", f"data.train={data}", "training.max_steps=1",
            "training.bf16=false", f"output_dir={tmp_path / 'run'}"]
    assert main([*args, "lora.target_modules=[q_proj,lm_head]"]) == 1
    assert "adapts the lm_head, which shares its weight with the input embeddings" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


HYBRIDS = {
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    "falcon_h1": dict(mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16,
                      mamba_chunk_size=16),
    "bamba": dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, attn_layer_indices=[1],
                  mamba_chunk_size=16),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
}


@pytest.mark.parametrize("model_type", list(HYBRIDS))
def test_the_estimate_of_a_hybrid_takes_no_convolution_for_experts(model_type):
    """The depthwise conv1d weights of Mamba/LFM2/linear-attention layers are 3-D, as a MoE's stacked experts are:
    LFM2 was estimated as a MoE of 64 'experts' (its conv channels), one per token; on Falcon-H1 and Bamba the
    estimate's PEFT probe for expert adapters was a ValueError traceback (PEFT refuses out_proj on Mamba-type
    models); Qwen3-Next's gated norm, norm(x, gate), was a TypeError traceback."""
    from transformers import AutoConfig

    from sftlab.estimate import estimate_memory, model_shape

    config = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=128, head_dim=16,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  **HYBRIDS[model_type])
    shape = model_shape(config)
    assert shape.n_experts == (4 if model_type == "qwen3_next" else 0)
    method = "full" if shape.lora_refused else "lora"  # Falcon-H1: LoRA all-linear is refused, as train refuses it
    assert estimate_memory(config, method, 64, 2).total > 0


def test_the_estimate_refuses_the_lora_train_refuses_on_a_mamba_2_hybrid(tokenizer, tmp_path, capsys):
    """PEFT refuses the out_proj of Falcon-H1's Mamba-2 layers, which all-linear picks: `sftlab train` refused the
    default LoRA in one line, and `sftlab estimate` gave a number for it. The estimate refuses with the same line,
    and estimates the layers that line names."""
    from test_attention_archs import save_tiny

    path = save_tiny("falcon_h1", tokenizer, tmp_path / "model", **HYBRIDS["falcon_h1"])
    tokenizer.save_pretrained(path)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say a", "output": "a"}) + "\n")
    errors = []
    for args in (["estimate", path, "--method", "lora"],
                 ["train", "-", f"model.name_or_path={path}", f"data.train={data}", "data.packing=false",
                  "training.max_steps=1", f"output_dir={tmp_path / 'run'}"]):
        capsys.readouterr()
        assert main(args) == 1
        errors.append([x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")])
    assert errors[0] == errors[1] and len(errors[0]) == 1
    assert "'all-linear' picks 'out_proj', which PEFT cannot adapt on FalconH1ForCausalLM" in errors[0][0]
    targets = errors[0][0].rsplit("lora.target_modules=", 1)[1].strip("[]")
    assert main(["estimate", path, "--method", "lora", "--target-modules", targets]) == 0


def test_a_fused_lora_layers_output_can_be_modified_in_place():
    """Gemma 3n changes a projection's output in place; sftlab's fused LoRA layer returned a view made inside
    its autograd function, and the first LoRA step was a RuntimeError traceback ('Output 0 of _LoraLinear is a
    view and is being modified inplace'). The gradients stay those of PEFT's own layer."""
    import torch
    from peft import LoraConfig, get_peft_model

    from sftlab.train.lora_fused import fuse_lora_layers

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x).mul_(2.0)

    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    grads = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(Block(), LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
        if fused:
            assert fuse_lora_layers(model) == 1
        model(x).square().sum().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for plain, fused in zip(*grads):
        torch.testing.assert_close(fused, plain)


def test_adapters_the_model_bypasses_are_named(mamba_dir, tmp_path, capsys):
    """Mamba (and Jamba) compute dt_proj.weight @ x instead of calling dt_proj: the adapter PEFT puts there gets
    no gradient and trains nothing, silently (the layers the all-linear refusal above names included it)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in ("a", "b")))
    assert main(["train", "-", f"model.name_or_path={mamba_dir}", f"data.train={data}", "data.packing=false",
                 "data.max_seq_length=64", "training.max_steps=1", "training.bf16=false", "lora.r=4",
                 "lora.target_modules=[dt_proj,in_proj,x_proj]", f"output_dir={tmp_path / 'run'}"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "got no gradient" in x]
    assert lines and lines[0].startswith("lora: the adapters on mixer.dt_proj got no gradient in the first step")


def test_the_estimate_of_gemma3n_reads_its_per_layer_mlp_widths():
    """Gemma 3n gives intermediate_size per layer (a list): the estimate was a TypeError traceback
    (int + list); it takes the widest."""
    from transformers import AutoConfig

    from sftlab.estimate import estimate_memory, model_shape

    config = AutoConfig.for_model("gemma3n_text", vocab_size=128, vocab_size_per_layer_input=128, hidden_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  intermediate_size=[96, 128], layer_types=["sliding_attention", "full_attention"],
                                  sliding_window=16, num_kv_shared_layers=0, laurel_rank=8,
                                  hidden_size_per_layer_input=16, activation_sparsity_pattern=[0.0, 0.0])
    assert model_shape(config).intermediate == 128
    assert estimate_memory(config, "lora", 64, 2).total > 0
