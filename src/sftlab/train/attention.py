"""Padding-free attention for packed training batches: "sftlab_varlen".

A packed batch is one flat row of examples whose `position_ids` restart at 0 for each.
transformers' sdpa/eager turn that into a 4D block-diagonal mask and then compute the
whole (rows x length)^2 score matrix, most of it masked out. This attention function
computes each example's causal attention alone instead:

- CUDA: one fused call of PyTorch's variable-length flash attention
  (`torch.nn.attention.varlen.varlen_attn`), given the cumulative example lengths;
- otherwise (CPU, or a PyTorch without it): causal SDPA on padded batches of examples of similar
  length (`_grouped`; on a CPU, groups of short examples from whole score matrices instead,
  `_ShortCausal`), or, where a mask is needed (a sliding window shorter than an example,
  attention sinks), SDPA per example.

So a batch needs no padding (the collator flattens all rows into one; on CPU it rounds the
row's length, see data/pack.py `shape_bucket`) and the attention FLOPs are about sum(len_i^2)
(the CPU path pads an example to at most GROUP_RATIO times its length, rounded up to a
`shape_bucket` width) instead of rows x max_len^2. The mask machinery is skipped: an
implementation name that `AttentionMaskInterface` does not know gets no mask.

It computes causal attention, optionally within a sliding window, optionally with attention
sinks (gpt-oss), and nothing else. So it is the default only for the architectures in
`VERIFIED` (each tested equal to transformers' eager attention on every example alone,
tests/integration/test_attention_archs.py) and only when nothing in the loaded model asks for
more (`varlen_refusal`); other models keep transformers' attention, with one log line saying
why. A keyword argument it does not know reaching it is an error, not something to ignore.
"""

from __future__ import annotations

import functools
import inspect
import logging
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from sftlab.data.pack import shape_bucket
from sftlab.errors import SftlabError

NAME = "sftlab_varlen"

logger = logging.getLogger("sftlab.train")

# config.model_type of the architectures whose packed, flattened, shape-rounded loss and
# gradients are tested equal to eager attention on each example alone (test_attention_archs.py).
VERIFIED = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gpt_oss"})

# Attention layer kinds (config.layer_types) this function computes: causal, or causal in a window.
LAYER_KINDS = frozenset({"full_attention", "sliding_attention"})
# Layer kinds that carry no state along the row, not named in a refusal of packing: the feed-forward kinds some
# hybrids list among their layer types (Nemotron-H), which see one position at a time, and a top-k indexer's
# attention (indexed_attention: through the mask, as dots3_note's keeps packed examples apart)
STATELESS_KINDS = frozenset({"mlp", "moe", "dense", "sparse", "indexed_attention"})

# Keyword arguments transformers' models pass on to every attention function (TransformersKwargs,
# FlashAttentionKwargs) that change nothing here: example bounds are read from cu_seq_lens_q,
# max_length_q or position_ids; a KV cache is refused by the key length; the rest are output flags.
PASSED_THROUGH = frozenset({
    "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx",
    "use_cache", "output_attentions", "output_hidden_states", "output_router_logits", "num_items_in_batch",
})


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


def _sink_inputs(query, key, value, sinks, scaling):
    """Attention sinks (gpt-oss's `s_aux`, one logit per head) as an extra key at position 0
    that every query sees, with value 0: queries get one more dimension holding sink / scale,
    real keys 0 there and the sink key 1, so its score is the head's sink logit and each softmax
    denominator gains exp(sink), as in transformers' eager gpt-oss attention. The sink key is
    shared by all heads, so grouped-query attention still needs no repeated keys."""
    b, hq, length, d = query.shape
    scaling = d**-0.5 if scaling is None else scaling
    column = (sinks.to(query.dtype) / scaling).view(1, hq, 1, 1).expand(b, hq, length, 1)
    query = torch.cat([query, column], dim=-1)
    sink_key = key.new_zeros(b, key.shape[1], 1, d + 1)
    sink_key[..., -1] = 1
    key = torch.cat([sink_key, F.pad(key, (0, 1))], dim=2)
    value = torch.cat([value.new_zeros(b, value.shape[1], 1, d), value], dim=2)
    return query, key, value, scaling


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B*L, H, D] (rows one after the other; a view when the layout allows)."""
    return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])


@functools.lru_cache(maxsize=16)
def _padded_layout(bounds: tuple[int, ...], device: torch.device):
    """Examples sorted by length and cut into groups whose lengths lie within GROUP_RATIO of the
    group's longest; each group is one [count, width] batch, shorter examples padded at the end
    by repeating their last token. Returns ([(count, width)...], gather, inverse, back): `gather`
    picks the padded layout's positions from the flat sequence, `inverse` picks each flat position
    back; `back` sends each padded position's gradient to its flat position, the padding copies'
    to one past the end (see `_Pick`).

    On a CPU a group's width is its longest example rounded up by `shape_bucket` (at most 6.25 %
    more): oneDNN and ideep keep a kernel for every matmul shape the attention kernel's tiles
    take, and widths from a fixed set keep those caches from growing at every step of a long run."""
    segments = sorted(((e - s, s) for s, e in zip(bounds, bounds[1:]) if e > s), key=lambda x: (-x[0], x[1]))
    groups, gather = [], []
    inverse = torch.empty(bounds[-1], dtype=torch.long)
    offset = i = 0
    while i < len(segments):
        longest = segments[i][0]
        j = i
        while j < len(segments) and segments[j][0] * GROUP_RATIO >= longest:
            j += 1
        width = shape_bucket(longest) if device.type == "cpu" else longest
        steps = torch.arange(width)
        for k, (n, s) in enumerate(segments[i:j]):
            gather.append(s + steps.clamp(max=n - 1))
            inverse[s : s + n] = offset + k * width + steps[:n]
        groups.append((j - i, width))
        offset += (j - i) * width
        i = j
    back = torch.full((offset,), bounds[-1], dtype=torch.long)
    back[inverse] = torch.arange(bounds[-1])
    return groups, torch.cat(gather).to(device), inverse.to(device), back.to(device)


class _Pick(torch.autograd.Function):
    """`src.index_select(0, index)` whose backward is a gather too, not index_select's scatter-add
    (several times slower on CPU): row i of src gets the gradient of output row back[i], or zero
    where back[i] == len(index). Each src row must reach its output row once, all other copies of
    it (the padding of `_padded_layout`) having exactly zero gradient: causal attention's padding
    positions are seen by no real query, so their q, k and v gradients are exact zeros."""

    @staticmethod
    def forward(ctx, src, index, back):
        ctx.save_for_backward(back)
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (back,) = ctx.saved_tensors
        if int(back.max()) == len(grad):  # some src rows went nowhere: they read a zero row
            grad = torch.cat([grad, grad.new_zeros(1, *grad.shape[1:])])
        return grad.index_select(0, back), None, None


class _ShortCausal(torch.autograd.Function):
    """Causal attention of a padded group of short examples from whole score matrices, in fp32:
    on a CPU, PyTorch's flash kernel works such groups in small tiles at a fraction of the
    machine's matmul rate, while a group's [count, H, L, L] scores are a few batched matmuls
    (bench/README.md, "Attention of short examples": faster up to SHORT_WIDTH, and closer to an
    fp64 reference than flash in bf16). Keeps q, k, v and the output for backward, where it
    rebuilds the probabilities. q [B, Hq, L, D], k/v [B, Hkv, L, D], Hq a multiple of Hkv
    (grouped-query heads read their key/value head, as SDPA's enable_gqa)."""

    @staticmethod
    def _probabilities(q, k, scale):
        """(q, k in fp32 as [B*Hkv, (Hq/Hkv)*L, D] and [B*Hkv, L, D], the fp32 softmax of the causal
        scores [B*Hkv, (Hq/Hkv)*L, L]): rows are query heads x positions."""
        b, hq, length, d = q.shape
        hk = k.shape[1]
        qf = q.float().reshape(b * hk, -1, d)
        kf = k.float().reshape(b * hk, length, d)
        scores = torch.baddbmm(_causal_bias(length, hq // hk, q.device), qf, kf.transpose(1, 2), alpha=scale)
        return qf, kf, torch.softmax(scores, dim=-1)

    @staticmethod
    @torch.autocast("cpu", enabled=False)  # its matmuls are meant in fp32, not in autocast's dtype
    def forward(ctx, q, k, v, scale):
        b, hq, length, d = q.shape
        _, _, probs = _ShortCausal._probabilities(q, k, scale)
        out = torch.bmm(probs, v.float().reshape(-1, length, d)).view(b, hq, length, d).to(q.dtype)
        ctx.save_for_backward(q, k, v, out)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        b, hq, length, d = q.shape
        hk = k.shape[1]
        qf, kf, probs = _ShortCausal._probabilities(q, k, ctx.scale)
        grad = grad_out.float().reshape(b * hk, -1, d)
        grad_v = torch.bmm(probs.transpose(1, 2), grad).view(b, hk, length, d)
        grad_p = torch.bmm(grad, v.float().reshape(-1, length, d).transpose(1, 2))
        delta = (grad_out.float() * out.float()).sum(-1, keepdim=True).view(b * hk, -1, 1)
        grad_s = probs.mul_(grad_p.sub_(delta))
        grad_q = torch.bmm(grad_s, kf).mul_(ctx.scale).view(b, hq, length, d)
        grad_k = torch.bmm(grad_s.transpose(1, 2), qf).mul_(ctx.scale)
        return grad_q.to(q.dtype), grad_k.view(b, hk, length, d).to(k.dtype), grad_v.to(v.dtype), None


@functools.lru_cache(maxsize=64)
def _causal_bias(length: int, heads: int, device: torch.device) -> torch.Tensor:
    """[heads * L, L]: 0 where causal attention looks, -inf above the diagonal, once per head."""
    hidden = torch.ones(length, length, dtype=torch.bool, device=device).triu_(1)
    return torch.zeros(length, length, device=device).masked_fill_(hidden, float("-inf")).repeat(heads, 1)


# Examples whose lengths differ by up to this factor share one padded SDPA call. Causal attention
# needs no mask for end padding (no real query sees a later position), so padding costs only the
# padded positions' FLOPs, while each call saves a round of per-example slicing and kernel set-up.
GROUP_RATIO = 1.5
# Groups up to this padded width take `_ShortCausal` on a CPU: from 192 rows PyTorch's flash kernel
# takes larger tiles and is the faster one (bench/README.md, "Attention of short examples").
SHORT_WIDTH = 184


def _grouped(query, key, value, bounds: list[int], dropout, scaling):
    """Causal SDPA over the examples, one call per group of similar lengths (`_padded_layout`):
    [B, H, L, D] inputs -> [B*L, H, D]. Far fewer calls than one per example for short examples;
    the padded copies are made by one gather per tensor, and so is their backward (`_Pick`)."""
    groups, gather, inverse, back = _padded_layout(tuple(bounds), query.device)
    q, k, v = (_Pick.apply(_flat(t), gather, inverse) for t in (query, key, value))  # [P, H, D], padded layout
    sizes = [count * longest for count, longest in groups]
    outs = []
    for (count, longest), qg, kg, vg in zip(groups, q.split(sizes), k.split(sizes), v.split(sizes)):
        qg, kg, vg = (t.view(count, longest, t.shape[1], t.shape[2]).transpose(1, 2) for t in (qg, kg, vg))
        if longest <= SHORT_WIDTH and dropout == 0.0 and qg.device.type == "cpu":
            if torch.is_autocast_enabled("cpu"):  # the inputs SDPA would get (and keep for backward)
                qg, kg, vg = (t.to(torch.get_autocast_dtype("cpu")) for t in (qg, kg, vg))
            out = _ShortCausal.apply(qg, kg, vg, qg.shape[-1] ** -0.5 if scaling is None else scaling)
        else:
            out = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout, is_causal=True, scale=scaling,
                                                 enable_gqa=qg.shape[1] != kg.shape[1])
        outs.append(out.transpose(1, 2).reshape(count * longest, out.shape[1], out.shape[3]))
    return _Pick.apply(torch.cat(outs), inverse, back)


def _per_example(query, key, value, bounds: list[int], dropout, scaling, sliding_window, sinks=None):
    """SDPA on each example alone, with an explicit mask (a sliding window shorter than the
    example, or attention sinks): [B, H, L, D] inputs -> [B*L, H, D]. The examples are `split`
    views of the flat sequence (one concatenation in backward, where slices would each add a
    zero-filled copy of the whole sequence), kept 4D: with 3D inputs SDPA falls back to its math
    kernel, which keeps each l x l attention matrix for backward."""
    lengths = [e - s for s, e in zip(bounds, bounds[1:])]
    flat = [_flat(t).transpose(0, 1).unsqueeze(0).split(lengths, dim=2) for t in (query, key, value)]  # [1, H, l, D]
    pieces = []
    for qs, ks, vs in zip(*flat):
        n, scale, mask = qs.shape[2], scaling, None
        if (sliding_window and n > sliding_window) or sinks is not None:
            idx = torch.arange(n, device=query.device)
            mask = idx[:, None] >= idx[None, :]
            if sliding_window:
                mask &= idx[:, None] - idx[None, :] < sliding_window
        if sinks is not None:
            qs, ks, vs, scale = _sink_inputs(qs, ks, vs, sinks, scaling)
            mask = F.pad(mask, (1, 0), value=True)
        pieces.append(F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scale,
            enable_gqa=qs.shape[1] != ks.shape[1],
        ))
    return torch.cat(pieces, dim=2)[0].transpose(0, 1)


def _check_arguments(module, is_causal, softcap, kwargs) -> None:
    """Refuse what this function would otherwise ignore and so compute wrongly."""
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in PASSED_THROUGH)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if softcap is not None:
        unknown.insert(0, "softcap")
    if not is_causal:
        unknown.insert(0, "is_causal=False")
    if unknown:
        raise SftlabError(
            f"{type(module).__name__} passes {', '.join(unknown)} to its attention, which {NAME} does not "
            f"compute: set model.attn_implementation to sdpa or eager for this model"
        )


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             s_aux: torch.Tensor | None = None, is_causal: bool | None = None,
                             softcap: float | None = None, **kwargs):
    """query [B, Hq, L, D], key/value [B, Hkv, L, D] -> ([B, L, Hq, D], None).

    Example bounds come from `cu_seq_lens_q` (+ `max_length_q`), passed by the loss once per
    forward, else from `position_ids`, else each row is one example. `s_aux`: attention sinks."""
    _check_arguments(module, is_causal, softcap, kwargs)
    b, hq, length, d = query.shape
    if key.shape[2] != length:
        raise ValueError(f"{NAME} is for training forwards (no KV cache); load the model with sdpa to generate")
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        pos = kwargs.get("position_ids")  # [B, L], or [1, L] shared by all rows
        bounds = segment_bounds(pos.expand(b, -1)) if pos is not None else [i * length for i in range(b + 1)]
    if query.is_cuda and dropout == 0.0 and s_aux is None:
        q, k, v = (t.transpose(1, 2).reshape(b * length, t.shape[1], d) for t in (query, key, value))
        cu = torch.as_tensor(bounds, dtype=torch.int32, device=q.device)
        max_len = kwargs.get("max_length_q") or int(cu.diff().max())
        out = _fused(q, k, v, cu, max_len, scaling, sliding_window)
        if out is not None:
            return out.reshape(b, length, hq, d), None
    bounds = bounds.tolist() if torch.is_tensor(bounds) else bounds
    longest = max(e - s for s, e in zip(bounds, bounds[1:]))
    if s_aux is None and not (sliding_window and longest > sliding_window):
        out = _grouped(query, key, value, bounds, dropout, scaling)
    else:
        out = _per_example(query, key, value, bounds, dropout, scaling, sliding_window, s_aux)
    return out.view(b, length, hq, d), None


def register() -> str:
    """Make NAME a valid `attn_implementation` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    return NAME


def varlen_refusal(model) -> str | None:
    """Why NAME would not compute this model's attention as transformers does (None if it would)."""
    config = getattr(model, "config", None)
    if config is None or not getattr(model, "_supports_attention_backend", False):
        return "it does not dispatch attention through transformers' AttentionInterface"
    kinds = set(getattr(config, "layer_types", None) or ()) - LAYER_KINDS
    if kinds:
        return f"layer types {', '.join(sorted(kinds))}"
    for key in ("attn_logit_softcapping", "attention_chunk_size", "use_bidirectional_attention"):
        if getattr(config, key, None):
            return f"{key}={getattr(config, key)}"
    for name, module in model.named_modules():
        if getattr(module, "is_causal", True) is False:
            return f"{name} is not causal"
    return None


def choose_attention(model, requested: str | None, packing: bool = False) -> None:
    """Switch a model loaded without an explicit choice to NAME where it is verified equal; switch
    one loaded for an explicit NAME (with its default attention) to it, or refuse it for a model
    that needs more than it computes. Then, where several examples share a row (`packing`, or
    an attention that flattens each micro-batch into one row), refuse a model in which they
    would see each other."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    reason = varlen_refusal(model) if requested in (None, NAME) else None
    if requested == NAME and reason:
        raise SftlabError(f"model.attn_implementation: {NAME} cannot run {model_type}: {reason}; use sdpa or eager")
    if requested == NAME:
        register()
        model.set_attn_implementation(NAME)
    if requested is None:
        if reason is None and model_type not in VERIFIED:
            reason = "its architecture is not among those tested equal to transformers' attention"
        if reason:
            logger.warning("attention: %s, not %s, for %s: %s", model.config._attn_implementation, NAME, model_type,
                           reason)
        else:
            register()
            model.set_attn_implementation(NAME)
    flatten = can_flatten(model)
    if not (packing or flatten):
        return
    apart = examples_kept_apart(model)
    if apart is None:
        logger.warning("attention: could not check that %s keeps the examples sharing a row apart "
                       "(data.packing=false avoids the question)", model_type)
    if apart is not False:
        return
    attn = model.config._attn_implementation
    kinds = sorted(set(getattr(model.config, "layer_types", None) or ()) - LAYER_KINDS - STATELESS_KINDS)
    why = (f"its {', '.join(kinds)} layers carry state along the row" if kinds else
           f"one example's logits depend on the example before it in the row under {attn} attention")
    if flatten:
        raise SftlabError(f"model.attn_implementation: {attn} puts each micro-batch in one row, and in {model_type} "
                          f"the examples there would see each other ({why}): use sdpa")
    raise SftlabError(f"data.packing: examples packed in one row would see each other in {model_type} ({why}): "
                      "set data.packing=false")


def examples_kept_apart(model) -> bool | None:
    """Whether two examples sharing a row, told apart by their position_ids restarting at 0 as
    packed rows are, stay independent through the whole model: the gradient of the second
    example's logits with respect to the first example's input embeddings must be exactly zero
    (masked attention weights are exactly 0, so any other value is a leak: a mask that ignores the
    restarts, or a convolution or state-space layer that carries state along the row). None when
    the model cannot be driven this way.

    The embeddings are given as inputs_embeds, or, for a model that cannot take them (CPM-Ant reads
    input_ids alone, CTRL scales them in place) or that puts tokens of its own before them (CPM-Ant's
    prompt), as input_ids with a zero added to the embedding layer's output: a probe that failed let
    both train packed unchecked, and in both the examples saw each other. Weights loaded in bf16/fp16 (a LoRA base
    under mixed precision) are driven under autocast, as training drives them: XLNet runs only so, and its packed
    LoRA runs trained unchecked."""
    embeddings = model.get_input_embeddings()
    device, dtype = embeddings.weight.device, embeddings.weight.dtype
    precision = torch.autocast(device.type, dtype=dtype) if dtype in (torch.bfloat16, torch.float16) else nullcontext()
    ids = torch.randint(embeddings.num_embeddings, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    position_ids = torch.arange(8, device=device).remainder(4)[None]

    def given_embeddings():
        inputs = embeddings(ids).detach().requires_grad_(True)
        return inputs, model(inputs_embeds=inputs, position_ids=position_ids, use_cache=False).logits

    def zero_added_to_embeddings():
        added = []

        def hook(_module, _args, out):
            if added:  # the embedding layer called again: the probe's zero is on its first output
                return out
            added.append(torch.zeros_like(out, requires_grad=True))
            return out + added[0]

        handle = embeddings.register_forward_hook(hook)
        try:
            logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        finally:
            handle.remove()
        return added[0], logits

    for probe in (given_embeddings, zero_added_to_embeddings):
        try:
            with torch.enable_grad(), precision:
                inputs, logits = probe()
                logits = logits[0, -4:]  # the second example's
                weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(logits)
                (grad,) = torch.autograd.grad((logits * weights).sum(), inputs)
        except Exception:  # noqa: BLE001  a model this probe cannot drive (e.g. one that needs more inputs)
            continue
        return not bool(grad[0, -8:-4].any())  # the first example's (after any tokens the model puts first)
    return None


def can_flatten(model) -> bool:
    """True when the model's attention reads example bounds from position_ids without building a
    mask, so a whole micro-batch can be one padding-free row."""
    return getattr(model.config, "_attn_implementation", None) in (NAME, "flash_attention_2", "flash_attention_3")
