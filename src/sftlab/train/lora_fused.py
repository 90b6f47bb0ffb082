"""LoRA layers as one autograd function: the adapter's product added inside the base GEMM, and
a backward that computes only what the frozen base and the adapters need.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate modules: on top of
the two skinny matmuls that is a full-size multiply and a full-size add in forward, autograd's
full-size sum of the two input gradients in backward, and about fifty ATen calls a layer and
step (views, transposes, casts), which on a GPU, where a small model's step waits on the host,
is most of the step. Here, for a frozen base W (and bias) and a vanilla adapter (A, B):

    forward   low = dropout(x) A^T;  y = x W^T + b, then y += low (sB)^T   (addmm_, in place)
    backward  g_low = g (sB);  dB = s g^T low;  dA = g_low^T dropout(x)
              dx = g W + g_low A  (one GEMM accumulating into the other; with dropout the
                   adapter's part is masked first)

computed in autocast's dtype when autocast is on (as F.linear would), the fp32 adapters' gradients
cast back. Dropout's noise is drawn by `dropout_noise` (nn.Dropout's draw on a GPU, a faster one on
a CPU); where the input is already in the compute dtype, the dropped copy PEFT keeps is rebuilt in
backward from the input, which the other readers of it keep anyway. (A boolean mask would keep a
byte instead of the noise's two, but rebuilding the noise from it costs two more passes a layer:
13 % slower.)
Anything else PEFT may be doing (adapters off or merged, several active adapters, DoRA and other
variants, mixed-adapter batches, a base layer that is not a plain frozen Linear, mixed dtypes
without autocast, ZeRO-3's partitioned weights) goes to PEFT's own forward.
"""

from __future__ import annotations

import torch


def dropout_noise(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's noise for `x`: 0 with probability p, else 1/(1-p), in x's dtype.

    On a GPU it is nn.Dropout's own draw. On a CPU, where `bernoulli_` draws one random number per
    element (a step of SmolLM2 LoRA spent about half its time there with dropout 0.05), each
    element reads 15 random bits of a 64-bit draw, four elements a draw: dropped when they are below
    round(p * 2**15), so p is taken to the nearest 1/32768 and the kept elements are scaled by
    1/(1 - that), which keeps the noise's mean exactly 1."""
    if x.device.type != "cpu":
        return torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    drop = min(round(p * 32768), 32767)
    n = x.numel()
    # random_() on int64 draws [0, 2**63): each int16 lane's low 15 bits are uniform
    lanes = torch.empty((n + 3) // 4, dtype=torch.int64).random_().view(torch.int16)[:n].view(x.shape)
    keep = lanes.bitwise_and_(0x7FFF) >= drop
    return torch.where(keep, torch.full((), 32768 / (32768 - drop), dtype=x.dtype), torch.zeros((), dtype=x.dtype))


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float, dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            xc, a = x2.to(dtype), lora_a.to(dtype)
            scaled_b = (lora_b * scaling).to(dtype)
            noise = dropout_noise(x2, p) if p > 0 else None
            xd = xc if noise is None else (x2 * noise).to(dtype)
            low = xd @ a.t()
            w = weight.to(dtype)
            out = xc @ w.t() if bias is None else torch.addmm(bias.to(dtype), xc, w.t())
            out.addmm_(low, scaled_b.t())
        # where the input is in the compute dtype its dropped copy is rebuilt in backward from it
        ctx.rebuild = noise is not None and x2.dtype == dtype
        keep_noise = ctx.rebuild or (noise is not None and ctx.needs_input_grad[0])
        ctx.save_for_backward(x2 if ctx.rebuild else xd, noise if keep_noise else None, w, a, scaled_b, low)
        ctx.scaling, ctx.x_shape, ctx.x_dtype = scaling, x.shape, x.dtype
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return out  # 2-D: shaped as the input outside (a view made here could not be modified in place)

    @staticmethod
    def backward(ctx, grad_out):
        saved, noise, w, a, scaled_b, low = ctx.saved_tensors
        grad_x = grad_a = grad_b = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1])
            grad_low = g @ scaled_b
            if ctx.needs_input_grad[0]:
                gx = g @ w
                if noise is None:
                    gx.addmm_(grad_low, a)  # the adapter's input gradient accumulated in the base's GEMM
                else:  # as autograd would: each part in the input's dtype, the adapter's masked
                    gx = gx.to(ctx.x_dtype) + (grad_low @ a).to(ctx.x_dtype).mul_(noise)
                grad_x = gx.to(ctx.x_dtype).view(ctx.x_shape)
            if ctx.needs_input_grad[3]:
                xd = saved * noise if ctx.rebuild else saved
                grad_a = (grad_low.t() @ xd).to(ctx.a_dtype)
            if ctx.needs_input_grad[4]:
                grad_b = (g.t() @ low).to(ctx.b_dtype) * ctx.scaling
        return grad_x, None, None, grad_a, grad_b, None, None, None


class _FusedForward:
    """A PEFT `lora.Linear`'s forward: one `_LoraLinear` where it computes the same sum, PEFT's
    own otherwise."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x, *args, **kwargs):
        layer = self.layer
        name = None if args or kwargs else self._plain_adapter(x)
        if name is None:
            return type(layer).forward(layer, x, *args, **kwargs)
        base, dropout = layer.base_layer, layer.lora_dropout[name]
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
        out = _LoraLinear.apply(x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                                float(layer.scaling[name]), p, dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _plain_adapter(self, x) -> str | None:
        """The one active vanilla adapter, or None where PEFT's forward must run."""
        layer = self.layer
        adapters = layer.active_adapters
        if layer.disable_adapters or layer.merged or len(adapters) != 1 or adapters[0] not in layer.lora_A \
                or adapters[0] in layer.lora_variant:
            return None
        name = adapters[0]
        base = layer.base_layer
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return None  # a trained base needs its own gradients
        dropout = layer.lora_dropout[name]
        if not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)) or x.dim() < 2:
            return None
        if getattr(dropout, "p", 0) >= 1:
            return None  # everything dropped: nn.Dropout's zeros, not a division by 1 - p
        weights = (base.weight, layer.lora_A[name].weight, layer.lora_B[name].weight)
        if any(hasattr(w, "ds_id") for w in weights):
            return None  # ZeRO-3 gathers a module's weights only when that module is called
        if not torch.is_autocast_enabled(x.device.type) and any(w.dtype != x.dtype for w in weights):
            return None  # PEFT's casts decide the dtypes
        return name


def fuse_lora_layers(model) -> int:
    """Give every plain LoRA Linear of `model` the fused forward (idempotent); how many now have it.
    Layers are left to PEFT where the fused sum would not be the same computation: a base that is
    not exactly `torch.nn.Linear` (bitsandbytes' 4-bit layers, convolutions), fan-in-fan-out
    weights, adapters with a bias."""
    from peft.tuners.lora import Linear as LoraLinear

    fused = 0
    for module in model.modules():
        if type(module) is not LoraLinear:
            continue
        if isinstance(vars(module).get("forward"), _FusedForward):
            fused += 1
            continue
        if "forward" in vars(module) or type(module.base_layer) is not torch.nn.Linear or module.fan_in_fan_out:
            continue
        if any(a.bias is not None for a in module.lora_A.values()) or any(b.bias is not None for b in module.lora_B.values()):
            continue
        module.forward = _FusedForward(module)
        fused += 1
    return fused
