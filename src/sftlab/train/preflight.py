"""What a config asks of this machine, checked before anything is loaded or launched: the device, bf16
under the config's engine, and `preflight`'s refusals. Kept apart from the trainer so that `sftlab train
--nproc N` and `sftlab estimate` check a config with torch alone, not the training stack (transformers,
peft and bitsandbytes cost seconds to import, which every rank pays again)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sftlab.config import TrainConfig
from sftlab.errors import SftlabError
from sftlab.train import compiled_norms, kernels


def device_type() -> str:
    """The device a training run here uses: "cuda" where a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_supports_bf16() -> bool:
    """Fast bf16 matmuls: a GPU that has them, or a CPU with AVX-512 BF16 or AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_unavailable(engine: str, device: str = "auto") -> str | None:
    """Why bf16 cannot train under `engine` (ddp, deepspeed, fsdp) on `device` (cpu, cuda; auto: this
    machine's) (None when it can): transformers refuses bf16 under DeepSpeed without a GPU (DeepSpeed runs
    on a CPU only with use_cpu off, which bf16 then needs a GPU for)."""
    on_gpu = (device_type() if device == "auto" else device) == "cuda"
    if on_gpu or engine != "deepspeed":
        return None
    return "DeepSpeed on a CPU trains in fp32 here (transformers allows bf16 under DeepSpeed on a GPU only)"


def resolve_bf16(bf16: bool | str, fp16: bool, engine: str, device: str = "auto") -> bool:
    """training.bf16 (true, false, auto) resolved: auto is on where the device has fast bf16 matmuls and
    `engine` (ddp, deepspeed, fsdp) can use them. `device`: what trains (cpu, cuda; auto: this machine's).
    One that is not this machine's (`sftlab estimate --device`) is taken to have them on a GPU (every GPU
    since Ampere), not on a CPU."""
    if fp16:
        return False
    if bf16 == "auto":
        fast = device_supports_bf16() if device in ("auto", device_type()) else device == "cuda"
        return fast and bf16_unavailable(engine, device) is None
    return bool(bf16)


def wants_bf16(config: TrainConfig, device: str = "auto") -> bool:
    """The config's training.bf16 resolved for its engine on `device` (`resolve_bf16`)."""
    t = config.training
    return resolve_bf16(t.bf16, t.fp16, config_engine(config), device)


def config_engine(config: TrainConfig) -> str:
    """ddp, deepspeed or fsdp: the engine the config trains with."""
    from sftlab.train.distributed import engine_name

    return engine_name(config.distributed, config.training.passthrough())


def preflight(config: TrainConfig) -> None:
    """Refuse, before any data, model or process is touched, what would fail later or silently
    train otherwise: fp16 without a CUDA GPU (accelerate would train in fp32 without loss
    scaling, and say nothing), Liger's kernels or compiled norms asked for where they cannot run, and the engine's
    settings (distributed.engine_settings). DeepSpeed, without a GPU, is told the run is on the CPU."""
    from sftlab.train.distributed import engine_settings

    if config.training.fp16 and not torch.cuda.is_available():
        raise SftlabError("training.fp16: fp16 mixed precision needs a CUDA GPU (on CPU it would train in fp32 "
                          "without loss scaling); on CPU use training.bf16 or neither")
    if config.training.bf16 is True and (reason := bf16_unavailable(config_engine(config))):
        raise SftlabError(f"training.bf16: {reason}; set training.bf16=false (or auto)")
    if config.training.use_liger_kernel is True and (reason := kernels.unavailable()):
        raise SftlabError(f"training.use_liger_kernel: {reason}")
    if config.training.compile_norms is True and (reason := compiled_norms.unavailable(device_type())):
        raise SftlabError(f"training.compile_norms: {reason}")
    engine_settings(config)
    tell_deepspeed_the_device()


def tell_deepspeed_the_device() -> None:
    """On a machine without a GPU, tell DeepSpeed so (DS_ACCELERATOR=cpu, unless set) before anything imports
    it: transformers and accelerate import it wherever it is installed, whatever the engine (saving any model
    does), and it finds the CPU itself only after a warning that it was "unable to detect" a GPU, on every
    rank. The ranks of `sftlab train --nproc N` inherit the setting."""
    if device_type() == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

