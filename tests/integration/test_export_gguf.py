"""GGUF export: written with the gguf package, read back by transformers' GGUF loader within bounds.

The models use a small byte-level BPE tokenizer (400 tokens, ChatML template) trained here, so
that reading the GGUF back (transformers parses the whole vocabulary in Python) stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TOKENIZER_DIR
from test_deploy_export import make_lora_run


@pytest.fixture(scope="module")
def small_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = ["What is the capital of France? Paris is the capital.", "Explain why the sky is blue in one sentence.",
            "Write a haiku about autumn leaves.", "List three prime numbers: 2, 3 and 5. And the next one?",
            "You are a concise assistant. system user assistant"] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>")
    tok.chat_template = (TOKENIZER_DIR / "chat_template.jinja").read_text()
    return tok


def save_qwen2(path: Path, tokenizer) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(3)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_tokenizer) -> Path:
    return make_lora_run(tmp_path_factory.mktemp("gguf-run"), small_tokenizer)


@pytest.fixture(scope="module")
def f16_export(tmp_path_factory, run_dir):
    from sftlab.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "f16"
    return out, export_gguf(str(run_dir), out, quant="f16")


def test_lora_run_exports_to_f16_within_bounds(f16_export, small_tokenizer):
    import gguf

    out, result = f16_export
    print("\n".join(result.lines()))
    assert result.ok, result.lines()
    assert result.max_abs_diff <= 2e-2 and abs(result.metrics["NLL delta"]) <= 1e-3
    reader = gguf.GGUFReader(out / "model.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.chat_template"] == small_tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == small_tokenizer.eos_token_id
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == len(small_tokenizer)
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile
    assert json.loads((out / "sftlab_export.json").read_text())["verification"]["ok"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q8_0_round_trip_within_looser_bounds(tmp_path, small_tokenizer, run_dir, arch):
    from sftlab.export.gguf import export_gguf

    source = run_dir if arch == "llama" else save_qwen2(tmp_path / "qwen2", small_tokenizer)
    result = export_gguf(str(source), tmp_path / "q8", quant="q8_0")
    print("\n".join(result.lines()))
    assert result.ok, result.lines()
    assert "Q8_0" in result.metrics["tensor types"]
    assert 0 < result.max_abs_diff <= 0.1  # quantized: not exact, but close


def test_a_corrupted_tensor_fails_the_check(tmp_path, f16_export, run_dir):
    import shutil

    import gguf

    from sftlab.export.gguf import verify_gguf
    from sftlab.export.onnx import hf_folder
    from sftlab.serve.generation import stop_token_ids

    out, _ = f16_export
    shutil.copy(out / "model.gguf", tmp_path / "model.gguf")
    reader = gguf.GGUFReader(tmp_path / "model.gguf", "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.1.attn_v.weight")
    tensor.data[...] = tensor.data[::-1]  # the same values in the wrong rows: still a valid file
    reader.data.flush()
    del reader
    hf_dir = hf_folder(str(run_dir), tmp_path / "work")
    from transformers import AutoTokenizer

    result = verify_gguf(hf_dir, tmp_path / "model.gguf", "f16", stop_token_ids(AutoTokenizer.from_pretrained(hf_dir)))
    print("\n".join(result.lines()))
    assert not result.ok
    assert result.max_abs_diff > 2e-2


def test_unknown_quant_and_architecture_are_clear_errors(tmp_path, small_tokenizer):
    from sftlab.errors import SftlabError
    from sftlab.export.gguf import export_gguf

    with pytest.raises(SftlabError, match="unknown GGUF quantization 'q4_k_m'.*llama-quantize"):
        export_gguf("default", tmp_path / "x", quant="q4_k_m")
