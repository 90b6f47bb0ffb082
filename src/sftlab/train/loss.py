"""The SFT loss: lm_head + cross-entropy only where a trained token is predicted.

Labels are shifted here and nowhere else: position t predicts the token at t+1, so a
position is kept when labels[t+1] != -100. Only kept positions go through the lm_head
(`logits_to_keep` with a boolean mask), so logits memory grows with trained tokens, not
with sequence x vocabulary. Where the model's logits are exactly `lm_head(hidden)` (no
softcapping or scaling) and one process holds the whole head, the head and the loss are one
chunked function (`linear_cross_entropy_sum`): no logits tensor of all kept positions is
ever made. The returned sum is normalised by the caller with the number of trained tokens in
the whole gradient-accumulation window (and across processes).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from sftlab.data.pack import shape_bucket
from sftlab.data.render import IGNORE
from sftlab.train.attention import NAME as VARLEN
from sftlab.train.attention import segment_bounds

CE_CHUNK = 512  # rows of logits upcast to fp32 at a time (100 MB for a 49k vocabulary)
FROZEN_HEAD_CPU_CHUNK = 128  # the same on a CPU when the head's weight is not trained (see ce_chunk)

# Architectures whose causal-LM forward returns lm_head(hidden) unchanged, unless the config
# names a softcapping or scaling (checked in `fused_head`).
PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gpt_oss"})
LOGIT_CHANGES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): keep[b, t] is True when position t predicts trained token labels[b, t+1]."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep, labels[:, 1:][keep[:, :-1]]


def ce_chunk(device_type: str, head_trained: bool) -> int:
    """Rows of logits the fused head + loss computes at a time. On a CPU with a frozen head
    (LoRA), FROZEN_HEAD_CPU_CHUNK rows: the loss's forward is where a step's allocation peaks,
    and a chunk's fp32 logits and log-probabilities are 8 B x rows x vocabulary on top of every
    activation (SmolLM2, 8 x 512 rows: peak RSS 4.46 -> 4.10 GiB, same step time; the head +
    loss alone on 2,560 rows 1.3x faster, the chunk staying in cache). A trained head's weight
    gradient is a GEMM over the chunk's rows, which wants them long (512 rows 1.4x faster than
    128 there); GPUs keep CE_CHUNK."""
    return min(CE_CHUNK, FROZEN_HEAD_CPU_CHUNK) if device_type == "cpu" and not head_trained else CE_CHUNK


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, chunk: int = CE_CHUNK,
                      smoothing: float = 0.0) -> torch.Tensor:
    """Summed CE over rows of `logits` [N, V], upcasting to fp32 one chunk at a time; `smoothing` is
    F.cross_entropy's label_smoothing (transformers' label_smoothing_factor)."""
    total = logits.new_zeros((), dtype=torch.float32)
    for part, target in zip(logits.split(chunk), targets.split(chunk)):  # split: one concatenation in backward
        total = total + F.cross_entropy(part.float(), target, reduction="sum", label_smoothing=smoothing)
    return total


def _chunk_loss(h, t, w, dtype, grad_h, grad_w, smoothing: float = 0.0) -> torch.Tensor:
    """One chunk of `_LinearCrossEntropy`'s forward: its summed log-likelihood (with `smoothing` e:
    (1 - e) x the target's + e x the mean over the vocabulary, as F.cross_entropy's label_smoothing),
    its rows' gradients written into grad_h and its weight gradient added to grad_w (either may be None).
    A function of its own so that the chunk's [rows x vocab] tensors are freed when it returns:
    held by the loop's variables, the previous chunk's fp32 log-probabilities and bf16 gradient
    lived on beside the next chunk's logits, 1.75x the chunk's memory at the peak."""
    # the upcast first, so the matmul's own output is freed before log_softmax allocates
    # (log_softmax's dtype= argument makes the same fp32 copy, with the input still alive)
    logp = torch.log_softmax((h @ w.T).float(), dim=-1)
    used, picked = t != IGNORE, t.clamp(min=0)[:, None]
    picked_sum = logp.gather(1, picked).squeeze(1).mul_(used).sum()  # masks, not indexing: no host sync on CUDA
    if smoothing:
        picked_sum = (1 - smoothing) * picked_sum + smoothing * logp.mean(-1).mul_(used).sum()
    if grad_h is None and grad_w is None:
        return picked_sum
    grad = logp.exp_()  # softmax, in place of the log-probabilities
    grad.scatter_add_(1, picked, grad.new_full(picked.shape, smoothing - 1.0))
    if smoothing:
        grad.sub_(smoothing / grad.shape[-1])
    grad = grad.to(dtype)
    # IGNORE rows count for nothing: zeroed in the [rows x hidden] operands and results,
    # not in the [rows x vocab] gradient (a pass over the chunk's largest tensor saved)
    kept = used[:, None].to(dtype)
    if grad_h is not None:
        grad_h.copy_((grad @ w).mul_(kept))
    if grad_w is not None:
        grad_w += (grad.T @ (h * kept)).float()
    return picked_sum


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed CE of hidden @ weight.T against targets (IGNORE rows skipped), CE_CHUNK rows at a
    time: each chunk's logits exist only while its loss and its gradients are computed, in the
    forward (as Liger's fused linear cross-entropy does); backward only scales them. The matmuls
    run in `dtype` (autocast's), the softmax in fp32, as lm_head + F.cross_entropy would."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, chunk, need_grad, smoothing):
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_grad and ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad and ctx.needs_input_grad[1] else None
        for s in range(0, len(targets), chunk):
            total -= _chunk_loss(hidden[s : s + chunk].to(dtype), targets[s : s + chunk], w, dtype,
                                 None if grad_h is None else grad_h[s : s + chunk], grad_w, smoothing)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        grad_w = None if grad_w is None else grad_w * grad_out.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk: int | None = None, dtype: torch.dtype | None = None,
                             smoothing: float = 0.0) -> torch.Tensor:
    """Summed CE of the logits hidden [N, H] @ weight.T [H, V] against targets [N] (IGNORE rows
    count for nothing; `smoothing` as `cross_entropy_sum`'s), never holding more than `chunk` rows of
    logits (default: `ce_chunk`'s choice for this device and head). The matmuls run in `dtype`, by
    default autocast's if it is on, else hidden's."""
    device = hidden.device.type
    if dtype is None:
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    chunk = chunk or ce_chunk(device, head_trained=need_grad and weight.requires_grad)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, chunk, need_grad, smoothing)


def fused_head(model) -> torch.nn.Linear | None:
    """The lm_head to fuse with the loss, or None where logits are not exactly lm_head(hidden)
    or the head's weight is not all here (sharded or split across processes)."""
    base = _unwrapped(model)
    config = base.config
    if getattr(config, "model_type", None) not in PLAIN_HEAD or any(getattr(config, k, None) for k in LOGIT_CHANGES):
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or "forward" in vars(head):
        return None
    if type(head.weight) is not torch.nn.Parameter or head.weight.dim() != 2 or not head.weight.numel():
        return None
    return head


class _CastUnlessAutocast:
    """A PEFT layer's `cast_input_dtype_enabled`, false while autocast is on for `device`."""

    def __init__(self, device: str):
        self.device = device

    def __bool__(self) -> bool:
        return not torch.is_autocast_enabled(self.device)


def skip_lora_input_casts_under_autocast(model) -> None:
    """PEFT's LoRA layers cast their input to the adapters' dtype; under autocast a bf16 activation
    cast to the fp32 adapters is cast straight back to bf16 by autocast (the same values, bit for
    bit), so the two copies per adapter buy nothing, and the second one is saved for backward next
    to the original. This turns the cast off while autocast runs (it is read at each call: accelerate
    enters autocast inside the model's forward). DoRA layers keep their casts. Idempotent."""
    device = _unwrapped(model).device.type
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled") and hasattr(module, "lora_A") and not any(
                getattr(module, "use_dora", {}).values()) and module.cast_input_dtype_enabled is True:
            module.cast_input_dtype_enabled = _CastUnlessAutocast(device)


class _HiddenTap:
    """While inside, the model's `.logits` are the hidden states its lm_head would have read, and
    `dtype` is the dtype the head would have computed in (autocast's, seen inside the forward)."""

    def __init__(self, head: torch.nn.Linear):
        self.head, self.dtype = head, None

    def _forward(self, x):
        device = x.device.type
        self.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return x

    def __enter__(self):
        self.head.forward = self._forward
        return self

    def __exit__(self, *exc):
        del self.head.forward


def bucketed(keep: torch.Tensor) -> torch.Tensor:
    """`keep` plus the first untrained positions, so that the lm_head's row count is a
    `shape_bucket` size (see data/pack.py). With rows and head inputs bucketed, a SmolLM2
    LoRA run on CPU grew its RSS by 15 instead of 21 MB per step."""
    n = int(keep.sum())
    extra = shape_bucket(n) - n if n else 0
    if extra == 0:
        return keep
    free = (~keep).reshape(-1).nonzero().squeeze(1)[:extra]
    if len(free) < extra:
        return keep
    rows = keep.clone().reshape(-1)
    rows[free] = True
    return rows.view_as(keep)


def _unwrapped(model):
    """The transformers model inside PEFT / DDP wrappers."""
    while hasattr(model, "get_base_model") or hasattr(model, "module"):
        model = model.get_base_model() if hasattr(model, "get_base_model") else model.module
    return model


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(_unwrapped(model).forward).parameters


def selective_loss_sum(model, batch: dict, smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Summed next-token CE over trained positions (label-smoothed by `smoothing`), and how many there were."""
    labels = batch["labels"]
    keep, targets = shifted_targets(labels)
    skip_lora_input_casts_under_autocast(model)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch.get("position_ids"), "use_cache": False}
    if inputs["position_ids"] is not None and _unwrapped(model).config._attn_implementation == VARLEN:
        # example bounds computed once per forward (one device sync), not in every layer
        bounds = segment_bounds(inputs["position_ids"])
        inputs["cu_seq_lens_q"] = torch.tensor(bounds, dtype=torch.int32, device=labels.device)
        inputs["max_length_q"] = max(e - s for s, e in zip(bounds, bounds[1:]))
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"]
    head = fused_head(model) if _accepts_logits_to_keep(model) else None
    if head is not None:
        rows = bucketed(keep) if keep.device.type == "cpu" else keep
        with _HiddenTap(head) as tap:
            out = model(**inputs, logits_to_keep=rows)
        hidden = out.logits
        row_targets = torch.full((int(rows.sum()),), IGNORE, dtype=targets.dtype, device=targets.device)
        row_targets[keep[rows]] = targets  # filler rows (bucketing) stay IGNORE
        loss = linear_cross_entropy_sum(hidden.reshape(-1, hidden.shape[-1]), head.weight, row_targets,
                                        dtype=tap.dtype, smoothing=smoothing)
        return loss + router_loss(model, out, targets.numel()), int(targets.numel())
    if _accepts_logits_to_keep(model):
        rows = bucketed(keep) if keep.device.type == "cpu" else keep
        out = model(**inputs, logits_to_keep=rows)
        logits = out.logits.reshape(-1, out.logits.shape[-1])
        if rows is not keep:
            logits = logits[keep[rows]]  # drop the filler rows
    else:  # architectures without logits_to_keep: full logits, then select
        out = model(**inputs)
        logits = out.logits[keep]
    if targets.numel() == 0:  # keep the graph connected so every process runs backward
        return logits.sum() * 0.0, 0
    return (cross_entropy_sum(logits, targets, smoothing=smoothing) + router_loss(model, out, targets.numel()),
            int(targets.numel()))


def router_loss(model, out, trained: int) -> torch.Tensor | float:
    """A mixture of experts whose config asks for its router logits (`output_router_logits`) trains,
    as transformers' own loss does, with its load-balancing loss x `router_aux_coefficient`; here
    weighted by the micro-batch's trained tokens, so that it adds up over micro-batches and
    processes as the summed CE does. Evaluation losses stay the CE alone."""
    aux = getattr(out, "aux_loss", None)
    if aux is None or not model.training:
        return 0.0
    return router_aux_coefficient(model) * trained * aux


def router_aux_coefficient(model) -> float | None:
    """The factor transformers' own loss puts on the load-balancing loss: the causal LM's attribute, which
    is not always the config's router_aux_loss_coef (JetMoe's aux_loss_coef, DBRX's ffn_config.moe_loss_weight);
    None for a model that computes no such loss (DeepSeek-V3's routers are balanced without one)."""
    base = _unwrapped(model)
    for owner in (base, base.config.get_text_config()):
        for name in ("router_aux_loss_coef", "aux_loss_coef"):
            if (value := getattr(owner, name, None)) is not None:
                return value
    return None
