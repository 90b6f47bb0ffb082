"""Liger's kernels (train/kernels.py): used where they can run, refused at start where asked for
and they cannot, SwiGLU only for a SiLU MLP, and sftlab's fused loss kept. On a GPU with
liger-kernel installed, tests/integration/test_cuda_paths.py trains with them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sftlab.config import load_config
from sftlab.errors import SftlabError
from sftlab.train import kernels
from sftlab.train.preflight import preflight
from sftlab.train.trainer import training_args


def cfg(*overrides):
    return load_config(None, ["data.train=x.jsonl", *overrides])


@pytest.mark.skipif(torch.cuda.is_available(), reason="Liger's kernels may run on this machine")
def test_asked_for_without_a_gpu_is_refused_before_anything_loads():
    with pytest.raises(SftlabError, match=r"^training.use_liger_kernel: Liger's kernels need a CUDA GPU$"):
        preflight(cfg("training.use_liger_kernel=true"))
    preflight(cfg("training.use_liger_kernel=auto"))
    preflight(cfg("training.use_liger_kernel=false"))
    assert kernels.liger_kernel_config("auto", SimpleNamespace(model_type="llama", hidden_act="silu")) is None


def test_layers_chosen_for_the_model(monkeypatch):
    monkeypatch.setattr(kernels, "unavailable", lambda model_type=None: None)
    silu = kernels.liger_kernel_config("auto", SimpleNamespace(model_type="llama", hidden_act="silu"))
    assert silu == {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                    "fused_linear_cross_entropy": False}
    # Liger's patch of an instance would compute silu(gate) * up whatever the activation
    gelu = kernels.liger_kernel_config(True, SimpleNamespace(model_type="llama", hidden_act="gelu"))
    assert gelu["swiglu"] is False and gelu["rms_norm"] and gelu["rope"]
    gemma = kernels.liger_kernel_config(True, SimpleNamespace(model_type="gemma3_text", hidden_activation="silu"))
    assert gemma["swiglu"] is True
    # auto: only the architectures checked against transformers' layers on a GPU
    assert kernels.liger_kernel_config("auto", SimpleNamespace(model_type="gemma3_text", hidden_act="silu")) is None
    assert kernels.liger_kernel_config("auto", SimpleNamespace(model_type="qwen2", hidden_act="silu"))["rope"]
    assert kernels.liger_kernel_config(False, SimpleNamespace(model_type="llama", hidden_act="silu")) is None


def test_unavailable_is_off_under_auto_and_an_error_when_asked_for(monkeypatch):
    monkeypatch.setattr(kernels, "unavailable", lambda model_type=None: f"no kernels for {model_type!r}")
    model = SimpleNamespace(model_type="bert", hidden_act="gelu")
    assert kernels.liger_kernel_config("auto", model) is None
    with pytest.raises(SftlabError, match=r"^training.use_liger_kernel: no kernels for 'bert'$"):
        kernels.liger_kernel_config(True, model)


def test_training_arguments_carry_the_choice_and_the_config_is_sftlabs(tmp_path):
    layers = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False, "fused_linear_cross_entropy": False}
    args = training_args(cfg(), tmp_path, False, False, layers)
    assert args.use_liger_kernel is True and args.liger_kernel_config == layers
    args = training_args(cfg(), tmp_path, False, False)
    assert args.use_liger_kernel is False and args.liger_kernel_config is None
    with pytest.raises(Exception, match="liger_kernel_config.*set by sftlab"):
        cfg("training.liger_kernel_config={rope: false}")
