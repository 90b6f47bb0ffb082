"""Per-architecture glue of the GGUF export: what llama.cpp's `convert_hf_to_gguf.py` does for each
transformers model_type, as a table.

Each `Arch` says which llama.cpp architecture the model is written as and what differs from the
plain Llama-like layout `gguf.py` writes:

- `permute_qk`: llama.cpp's LLAMA stores q/k rows in interleaved rotary order (the converter's
  `LlamaModel.permute`); the others keep HF's half-split rows.
- `norm_shift`: added to every `*norm.weight`. Gemma 2/3 (`Gemma*RMSNorm`: `x * (1 + w)`) and
  Nemotron (`LayerNorm1P`) store w; llama.cpp multiplies by the stored tensor, so its converter
  writes w + 1 (and transformers' GGUF loader subtracts 1 again).
- `hparams`: writers of the keys only that architecture has (soft-capping, sliding window,
  local rope base, parallel residual, expert sizes, LFM2's convolution cache), each as the
  converter's `set_gguf_parameters`; a common key whose value differs (LFM2's per-layer KV heads,
  0 on its convolution layers) is returned to `write_hparams` instead.
- `squeeze`: tensors written without their size-1 dimensions, as llama.cpp reads them (LFM2's
  convolution kernels [hidden, 1, L] -> [hidden, L]; Qwen2-MoE's shared-expert gate [1, hidden]).
- `file_keys`: the keys llama.cpp reads and transformers' GGUF loader does not (it takes defaults),
  each with the config value it must hold; `verify_gguf` reads them back from the file, since the
  loaded-back model cannot show a wrong or missing one.
- `unread`: config fields transformers' GGUF loader does not take from the file (it uses its
  config class's default, or a default of its own, e.g. Qwen3-MoE's `norm_topk_prob`) or that
  llama.cpp fixes for the architecture. A model whose value differs could not be verified (or would
  run otherwise in llama.cpp), so it is refused before any work.

Mixtures of experts: transformers 5 keeps each layer's experts as stacked 3-D tensors,
`experts.gate_up_proj` [experts, 2 x ff, hidden] (gate rows first) and `experts.down_proj`
[experts, hidden, ff]; llama.cpp wants `ffn_gate_exps` / `ffn_up_exps` [experts, ff, hidden] and
`ffn_down_exps` as is (the converter's `Qwen2MoeModel.modify_tensors`). Routers
(`ffn_gate_inp*`) stay f32, as the converter keeps them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from sftlab.errors import SftlabError

# tensors llama.cpp's converter always writes f32 (besides 1-D ones): the MoE routers
F32_TENSORS = (".ffn_gate_inp.weight", ".ffn_gate_inp_shexp.weight")


def rotary_dims(config) -> int:
    """How many dimensions of each head rotate (StableLM's and Nemotron's partial rotary factor)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int((getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0) * head_dim)


def gemma2_hparams(writer, config) -> None:
    writer.add_add_space_prefix(False)  # the converter's set_vocab: Gemma's SentencePiece adds no leading space
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window)


def gemma3_hparams(writer, config) -> None:
    writer.add_add_space_prefix(False)
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window)
    writer.add_rope_freq_base_swa(config.rope_parameters["sliding_attention"]["rope_theta"])


def moe_hparams(writer, config) -> None:
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", None):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


def stablelm_hparams(writer, config) -> None:
    writer.add_parallel_residual(config.use_parallel_residual)


def nemotron_hparams(writer, config) -> dict:
    return {"add_layer_norm_eps": config.norm_eps}  # llama.cpp reads this one; transformers the RMS key


def lfm2_hparams(writer, config) -> dict:
    import torch
    from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP

    writer.add_shortconv_l_cache(config.conv_L_cache)
    with torch.device("meta"):  # the width the model has: transformers derives it from intermediate_size
        width = Lfm2MLP(config).w1.out_features
    return {"add_feed_forward_length": width,
            "add_head_count_kv": [0 if kind == "conv" else config.num_key_value_heads for kind in config.layer_types]}


@dataclass(frozen=True)
class Arch:
    """How one transformers model_type maps onto a llama.cpp architecture (see the module docstring)."""

    name: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False
    norm_shift: float = 0.0
    hparams: tuple[Callable, ...] = ()
    squeeze: tuple[str, ...] = ()  # GGUF names (suffixes)
    file_keys: tuple[tuple[str, str | Callable], ...] = ()  # (key, config path or function of the config)
    unread: tuple[str, ...] = ()  # dotted paths into the config, e.g. "rope_parameters.rope_theta"


GEMMA_UNREAD = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "layer_types")
MOE_UNREAD = ("moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers")

FINAL_SOFTCAP = ("{arch}.final_logit_softcapping", "final_logit_softcapping")
EXPERT_FF = ("{arch}.expert_feed_forward_length", "moe_intermediate_size")
ROPE_BASE = ("{arch}.rope.freq_base", "rope_parameters.rope_theta")
ROPE_DIMS = ("{arch}.rope.dimension_count", rotary_dims)
LOCAL_ROPE = "rope_parameters.sliding_attention.rope_theta"

ARCHS = {
    "llama": Arch("LLAMA", permute_qk=True),
    "mistral": Arch("LLAMA", permute_qk=True),  # llama.cpp's converter writes Mistral as llama
    "qwen2": Arch("QWEN2"),
    "qwen3": Arch("QWEN3"),
    "phi3": Arch("PHI3"),
    "gemma2": Arch("GEMMA2", norm_shift=1.0, hparams=(gemma2_hparams,), unread=GEMMA_UNREAD,
                   file_keys=(("{arch}.attn_logit_softcapping", "attn_logit_softcapping"), FINAL_SOFTCAP)),
    "gemma3_text": Arch("GEMMA3", norm_shift=1.0, hparams=(gemma3_hparams,), unread=(*GEMMA_UNREAD, LOCAL_ROPE),
                        file_keys=(FINAL_SOFTCAP, ("{arch}.rope.freq_base_swa", LOCAL_ROPE))),
    "qwen2_moe": Arch("QWEN2MOE", hparams=(moe_hparams,), squeeze=(".ffn_gate_inp_shexp.weight",),
                      unread=(*MOE_UNREAD, "shared_expert_intermediate_size"),
                      file_keys=(EXPERT_FF, ("{arch}.expert_shared_feed_forward_length",
                                             "shared_expert_intermediate_size"))),
    "qwen3_moe": Arch("QWEN3MOE", hparams=(moe_hparams,), unread=MOE_UNREAD, file_keys=(EXPERT_FF,)),
    "starcoder2": Arch("STARCODER2", unread=("rope_parameters.rope_theta", "sliding_window"), file_keys=(ROPE_BASE,)),
    "stablelm": Arch("STABLELM", hparams=(stablelm_hparams,),
                     unread=("rope_parameters.rope_theta", "rope_parameters.partial_rotary_factor", "qk_layernorm"),
                     file_keys=(ROPE_BASE, ROPE_DIMS, ("{arch}.use_parallel_residual", "use_parallel_residual"))),
    "nemotron": Arch("NEMOTRON", norm_shift=1.0, hparams=(nemotron_hparams,),
                     unread=("head_dim", "rope_parameters.partial_rotary_factor"),
                     file_keys=(ROPE_DIMS, ("{arch}.attention.layer_norm_epsilon", "norm_eps"))),
    "lfm2": Arch("LFM2", hparams=(lfm2_hparams,), squeeze=(".shortconv.conv.weight",)),
}
# Not listed, though gguf and transformers' GGUF loader both name them: Gemma 1, which the loader
# cannot read back; GPT-OSS, whose experts the loader reads into per-expert names its transformers 5
# model does not have.


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary rows -> llama.cpp's interleaved pairs (as convert_hf_to_gguf.py does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_value(config, path: str):
    value = config
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    return value


# what the file says of the model's shape, which defaults may derive from (Nemotron's head_dim, Gemma 3's layer_types)
SHAPE = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
         "vocab_size")


def reader_defaults(config):
    """The config transformers' GGUF loader builds where the file says nothing: the class defaults
    for this shape, with the loader's own defaults for the architecture on top."""
    from transformers import AutoConfig
    from transformers.integrations import GGUF_CONFIG_DEFAULTS_MAPPING

    shape = {k: getattr(config, k) for k in SHAPE if getattr(config, k, None) is not None}
    return AutoConfig.for_model(config.model_type, **shape, **GGUF_CONFIG_DEFAULTS_MAPPING.get(config.model_type, {}))


def check_readable(config) -> None:
    """Refuse a model with a value in one of its architecture's `unread` fields other than the one
    transformers' GGUF loader assumes: the file could not be verified."""
    arch = ARCHS[config.model_type]
    if not arch.unread:
        return
    defaults = reader_defaults(config)
    for path in arch.unread:
        have, assumed = config_value(config, path), config_value(defaults, path)
        if have != assumed:
            raise SftlabError(f"GGUF export of {config.model_type}: transformers' GGUF loader does not read {path} "
                              f"from the file (it assumes {assumed!r}), so this model's {have!r} could not be "
                              "verified; export --to merged and convert with llama.cpp's convert_hf_to_gguf.py")
    if arch.name.startswith("GEMMA") and config.query_pre_attn_scalar != config.head_dim:
        raise SftlabError(f"GGUF export of {config.model_type}: llama.cpp scales attention by 1/sqrt(head_dim "
                          f"{config.head_dim}), this model by 1/sqrt(query_pre_attn_scalar "
                          f"{config.query_pre_attn_scalar})")


def file_key_mismatches(arch: Arch, config, fields: dict, arch_name: str) -> list[str]:
    """`arch.file_keys` whose value in the file (FIELDS: key -> contents) is not the config's; None in
    the config means the key must be absent."""
    wrong = []
    for template, source in arch.file_keys:
        key = template.format(arch=arch_name)
        want = source(config) if callable(source) else config_value(config, source)
        have = fields.get(key)
        same = have is None if want is None else have is not None and bool(np.isclose(have, want, rtol=1e-6, atol=0))
        if not same:
            wrong.append(f"{key} {have!r} (model: {want!r})")
    return wrong


def gguf_tensors(arch: Arch, names, name: str, data: np.ndarray, config) -> Iterator[tuple[str, np.ndarray]]:
    """The GGUF tensors (name, data) for one tensor of the transformers state dict."""
    if arch.norm_shift and name.endswith("norm.weight"):
        data = data + np.float32(arch.norm_shift)
    if name.endswith(".experts.gate_up_proj"):
        ff = data.shape[1] // 2
        base = name.removesuffix("gate_up_proj")
        yield from gguf_tensors(arch, names, base + "gate_proj", data[:, :ff], config)
        yield from gguf_tensors(arch, names, base + "up_proj", data[:, ff:], config)
        return
    target = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if target is None:
        raise SftlabError(f"no GGUF tensor name for '{name}' ({config.model_type})")
    if not target.endswith((".weight", ".bias")):  # stacked experts: a parameter with no suffix
        target += ".weight"
    if target.endswith(arch.squeeze):
        data = data.reshape([n for n in data.shape if n != 1])
    if arch.permute_qk and name.endswith("q_proj.weight"):
        data = permute_rotary(data, config.num_attention_heads)
    elif arch.permute_qk and name.endswith("k_proj.weight"):
        data = permute_rotary(data, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    yield target, np.ascontiguousarray(data)
