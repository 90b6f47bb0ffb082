"""Deployment exports on a tiny LoRA run: merged == unmerged, ONNX == PyTorch, Triton == PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_tiny_llama


def make_lora_run(run: Path, tokenizer, *, dora: bool = False, seed: int = 0) -> Path:
    """A finished-run folder as `sftlab train` writes it: base + random non-zero LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = make_tiny_llama(run / "base", tokenizer, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"], use_dora=dora)
    model = get_peft_model(model, config)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B is zero at init; make the adapter change the outputs
    model.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "tokenizer")
    (run / "run.json").write_text(json.dumps({"base_model": str(base), "method": "dora" if dora else "lora", "seed": seed}))
    return run
