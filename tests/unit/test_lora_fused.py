"""The fused LoRA forward (train/lora_fused.py) against PEFT's own: the same outputs and the same
adapter gradients, in fp32 and under bf16 autocast, and PEFT's path wherever fusing would not be
the same computation (adapters off, merged, DoRA, several adapters)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from sftlab.train.lora_fused import fuse_lora_layers


def lora_model(model_dir, seed: int = 1, **lora):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=24, target_modules="all-linear", task_type="CAUSAL_LM",
                                            **{"lora_dropout": 0.0, **lora}))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: the adapter would add nothing
            torch.nn.init.normal_(p, std=0.05)
    return model


def loss_and_grads(model, ids, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.float(), grads


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_lora_gives_peft_outputs_and_gradients(tiny_model_dir, autocast):
    peft_model = lora_model(tiny_model_dir)
    fused = copy.deepcopy(peft_model)
    assert fuse_lora_layers(fused) == 2 * 7  # every linear of both layers
    assert fuse_lora_layers(fused) == 14  # idempotent
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    logits, grads = loss_and_grads(peft_model, ids, autocast)
    fused_logits, fused_grads = loss_and_grads(fused, ids, autocast)
    # fp32: rounding order only; bf16: PEFT rounds the adapter's product, its scaling and the sum
    # to bf16 one after the other, the fused sum once
    tol = {"rtol": 0, "atol": 1e-5} if not autocast else {"rtol": 0.05, "atol": 0.05}
    torch.testing.assert_close(fused_logits, logits, **tol)
    assert grads.keys() == fused_grads.keys() and len(grads) == 28
    for name, g in grads.items():
        scale = g.abs().max().item()
        assert (fused_grads[name] - g).abs().max().item() <= (1e-5 if not autocast else 0.05) * scale, name


class _Replay(torch.nn.Module):
    """A dropout that multiplies by given noises in turn: PEFT's layers fed the fused layers' draws."""

    def __init__(self, noises: list):
        super().__init__()
        self.noises = noises

    def forward(self, x):
        return x * self.noises.pop(0).view_as(x)


@pytest.mark.parametrize("autocast,bf16_base", [(False, False), (True, False), (True, True)],
                         ids=["fp32", "bf16-autocast", "bf16-base"])
def test_fused_lora_with_dropout_gives_peft_outputs_and_gradients(tiny_model_dir, autocast, bf16_base, monkeypatch):
    """Training mode with dropout: given the same noise, the outputs and adapter gradients of
    PEFT's layers on the path train() takes (no fp32 round trip of the input under autocast); with
    a bf16 base the dropped input is rebuilt in backward from the input."""
    from sftlab.train import lora_fused
    from sftlab.train.loss import skip_lora_input_casts_under_autocast

    peft_model = lora_model(tiny_model_dir, lora_dropout=0.3)
    if bf16_base:
        for name, p in peft_model.named_parameters():
            if "lora_" not in name:
                p.data = p.data.to(torch.bfloat16)
    skip_lora_input_casts_under_autocast(peft_model)
    fused = copy.deepcopy(peft_model)
    assert fuse_lora_layers(fused) == 14
    noises: list = []
    draw = lora_fused.dropout_noise
    monkeypatch.setattr(lora_fused, "dropout_noise", lambda x, p: noises.append(draw(x, p)) or noises[-1])
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    fused_logits, fused_grads = loss_and_grads(fused.train(), ids, autocast)
    assert len(noises) == 14 and all(bool((n == 0).any()) for n in noises)
    for name, module in list(peft_model.named_modules()):
        if name.endswith("lora_dropout"):
            module["default"] = _Replay(noises)
    logits, grads = loss_and_grads(peft_model.train(), ids, autocast)
    assert not noises  # every layer took its noise
    tol = 1e-5 if not autocast else 0.05
    torch.testing.assert_close(fused_logits, logits, rtol=0, atol=tol)
    assert len(grads) == 28
    for name, g in grads.items():
        assert (fused_grads[name] - g).abs().max().item() <= tol * g.abs().max().item(), name


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_cpu_dropout_noise_drops_p_of_every_element_position_and_keeps_the_mean(p):
    """sftlab's CPU draw (15 bits of a 64-bit draw per element, four elements a draw): every one
    of the four positions is dropped at rate p (a lane read with its sign bit, or a bit that is
    not random, would not be), kept elements are 1/(1-p), the mean is 1, draws differ and a seed
    repeats them."""
    from sftlab.train.lora_fused import dropout_noise

    torch.manual_seed(5)
    noise = dropout_noise(torch.ones(4096, 1024, dtype=torch.bfloat16), p)
    assert noise.dtype == torch.bfloat16 and noise.shape == (4096, 1024)
    kept = 1 - round(p * 32768) / 32768
    assert set(noise.unique().tolist()) == {0.0, torch.tensor(1 / kept, dtype=torch.bfloat16).item()}
    dropped = (noise == 0).float().view(-1, 4).mean(0)  # the four elements read from one 64-bit draw
    bound = 5 * (p * (1 - p) / (noise.numel() / 4)) ** 0.5
    assert (dropped - p).abs().max().item() < bound, dropped
    odd = dropout_noise(torch.ones(7, 3), p)  # a size that is not a multiple of four
    assert odd.shape == (7, 3) and odd.dtype == torch.float32
    assert abs(dropout_noise(torch.ones(2**22), p).mean().item() - 1) < 5 * (p / (1 - p) / 2**22) ** 0.5
    torch.manual_seed(5)
    assert torch.equal(dropout_noise(torch.ones(4096, 1024, dtype=torch.bfloat16), p), noise)
    assert not torch.equal(dropout_noise(torch.ones(4096, 1024, dtype=torch.bfloat16), p), noise)


def test_dropout_of_one_goes_to_peft(tiny_model_dir):
    model = lora_model(tiny_model_dir, lora_dropout=0.5)
    dropouts = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    assert len(dropouts) == 14
    for layer_dropout in dropouts:
        layer_dropout.p = 1.0  # everything dropped: the adapters add nothing
    fuse_lora_layers(model)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dropped = model.train()(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    torch.testing.assert_close(dropped, base, rtol=0, atol=1e-6)


def test_fused_lora_leaves_adapters_off_merged_and_other_adapters_to_peft(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    fuse_lora_layers(model)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(input_ids=ids).logits
        torch.testing.assert_close(off, base, rtol=0, atol=0)
        assert (adapted - base).abs().max() > 1e-2
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=0, atol=1e-5)  # not added twice
        model.unmerge_adapter()  # W + BA - BA: the base weights' rounding moved
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=0, atol=1e-5)


def test_dora_layers_are_not_fused(tiny_model_dir):
    model = lora_model(tiny_model_dir, use_dora=True)
    reference = copy.deepcopy(model)
    assert fuse_lora_layers(model) == 14  # the same layer type: the DoRA check is made in each call
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # PEFT's DoRA forward, bit for bit
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


def test_the_model_train_builds_has_its_lora_layers_fused(tiny_model_dir, tmp_path):
    from sftlab.config import load_config
    from sftlab.train.lora_fused import _FusedForward
    from sftlab.train.trainer import build_model

    config = load_config(None, [f"model.name_or_path={tiny_model_dir}", "method=lora", f"data.train={tmp_path / 'x.jsonl'}"])
    model = build_model(config, use_bf16=False)
    fused = [m for m in model.modules() if isinstance(vars(m).get("forward"), _FusedForward)]
    assert len(fused) == 14


def test_several_active_adapters_go_to_peft(tiny_model_dir):
    from peft import LoraConfig

    model = lora_model(tiny_model_dir)
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B.second" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.base_model.set_adapter(["default", "second"])
    reference = copy.deepcopy(model)
    assert fuse_lora_layers(model) == 14
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # both adapters added, as PEFT adds them, bit for bit
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
