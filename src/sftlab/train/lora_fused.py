"""LoRA layers with the adapter's product added inside the GEMM.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: on top of the two skinny
matmuls that is a full-size multiply and a full-size add in forward, and their gradients in
backward, for every adapted layer. Folding `scaling` into lora_B's (r x out) weight and adding
the adapter's product inside the GEMM (`addmm`, beta 1) leaves the two matmuls alone: the same
sum, rounded once instead of three times. Anything else PEFT may be doing (adapters off or
merged, several active adapters, DoRA and other variants, mixed-adapter batches, a base layer
that is not a plain Linear, mixed dtypes without autocast, ZeRO-3's partitioned weights) goes to
PEFT's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _FusedForward:
    """A PEFT `lora.Linear`'s forward: fused where it computes the same sum, PEFT's own otherwise."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x, *args, **kwargs):
        layer = self.layer
        name = None if args or kwargs else self._plain_adapter(x)
        if name is None:
            return type(layer).forward(layer, x, *args, **kwargs)
        base = layer.base_layer
        result = F.linear(x, base.weight, base.bias)
        low = F.linear(layer.lora_dropout[name](x), layer.lora_A[name].weight)
        scaled_b = layer.lora_B[name].weight * layer.scaling[name]
        out = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]), scaled_b.t())
        return out.view(result.shape)

    def _plain_adapter(self, x) -> str | None:
        """The one active vanilla adapter, or None where PEFT's forward must run."""
        layer = self.layer
        adapters = layer.active_adapters
        if layer.disable_adapters or layer.merged or len(adapters) != 1 or adapters[0] not in layer.lora_A \
                or adapters[0] in layer.lora_variant:
            return None
        weights = (layer.base_layer.weight, layer.lora_A[adapters[0]].weight, layer.lora_B[adapters[0]].weight)
        if any(hasattr(w, "ds_id") for w in weights):
            return None  # ZeRO-3 gathers a module's weights only when that module is called
        if not torch.is_autocast_enabled(x.device.type) and any(w.dtype != x.dtype for w in weights):
            return None  # PEFT's casts decide the dtypes
        return adapters[0]


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
