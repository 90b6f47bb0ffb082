"""Padding-free attention for packed training batches: "sftlab_varlen".

A packed batch is one flat row of examples whose `position_ids` restart at 0 for each.
transformers' sdpa/eager turn that into a 4D block-diagonal mask and then compute the
whole (rows x length)^2 score matrix, most of it masked out. This attention function
computes each example's causal attention alone instead:

- CUDA: one fused call of PyTorch's variable-length flash attention
  (`torch.nn.attention.varlen.varlen_attn`), given the cumulative example lengths;
- otherwise (CPU, or a PyTorch without it): SDPA with `is_causal=True` per example.

So a batch needs no padding (the collator flattens all rows into one; on CPU it rounds the
row's length, see data/pack.py `shape_bucket`) and the attention FLOPs are sum(len_i^2)
instead of rows x max_len^2. The mask machinery is
skipped: an implementation name that `AttentionMaskInterface` does not know gets no mask.
Models with logit soft-capping (Gemma 2) keep their own attention.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

NAME = "sftlab_varlen"


def segment_bounds(position_ids: torch.Tensor) -> list[int]:
    """Start offsets of the examples in the flattened [B*L] sequence, plus its end
    (cumulative lengths, as varlen kernels take them)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1).tolist()
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    return starts + [flat.numel()]


@functools.cache
def _cuda_varlen():
    """PyTorch's varlen flash attention and the keyword arguments this version accepts (None if absent)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _fused(q, k, v, bounds, max_len, scaling, sliding_window):
    """One varlen flash-attention call on CUDA, or None where this PyTorch cannot do the case."""
    found = _cuda_varlen()
    if found is None or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    varlen, params = found
    extra = {}
    if "window_size" in params:
        extra["window_size"] = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    elif "is_causal" in params and not sliding_window:
        extra["is_causal"] = True
    else:
        return None
    if "scale" in params:
        extra["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-12:
        return None
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return varlen(q, k, v, bounds, bounds, max_len, max_len, **extra)


def _per_example(query, key, value, bounds: list[int], dropout, scaling, sliding_window):
    """SDPA on each example alone (CPU, or CUDA without a usable varlen kernel), on views of
    the [B, H, L, D] inputs: 4D, because with 3D inputs SDPA falls back to its math kernel,
    which keeps each l x l attention matrix for backward (17.7 vs 3.1 KB/token/layer on SmolLM2).
    Returns [1, H, B*L, D] (rows one after the other)."""
    length = query.shape[2]
    pieces = []
    for s, e in zip(bounds, bounds[1:]):
        row, s, e = s // length, s % length, e - (s // length) * length  # an example never spans rows
        qs, ks, vs = (t[row : row + 1, :, s:e] for t in (query, key, value))
        mask = None
        if sliding_window and e - s > sliding_window:
            idx = torch.arange(e - s, device=query.device)
            mask = (idx[:, None] >= idx[None, :]) & (idx[:, None] - idx[None, :] < sliding_window)
        pieces.append(F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling,
            enable_gqa=qs.shape[1] != ks.shape[1],
        ))
    return torch.cat(pieces, dim=2)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """query [B, Hq, L, D], key/value [B, Hkv, L, D] -> ([B, L, Hq, D], None).

    Example bounds come from `cu_seq_lens_q` (+ `max_length_q`), passed by the loss once per
    forward, else from `position_ids`, else each row is one example."""
    b, hq, length, d = query.shape
    if key.shape[2] != length:
        raise ValueError(f"{NAME} is for training forwards (no KV cache); load the model with sdpa to generate")
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        pos = kwargs.get("position_ids")  # [B, L], or [1, L] shared by all rows
        bounds = segment_bounds(pos.expand(b, -1)) if pos is not None else [i * length for i in range(b + 1)]
    if query.is_cuda and dropout == 0.0:
        q, k, v = (t.transpose(1, 2).reshape(b * length, t.shape[1], d) for t in (query, key, value))
        cu = torch.as_tensor(bounds, dtype=torch.int32, device=q.device)
        max_len = kwargs.get("max_length_q") or int(cu.diff().max())
        out = _fused(q, k, v, cu, max_len, scaling, sliding_window)
        if out is not None:
            return out.reshape(b, length, hq, d), None
    bounds = bounds.tolist() if torch.is_tensor(bounds) else bounds
    out = _per_example(query, key, value, bounds, dropout, scaling, sliding_window)  # [1, H, B*L, D]
    return out.view(hq, b, length, d).permute(1, 2, 0, 3), None


def register() -> str:
    """Make NAME a valid `attn_implementation` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    return NAME


def supports_varlen(model) -> bool:
    """True for models that dispatch attention through transformers' interface and need no soft-capping."""
    config = getattr(model, "config", None)
    return bool(getattr(model, "_supports_attention_backend", False)) and config is not None and not (
        getattr(config, "attn_logit_softcapping", None)
    )


def choose_attention(model, requested: str | None) -> None:
    """Switch a model loaded without an explicit choice to NAME where it can run it."""
    if requested is None and supports_varlen(model):
        register()
        model.set_attn_implementation(NAME)


def can_flatten(model) -> bool:
    """True when the model's attention reads example bounds from position_ids without building a
    mask, so a whole micro-batch can be one padding-free row."""
    return getattr(model.config, "_attn_implementation", None) in (NAME, "flash_attention_2", "flash_attention_3")
