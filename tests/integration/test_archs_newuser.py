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
