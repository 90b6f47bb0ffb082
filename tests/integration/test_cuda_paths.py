"""CUDA paths (skipped without a GPU): the fused varlen attention against per-example SDPA,
packed == unpacked loss in bf16, the fused LoRA function against PEFT's layers, a whole bf16
LoRA run (with dropout) through `train()`, and the same run with Liger's kernels or with compiled
norms (training.compile_norms: true, inductor's Triton kernels) against transformers' layers."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fused_varlen_matches_per_example_sdpa():
    from sftlab.train.attention import _cuda_varlen, _fused, _per_example

    assert _cuda_varlen() is not None, "this PyTorch has no torch.nn.attention.varlen"
    torch.manual_seed(0)
    bounds = [0, 37, 100, 101, 260]
    q = torch.randn(260, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(260, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(260, 2, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    fused = _fused(q, k, v, cu, 159, 64**-0.5, None)
    assert fused is not None
    as_4d = [t.float().transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # [1, H, T, D]
    ref = _per_example(*as_4d, bounds, 0.0, 64**-0.5, None)  # [T, H, D]
    assert (fused.float() - ref).abs().max().item() < 2e-2


def test_packed_equals_unpacked_loss_bf16(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from sftlab.data.conversation import Conversation
    from sftlab.data.pack import collate
    from sftlab.data.render import render_many
    from sftlab.demo.dataset import generate_demo
    from sftlab.train.attention import NAME, register
    from sftlab.train.loss import selective_loss_sum

    register()
    records = generate_demo({"train": 3}, seed=1)["train"]
    examples = render_many([Conversation(r["messages"], source=r["id"]) for r in records], tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=NAME,
                                                 dtype=torch.bfloat16).cuda().eval()

    def on_cuda(batch):
        return {k: t.cuda() for k, t in batch.items()}

    with torch.no_grad():
        alone = sum(selective_loss_sum(model, on_cuda(collate([[e]])))[0] for e in examples)
        packed, _ = selective_loss_sum(model, on_cuda(collate([examples], flatten=True)))
    assert packed.item() == pytest.approx(alone.item(), rel=2e-2)


def test_fused_lora_function_gives_peft_outputs_and_gradients_on_cuda(tiny_model_dir):
    """train/lora_fused.py's autograd function on CUDA under bf16 autocast, against PEFT's layers."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sftlab.train.lora_fused import fuse_lora_layers

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda()
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=24, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    fused = copy.deepcopy(peft_model)
    assert fuse_lora_layers(fused) == 14
    ids = torch.randint(0, 1000, (2, 24), device="cuda")

    def run(model):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    (logits, grads), (fused_logits, fused_grads) = run(peft_model.train()), run(fused.train())
    torch.testing.assert_close(fused_logits, logits, rtol=0.05, atol=0.05)
    assert len(grads) == 28
    for n, g in grads.items():
        assert (fused_grads[n] - g).abs().max().item() <= 0.05 * g.abs().max().item(), n


def lora_run(model_dir, tmp_path, name: str, liger, dropout: float = 0.0, compile_norms="auto"):
    import json

    from sftlab.config import TrainConfig
    from sftlab.demo.dataset import write_demo_dataset
    from sftlab.train.trainer import train

    data = write_demo_dataset(tmp_path / "data", seed=0, sizes={"train": 20})["train"]
    config = TrainConfig.model_validate({
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data), "max_seq_length": 256},
        "method": "lora",
        "lora": {"dropout": dropout},
        "training": {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1,
                     "use_liger_kernel": liger, "compile_norms": compile_norms},
        "output_dir": str(tmp_path / name),
    })
    info = train(config, log=lambda *_: None)
    metrics = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return info, [m["loss"] for m in metrics if "loss" in m]


def test_bf16_lora_run_on_cuda(tiny_model_dir, tmp_path):
    import math

    info, losses = lora_run(tiny_model_dir, tmp_path, "run", False, dropout=0.1)  # the fused layers' dropout too
    assert info["bf16"] and info["attention"] == "sftlab_varlen" and info["liger_kernels"] == []
    assert info["global_step"] == 4 and info["train_loss"] > 0 and all(math.isfinite(x) for x in losses)


def test_liger_kernels_train_as_transformers_layers(tiny_model_dir, tmp_path):
    pytest.importorskip("liger_kernel")
    # without Liger first: its RoPE replaces a module-level function for the rest of the process
    _, plain = lora_run(tiny_model_dir, tmp_path, "plain", False)
    info, liger = lora_run(tiny_model_dir, tmp_path, "liger", "auto")
    assert info["liger_kernels"] == ["rms_norm", "rope", "swiglu"]
    from transformers.models.llama import modeling_llama

    assert modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")  # Liger's patch ran
    assert len(liger) == len(plain) == 4
    # the same run to bf16 rounding: the norms, RoPE and SwiGLU round at other points
    assert liger == pytest.approx(plain, rel=3e-2), (liger, plain)


def test_compiled_norms_train_as_transformers_layers(tiny_model_dir, tmp_path):
    pytest.importorskip("triton")
    _, plain = lora_run(tiny_model_dir, tmp_path, "plain", False, compile_norms=False)
    info, compiled = lora_run(tiny_model_dir, tmp_path, "compiled", False, compile_norms=True)
    assert info["compiled_norms"] is True and info["liger_kernels"] == []
    assert compiled == pytest.approx(plain, rel=1e-2), (compiled, plain)
