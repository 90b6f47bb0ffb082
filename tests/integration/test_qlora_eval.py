"""QLoRA gradients do not change after an evaluation.

On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place for its inference kernel
the first time the layer runs in eval mode without gradients; that kernel has no backward, so
training after an evaluation lost the gradient through every frozen base layer without a word.
Both ways a QLoRA model is built (`sftlab train`, `sftlab align`) are checked."""

from __future__ import annotations

import pytest
import torch

from sftlab.config import AlignConfig, TrainConfig, load_config


def _lora_grads(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _built(kind, model_dir):
    overrides = [f"model.name_or_path={model_dir}", "method=qlora", "data.train=unused.jsonl", "lora.r=8", "lora.dropout=0",
                 "training.bf16=false"]
    if kind == "train":
        from sftlab.train.trainer import build_model

        return build_model(load_config(None, overrides, cls=TrainConfig), use_bf16=False)
    from peft import get_peft_model

    from sftlab.train.align import load_policy

    model, peft_config, _ = load_policy(load_config(None, overrides, cls=AlignConfig), "float32", False)
    return get_peft_model(model, peft_config)


@pytest.mark.parametrize("kind", ["train", "align"])
def test_qlora_gradients_are_the_same_after_an_evaluation(tiny_model_dir, kind):
    model = _built(kind, tiny_model_dir)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters a path for gradients to cross
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    before = _lora_grads(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = _lora_grads(model, ids)
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, atol=1e-6, rtol=1e-5)
