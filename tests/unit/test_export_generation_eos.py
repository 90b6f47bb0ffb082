"""Exports stop where the run stops: on every EOS the model declares, config.json's and generation_config.json's.
Failures users reported in other toolkits' trackers (a second round; the first is
tests/integration/test_failure_reports.py), reproduced on the tiny model and SmolLM2's tokenizer; each docstring
names its report."""

from __future__ import annotations

import json

import pytest

from conftest import make_tiny_llama


@pytest.fixture
def two_eos_base(tmp_path, tokenizer):
    """A tiny Llama whose config.json names one EOS (<|im_end|>) and whose generation_config.json names two,
    as Qwen3-4B-Instruct-2507 ships (151645; [151645, 151643]) and Gemma 3 ([1, 106])."""
    from transformers import GenerationConfig

    alt = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert alt not in (tokenizer.eos_token_id, None)
    base = make_tiny_llama(tmp_path / "base", tokenizer)
    generation = GenerationConfig.from_pretrained(base)
    generation.eos_token_id = [tokenizer.eos_token_id, alt]
    generation.save_pretrained(base)
    assert json.loads((base / "config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    return base, alt


def test_a_merged_export_stops_where_the_run_stops_on_every_eos_of_the_generation_config(two_eos_base, tokenizer,
                                                                                           tmp_path):
    """NVIDIA/TensorRT-Model-Connect#640 (Qwen3 4B Instruct: the alternate EOS of generation_config ignored, seven
    tokens generated past "Tokyo."), Blaizzy/mlx-vlm#309 (Gemma 3's eos list [1, 106]: only the tokenizer's EOS
    honoured). sftlab's evaluation and server stop a run on its generation_config's EOS ids; the merged export
    rewrote generation_config.eos_token_id from config.json's EOS alone, so the exported model ran on where
    the run had stopped."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GenerationConfig

    from sftlab.export.merge import merge_run
    from sftlab.models import load_model
    from sftlab.serve.generation import stop_token_ids

    base, alt = two_eos_base
    run = tmp_path / "run"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
                   ).save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "tokenizer")
    (run / "run.json").write_text(json.dumps({"base_model": str(base), "method": "lora", "seed": 0}))
    run_stops = stop_token_ids(tokenizer, load_model(str(run), dtype="float32").generation_config.eos_token_id)
    assert alt in run_stops  # what `sftlab eval RUN` and `sftlab serve RUN` stop on

    result = merge_run(run, tmp_path / "merged")
    assert result.ok
    assert set(GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id) == set(run_stops)


def test_gguf_and_onnx_exports_stop_on_every_eos_of_the_generation_config(two_eos_base, tmp_path, monkeypatch):
    """The same reports, for the exports that read config.json's EOS alone (AutoConfig.eos_token_id): the GGUF
    file's and Modelfile's stop tokens and the onnxruntime-genai config's eos_token_id left out generation_config's
    second EOS. The exports run as they are, less their slow parts (reading the GGUF back and comparing it,
    building and running the ONNX model), which decide nothing about the stop tokens."""
    import sftlab.export.gguf as gguf
    import sftlab.export.onnx as onnx
    from sftlab.export.verify import VerifyResult

    base, alt = two_eos_base
    seen = {}

    def verified(target):
        def check(hf_dir, path, *args):
            seen[target] = args[-1] if target == "gguf" else None
            return VerifyResult(target, str(path), max_abs_diff=0.0, tolerance=1.0, prompts=1)
        return check

    def genai_folder(hf_dir, out, precision, cache):  # what the onnxruntime-genai builder writes, in brief
        (out / "model.onnx").write_bytes(b"")
        (out / "genai_config.json").write_text(json.dumps({"model": {"eos_token_id": 2}}))

    monkeypatch.setattr(gguf, "verify_gguf", verified("gguf"))
    monkeypatch.setattr(onnx, "build", genai_folder)
    monkeypatch.setattr(onnx, "verify", verified("onnx"))
    assert gguf.export_gguf(str(base), tmp_path / "gguf", quant="f16").ok
    assert alt in seen["gguf"]  # the stop tokens written into the file and checked against llama.cpp
    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    stops = [line for line in modelfile.splitlines() if line.startswith("PARAMETER stop")]
    assert 'PARAMETER stop "<|endoftext|>"' in stops and 'PARAMETER stop "<|im_end|>"' in stops
    assert onnx.export_onnx(str(base), tmp_path / "onnx").ok
    eos = json.loads((tmp_path / "onnx" / "genai_config.json").read_text())["model"]["eos_token_id"]
    assert alt in (eos if isinstance(eos, list) else [eos])
