"""Liger's Triton kernels for a model's RMSNorm, RoPE and SwiGLU, on a CUDA GPU.

On a GPU a small model's LoRA step is bound by kernel launches more than by arithmetic
(bench/README: ~5,700 launches a step for a Qwen2.5-0.5B-shaped LoRA, the GPU idle ~40 % of
it): transformers' RMSNorm is eight kernels forward (casts, square, mean, rsqrt, multiplies) and
more backward, its RoPE five per tensor, SwiGLU two; Liger computes each in one kernel each way.
Applied through transformers' own switch (`use_liger_kernel` with a `liger_kernel_config`).
sftlab keeps its own fused lm_head + loss (train/loss.py), so Liger's cross-entropy kernels,
which would replace the model's forward, stay off.
"""

from __future__ import annotations

import importlib.util

import torch

from sftlab.errors import SftlabError

# SwiGLU only where the model's MLP activation is SiLU: Liger's patch of a model instance does
# not check it, and would compute silu(gate) * up for any activation
SWIGLU_ACTIVATIONS = ("silu", "swish")
# `auto` turns them on for the architectures whose Liger path was checked against transformers'
# layers on a GPU (tests/integration/test_cuda_paths.py: Llama; bench/README: Qwen2, the same
# losses with and without); `true` for any other model type liger-kernel has kernels for
CHECKED = frozenset({"llama", "qwen2"})


def unavailable(model_type: str | None = None) -> str | None:
    """Why Liger's kernels cannot run here (for this model type, when given), or None."""
    if not torch.cuda.is_available():
        return "Liger's kernels need a CUDA GPU"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'sftlab[gpu]')"
    if model_type is not None:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            return f"liger-kernel has no kernels for model type {model_type!r}"
    return None


def liger_kernel_config(choice: bool | str, model_config) -> dict | None:
    """The `liger_kernel_config` to train with, or None for transformers' own layers.
    `choice` is training.use_liger_kernel: auto uses them where they can run on a checked
    architecture, true wherever liger-kernel has them (and stops where it cannot)."""
    if choice is False:
        return None
    model_type = getattr(model_config, "model_type", None)
    reason = unavailable(model_type)
    if reason is None and choice == "auto" and model_type not in CHECKED:
        reason = f"not checked for model type {model_type!r} (training.use_liger_kernel: true uses them)"
    if reason:
        if choice is True:
            raise SftlabError(f"training.use_liger_kernel: {reason}")
        return None
    activation = getattr(model_config, "hidden_act", None) or getattr(model_config, "hidden_activation", None)
    return {"rope": True, "rms_norm": True, "swiglu": activation in SWIGLU_ACTIVATIONS,
            "cross_entropy": False, "fused_linear_cross_entropy": False}
