"""Compiled RMSNorm layers (train/compiled_norms.py): when a run compiles them, that the compiled
layers compute what transformers' do (forward and both gradients), that the eager layers come
back after, and that a compiler that fails is an error only when asked for."""

from __future__ import annotations

import re

import pytest
import torch

from sftlab.config import load_config
from sftlab.errors import SftlabError
from sftlab.train import compiled_norms
from sftlab.train.preflight import preflight

CPU_RUN = dict(device_type="cpu", processes=1, taken_by_liger=False, whole_model_compiled=False)


def test_auto_compiles_long_single_process_cpu_runs_only(monkeypatch):
    monkeypatch.setattr(compiled_norms, "unavailable", lambda device_type: None)
    enough = compiled_norms.AUTO_MIN_TOKENS
    assert compiled_norms.wanted("auto", planned_tokens=enough, **CPU_RUN) == (True, "")
    on, why = compiled_norms.wanted("auto", planned_tokens=enough - 1, **CPU_RUN)
    assert not on and f"fewer than the {enough:,}" in why
    assert compiled_norms.wanted(True, planned_tokens=10, **CPU_RUN) == (True, "")  # asked for: any length
    assert compiled_norms.wanted(False, planned_tokens=enough, **CPU_RUN) == (False, "")  # nothing to log
    for other in ({"device_type": "cuda"}, {"processes": 2}):
        assert not compiled_norms.wanted("auto", planned_tokens=enough, **{**CPU_RUN, **other})[0]
        assert compiled_norms.wanted(True, planned_tokens=enough, **{**CPU_RUN, **other})[0]
    # Liger's kernel or a whole-model compile take the norms, even when asked for
    for other in ({"taken_by_liger": True}, {"whole_model_compiled": True}):
        assert not compiled_norms.wanted(True, planned_tokens=enough, **{**CPU_RUN, **other})[0]
    monkeypatch.setattr(compiled_norms, "unavailable", lambda device_type: "no C++ compiler")
    assert compiled_norms.wanted("auto", planned_tokens=enough, **CPU_RUN) == (False, "no C++ compiler")


def test_asked_for_without_a_compiler_is_refused_before_anything_loads(monkeypatch):
    monkeypatch.setattr(compiled_norms, "unavailable", lambda device_type: "needs a C++ compiler")
    with pytest.raises(SftlabError, match=r"^training.compile_norms: needs a C\+\+ compiler$"):
        preflight(load_config(None, ["data.train=x.jsonl", "training.compile_norms=true"]))
    preflight(load_config(None, ["data.train=x.jsonl"]))  # auto: off, said in the log


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    for norm in compiled_norms.norm_modules(model):  # not all ones: the weight's part of the gradient shows
        norm.weight.data.uniform_(0.5, 1.5)
    return model


def test_a_compiler_that_fails_is_an_error_only_when_asked_for(monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore lines")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: failing)
    model, said = tiny_llama(), []
    with compiled_norms.compiled_norms(model, None, required=False, log=said.append) as on:
        assert on is False and all("forward" not in vars(m) for m in compiled_norms.norm_modules(model))
    assert said == ["compiled norms: off (InvalidCxxCompiler: no working C++ compiler found)"]
    with pytest.raises(SftlabError, match="^training.compile_norms: InvalidCxxCompiler"):
        with compiled_norms.compiled_norms(model, None, required=True, log=said.append):
            pass


def test_compiled_norms_compute_what_transformers_layers_do_and_go_back_after():
    model = tiny_llama()
    norms = compiled_norms.norm_modules(model)
    assert len(norms) == 5  # 2 a layer and the final one
    x = torch.randn(1, 37, 32)  # another length than the probe's: one graph for every length

    def run(norm):
        xi = x.clone().requires_grad_(True)
        out = norm(xi)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads = xi.grad, norm.weight.grad.clone()
        norm.weight.grad = None
        return out.detach(), *grads

    eager = [run(n) for n in norms]
    said = []
    with compiled_norms.compiled_norms(model, None, required=True, log=said.append) as on:
        assert on and len(said) == 1 and re.fullmatch(r"compiled norms: 5 RMSNorm layers \(LlamaRMSNorm\) in [\d.]+ s",
                                                      said[0]), said
        assert all(n.weight.grad is None for n in norms)  # the probe's backward leaves no gradient
        assert all("forward" in vars(n) for n in norms)
        compiled = [run(n) for n in norms]
    assert all("forward" not in vars(n) for n in norms)
    for e, c in zip(eager, compiled):
        for a, b in zip(e, c):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
