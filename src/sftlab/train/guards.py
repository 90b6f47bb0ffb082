"""What stops a training run with a clear message instead of a traceback or a ruined model:
non-finite losses or gradients, running out of memory, a failed checkpoint write."""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import TrainerCallback

from sftlab.errors import SftlabError

logger = logging.getLogger("sftlab.train")


def _names(sources: list[str], limit: int = 8) -> str:
    unique = list(dict.fromkeys(sources))
    more = f" and {len(unique) - limit} more" if len(unique) > limit else ""
    return ", ".join(unique[:limit]) + more if unique else "unknown sources"


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether every value is finite (a 0-dim bool tensor), read from norms that cannot overflow where
    the values do not: one multi-tensor norm (a few kernels, not one per tensor) over the tensors whose
    dtype has fp32's range (fp32, bf16), and an fp32 norm of each narrower one (an fp16 norm is inf
    past 65,504 while every value is finite)."""
    wide_range = torch.finfo(torch.float32).max
    wide = [t for t in tensors if torch.finfo(t.dtype).max >= wide_range]
    norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors if torch.finfo(t.dtype).max < wide_range]
    if wide:
        norms.append(torch.nn.utils.get_total_norm(wide, foreach=None).float())
    return torch.stack(norms).isfinite().all()


class NonFiniteGuard(TrainerCallback):
    """Checks every optimizer step, before the update, for a NaN/inf loss or gradient.

    The trainer hands it each micro-batch's loss and sources (`record`); the check runs once
    per optimizer step (one device sync). A bad step stops the run with an SftlabError naming
    the step and the examples of its batches; with `skip=True` the step's gradients are
    dropped instead (the optimizer leaves every weight and moment as it was; the step still
    counts and the learning-rate schedule moves on) and `skipped` lists the steps.
    Under a GradScaler (fp16) overflowing gradients are the scaler's business: only the
    loss is checked, and the scaler itself skips a step whose gradients overflow. Under
    several processes all decide alike (one all-reduce), and each names its own batches.
    """

    def __init__(self, skip: bool, last_good: Callable[[], Path | None] = lambda: None):
        self.skip = skip
        self.last_good = last_good  # () -> the checkpoint a resume would pick, for the message
        self.skipped: list[int] = []
        self.scaler_active = False
        self._losses: list[torch.Tensor] = []
        self._sources: list[list[str]] = []

    def record(self, loss: torch.Tensor, sources: list[str] | None) -> None:
        self._losses.append(loss.detach().reshape(()).float())
        self._sources.append(list(sources or []))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1  # the step being taken (checkpoint-N is saved after step N)
        losses, sources = self._losses, self._sources
        self._losses, self._sources = [], []
        if not losses:
            return
        loss_ok = torch.stack(losses).isfinite()
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        if grads and not self.scaler_active:
            local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: this rank's shard
            grad_ok = _all_finite([g.detach() for g in local]).reshape(1).to(loss_ok.device)
        else:
            grad_ok = loss_ok.new_ones(1)
        flags = torch.cat([loss_ok.all().reshape(1), grad_ok]).to(torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)  # every process decides alike
        if bool(flags.all()):
            return
        bad = [s for ok, s in zip(loss_ok.tolist(), sources) if not ok] or sources
        what = "loss" if not flags[0] else "gradients"
        named = _names([name for batch in bad for name in batch])
        if self.skip and (grads or self.scaler_active):
            if not self.scaler_active:
                for p in model.parameters():
                    p.grad = None  # torch and bitsandbytes optimizers leave a parameter without grad untouched
            self.skipped.append(step)
            logger.warning("step %d skipped: non-finite %s on a batch from %s", step, what, named)
            return
        last = self.last_good()
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        how = ("set training.skip_nonfinite_steps=true to skip such steps" if not self.skip
               else "this engine keeps gradients out of reach, so the step cannot be skipped")
        raise SftlabError(f"step {step}: non-finite {what} (NaN or inf) on a batch from {named}; training stopped, "
                          f"{kept}. Check those examples, lower the learning rate, or {how}")


class RecordsStepLosses:
    """Mixin, before a Trainer whose loss sftlab does not compute (the align trainers): hands
    each training micro-batch's loss to the NonFiniteGuard in `nonfinite` (without sources:
    their batches do not carry them)."""

    nonfinite: NonFiniteGuard | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.nonfinite is not None:
            self.nonfinite.record(loss, None)
        return loss


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def out_of_memory_message(config, step: int) -> str:
    """What to lower when a training step runs out of memory, with the values in use."""
    t, d = config.training, config.data
    hints = [f"training.per_device_train_batch_size (now {t.per_device_train_batch_size}; raise "
             "training.gradient_accumulation_steps to keep the effective batch)",
             f"data.max_seq_length (now {d.max_seq_length})"]
    if not t.gradient_checkpointing:
        hints.append("or set training.gradient_checkpointing=true")
    if config.method == "full":
        hints.append("or train with method=lora")
    return f"step {step}: out of memory; lower " + ", ".join(hints) + " (`sftlab estimate` shows the memory a setting needs)"


def is_save_failure(exc: BaseException) -> bool:
    """A write that failed for want of disk or memory, or an I/O error, rather than a bug.
    safetensors reports I/O errors as SafetensorError, not OSError."""
    return isinstance(exc, (OSError, SafetensorError)) or is_out_of_memory(exc)


def _os_errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"\(os error (\d+)\)", str(exc))  # safetensors: "I/O error: ... (os error 28)"
    return int(found[1]) if found else None


TRAIN_RESUME = "sftlab train CONFIG --resume"  # what a message about a failed save suggests


def save_failure_message(name: str, exc: BaseException, last_good, resume_command: str = TRAIN_RESUME) -> str:
    """A write that failed: the reason in a few words, and what is left intact."""
    code = _os_errno(exc)
    filename = getattr(exc, "filename", None)
    where = f" ({filename})" if filename else ""
    if code == errno.ENOSPC:
        reason = f"no space left on the device{where}"
    elif is_out_of_memory(exc):
        reason = "out of memory"
    elif code:
        reason = f"{os.strerror(code).lower()}{where}"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    kept = f"the previous checkpoint {last_good} is intact" if last_good else "no earlier checkpoint exists"
    return (f"saving {name} failed: {reason}; {kept}. Free some space or memory, then continue with "
            f"`{resume_command}`")
