"""A model's RMSNorm layers compiled by torch.compile (inductor) for the length of a training run.

transformers' RMSNorm is a chain of small ops, each a pass over [tokens x hidden]: the cast to
fp32, square, mean, rsqrt, two multiplies and the cast back, and more in backward. On a CPU that
chain, forward and backward at 4,096 x 576 bf16, takes ~11 ms; inductor's one fused kernel each
way ~2.5 ms, and a SmolLM2 LoRA step of 4,096 tokens 1.15x less time (bench/README, "Compiled
norms"). Each norm class is compiled once, dynamic in the token count, and every layer of that
class shares the graph: the first compile takes ~15 s on a 2-core CPU, ~2 s from inductor's
on-disk cache after, so `auto` compiles only runs long enough to repay it (AUTO_MIN_TOKENS) and
only on a CPU (on a CUDA GPU Liger's kernels take the norms, train/kernels.py; `true` compiles
them there too). The eager forwards come back when the run ends, so generation afterwards does
not compile again.
"""

from __future__ import annotations

import shutil
import time
import types
from contextlib import contextmanager

import torch

from sftlab.errors import SftlabError

# computed tokens (padding included) a run must plan for `auto` to compile: at ~0.17 ms a token
# saved on a 2-core CPU (SmolLM2, bench/README), about where a first ~15 s compile is repaid
AUTO_MIN_TOKENS = 100_000


def norm_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's RMSNorm layers with a weight (any class named ...RMSNorm: Llama's, Qwen's,
    Gemma's, torch's)."""
    return [m for m in model.modules()
            if type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.nn.Parameter)]


def unavailable(device_type: str) -> str | None:
    """Why inductor cannot compile for this device here, or None."""
    if device_type == "cuda":
        import importlib.util

        return None if importlib.util.find_spec("triton") else "torch.compile on a GPU needs triton"
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "torch.compile on a CPU needs a C++ compiler (apt-get install g++)"
    return None


def wanted(choice: bool | str, *, device_type: str, planned_tokens: int, processes: int,
           taken_by_liger: bool, whole_model_compiled: bool) -> tuple[bool, str]:
    """Whether to compile the norms for this run, and the reason when not (for the log; none
    when the config turned them off)."""
    if choice is False:
        return False, ""
    if taken_by_liger:
        return False, "Liger's RMSNorm kernel is used instead"
    if whole_model_compiled:
        return False, "the whole model is compiled (torch_compile: true)"
    if choice == "auto":
        if device_type != "cpu" or processes > 1:
            return False, "auto compiles them on a single-process CPU run only (training.compile_norms: true for this one)"
        if planned_tokens < AUTO_MIN_TOKENS:
            return False, (f"the run computes {planned_tokens:,} tokens, fewer than the {AUTO_MIN_TOKENS:,} that repay "
                           "the first compile (training.compile_norms: true compiles them anyway)")
        if reason := unavailable(device_type):
            return False, reason
    return True, ""  # true where the compiler is missing was refused before loading (preflight.preflight)


def probe(norm: torch.nn.Module, compiled, autocast_dtype: torch.dtype | None) -> str | None:
    """Compile `norm`'s class once on a small input as training will call it (grad on, the run's
    autocast), so a compiler that cannot work here says so before training starts; returns the
    error's first line, or None. The graph is dynamic in the token count: training reuses it."""
    weight = norm.weight
    x = torch.randn(1, 8, weight.shape[-1], device=weight.device, dtype=weight.dtype, requires_grad=True)
    try:
        with torch.autocast(weight.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            compiled(norm, x).sum().backward()
    except Exception as e:  # inductor's compiler and codegen errors have no common base class
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    finally:
        weight.grad = None  # a fully trained norm's weight: the probe's gradient is not the run's
    return None


@contextmanager
def compiled_norms(model: torch.nn.Module, autocast_dtype: torch.dtype | None, required: bool, log=print):
    """Within the block, every RMSNorm layer of `model` runs its class's compiled forward.
    A compile that fails in the probe is an error when `required` (training.compile_norms: true),
    otherwise logged and the layers stay eager."""
    norms = norm_modules(model)
    # emulate_precision_casts: round where eager rounds (the normalised input to the input's dtype
    # before the weight multiply), so a bf16 run's losses stay eager's to a few parts in 1e5
    compiled = {cls: torch.compile(cls.forward, dynamic=True, options={"emulate_precision_casts": True})
                for cls in {type(m) for m in norms}}
    started = time.perf_counter()
    reason = probe(norms[0], compiled[type(norms[0])], autocast_dtype) if norms else "the model has no RMSNorm layer"
    if reason:
        if required:
            raise SftlabError(f"training.compile_norms: {reason}")
        log(f"compiled norms: off ({reason})")
        norms = []
    else:
        log(f"compiled norms: {len(norms)} RMSNorm layers ({', '.join(sorted(c.__name__ for c in compiled))}) "
            f"in {time.perf_counter() - started:.1f} s")
    for m in norms:
        m.forward = types.MethodType(compiled[type(m)], m)
    try:
        yield bool(norms)
    finally:
        for m in norms:
            del m.forward  # the instance attribute: the class's eager forward again
