"""Training memory estimate from a model's config alone (no weights are read).

The parameter count is exact: the model is instantiated on the meta device. Everything
else is a formula over the config, written out below so it can be checked by hand:

Fixed costs (do not grow with the batch), P = all parameters, N = trainable parameters:
- weights: P x 4 bytes (fp32), or 2 (``weights_dtype="bf16"``). QLoRA: the linear weights
  of the decoder layers in nf4, 0.5 byte each plus the quantisation state (one absmax per
  block of 64 weights: 4 bytes, or 1 byte + a second-level fp32 absmax per 256 blocks with
  double quantisation), the rest (embeddings, norms) in ``weights_dtype``.
- LoRA parameters: ``r x (in + out)`` per adapted linear layer (all linear layers except
  the output head by default, as PEFT's "all-linear"); always fp32.
- gradients: N x bytes of the trainable weights. Optimizer: AdamW keeps 2 states per
  trainable parameter in its dtype (8 bytes for fp32); ``adamw_8bit`` 2 bytes; SGD none.
- mixed precision (``dtype="bf16"`` on fp32 weights, i.e. autocast): the fp32 weights are
  the master copy and every linear weight (and a mixture of experts' routers, not its experts)
  gets a bf16 working copy that autograd keeps until the backward pass (2 bytes per weight;
  with gradient checkpointing only one layer's copies live at a time). The fp32 LoRA
  parameters get such copies whenever the compute is bf16, on a bf16 base too, except those
  of the stacked experts: PEFT folds them into the stacks outside autocast, in the stacks' dtype.
- LoRA on a mixture of experts' stacked expert tensors (all-linear): PEFT adds B x A to each
  stack at every forward (a parametrization), and the expert matmuls keep the merged stack
  for the backward pass: one more copy of the expert weights in their dtype (one layer's
  with gradient checkpointing). Tiny Qwen3-MoE and Mixtral: 1.9-2.8 x the per-layer bytes
  counted without it (tests/integration/test_estimate_moe_lora.py).
- runtime: the process itself, as `sftlab train` holds it when it starts loading the model
  (Python, torch, transformers, peft, datasets, accelerate and the deepspeed it imports, the
  tokenizer and the tokenized data): 0.62-0.66 GiB RSS measured on CPU, about half of it
  library code (bench/README.md, "Does the estimate hold?"); the CUDA context on a GPU is of
  the same order.
- caches (CPU): what a CPU run holds beyond its live tensors, 0.15 GiB. oneDNN keeps a kernel
  for every matmul shape it has run (SmolLM2 LoRA: tcmalloc's allocated bytes between steps
  grow 0.08-0.11 GiB over the first steps, then stay: the widths come from a fixed set,
  data/pack.py `shape_bucket`), and at a step's highest allocation the allocator keeps
  0.07-0.10 GiB of free spans mapped around it (bench/README.md, "Does the estimate hold?").
  Not counted on a GPU (not measured there).

Per-token costs (grow with batch x seq_len). Activations saved for the backward pass of
one Llama-style decoder layer (RMSNorm, attention with SDPA, gated MLP), per token, with
h = hidden, i = intermediate, q = query width (heads x head_dim), kv = key/value width,
H = attention heads; ``a`` = bytes of the compute dtype (4 fp32, 2 bf16), ``s`` = bytes of
the residual stream (the weights' dtype):
- RMSNorms, read off the model (`_norms`), each over a width w: of the hidden state (w = h), two
  before attention and MLP (Llama), two after them (OLMo2) or four, before and after (Gemma 2
  and 3); of the queries and keys (q_norm, k_norm: Qwen3, OLMo2, Gemma 3, ...; w = q, kv), with
  1/rms per head where the weight is one head wide. Each keeps its input in fp32 (w x 4), 1/rms
  (4 per group), and when its weight trains (full fine-tuning) the normalised input: w x the
  input's bytes where it casts that back before multiplying the weight (Llama, Qwen3), w x 4
  where it multiplies in fp32 and casts after (Gemma, OLMo2). The input of a norm before
  attention or MLP is the residual stream (s bytes), of one after them or of a q/k norm a
  linear layer's output (a bytes). Compiled (training.compile_norms): its input as it comes
  (w x its bytes) and 1/rms only. (Gemma's eager norms also keep 1 + weight in fp32, w x 4
  bytes a layer, not a token's: not counted);
- attention: rotated q (q x a), k and v (2kv x a), the output (q x a), log-sum-exp (H x 4;
  on a CPU, sftlab_varlen's groups of short examples keep none: a bound there);
- inputs of the linear layers: in fp32 the norm outputs are shared (2h + i) x a; under
  autocast every reader of an fp32 input keeps its own copy: sum of the in-features of the
  linear layers reading it (q, k, v, gate, up: 5h for full fine-tuning; a mixture of
  experts' router too, a module of its own that calls F.linear);
- gated MLP: gate, up and act(gate) outputs (3i x a);
- mixture of experts (k of n experts per token, i = k x the expert width): the router's fp32
  probabilities (n x 4) and per copy its expert indices and weights (k x 40); the gated MLP's
  terms and the down projection's input (4i), each copy's input and output (2kh).
  transformers runs the stacked experts through grouped_mm (its default, which sftlab keeps),
  which autocast does not cover: they compute in the weights' dtype (s bytes, not a; on a tiny
  Mixtral with fp32 weights under autocast, 5,645 B per token and layer, 3,672 counted in a);
- LoRA (as sftlab trains: fused layers, no fp32 round trip of the input under autocast):
  the rank-r output of each lora_A (r x a), and the inputs lora_A's weight gradient needs:
  one copy per reader of an fp32 input under autocast, one shared copy of an input already
  in the compute dtype (`_lora_inputs`); with dropout > 0 each adapted layer also keeps its
  dropout noise (in x the input's bytes; QLoRA's PEFT layers also their own dropped input);
- QLoRA: as LoRA, but bitsandbytes' 4-bit layers return the input's dtype, so under
  autocast the MLP outputs stay fp32 (3i x 4), and so do the inputs of the norms that read a
  linear layer's output.
Checked term by term against the tensors autograd saves (tests/integration). With
gradient checkpointing only each layer's input is kept (h x s per layer) and one layer's
activations are rebuilt at a time during the backward pass.

Logits: a plain HF forward materialises seq x vocab logits for every position, upcasts
them to fp32 and keeps the log-softmax for the backward pass; at the peak of the backward
pass three fp32 tokens x vocab tensors are alive (log-softmax, its gradient, the logits'
gradient), plus the bf16 logits under autocast: (12 + 2) bytes x tokens x vocab.
sftlab's loss (train/loss.py) runs the head only on trained positions (K =
``trained_fraction`` of the tokens): the saved fp32 log-softmax (4 B) and the logits or
their gradient in the compute dtype (2a B) per trained position and vocab entry, plus one
fp32 cross-entropy chunk of ``loss_chunk`` rows and its gradient (8 B x chunk x vocab).
Where the head is fused with the loss (plain-head architectures in one process), no logits
of all trained positions exist: the head's input rows and their gradient (2a B x hidden per
trained position), one chunk of fp32 logits and its log-probabilities (8 B x chunk x vocab;
train/loss.py `ce_chunk`: 128 rows on a CPU with a frozen head, else 512), the head's weight
cast to the compute dtype, and with full fine-tuning its fp32 gradient.

When they are alive: the peak of a step is at the end of its forward pass (every activation
and the loss's chunk alive) or at the end of its backward pass (every gradient, the
activations freed). One process without gradient accumulation frees the gradients after each
optimizer step (zero_grad sets them to None), so the total counts the larger of gradients and
activations + logits; with accumulation, or DDP's buckets, the gradients stay through the
forward passes and both count. (SmolLM2 full fine-tuning, 2 x 512 on a CPU: tcmalloc's
allocated bytes peak at 2.87 GiB inside the loss's forward, 0.5 GiB under the sum.)

Several processes (``nproc``, ``distributed``), per process, n = nproc (docs/scaling.md):
- ddp: everything replicated; DDP's all-reduce buckets hold a second copy of the gradients.
- zero2 (DeepSpeed): weights replicated; gradients, optimizer states and DeepSpeed's fp32
  master copy of the trainable parameters (4 B each) split n ways.
- zero3: weights too split n ways, plus the parameters gathered for compute. DeepSpeed keeps
  a gathered parameter until `stage3_max_live_parameters` are live when it is used again
  within `stage3_max_reuse_distance` (both 1e9 in configs/zero3.json, as in the DeepSpeed
  and transformers examples): up to min(all parameters, 1e9) stay gathered.
- fsdp (FSDP2): weights, gradients and optimizer states split n ways, no master copy (the
  optimizer steps the sharded parameters themselves); gathered: the larger of two decoder
  layers (the one computing and the one prefetched) and the root unit outside the decoder
  stack (embeddings, final norm, head), which FSDP2 keeps gathered between forward and backward.
- ``_offload`` variants: optimizer states and master copy (zero2_offload), and the sharded
  weights too (zero3_offload), move to CPU memory: reported as ``offloaded``, not in the
  device total (on a CPU-only machine both are the same RAM).
Activations and logits are per process: each process computes its own micro-batch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

from sftlab.errors import SftlabError

Method = Literal["full", "lora", "qlora"]
GiB = 1024**3
_OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2, "sgd": 0}  # per fp32 trainable parameter
ENGINES = ("none", "ddp", "zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp")
ZERO3_MAX_LIVE_PARAMETERS = 10**9  # stage3_max_live_parameters in configs/zero3.json
RUNTIME_BYTES = int(0.65 * GiB)  # RSS of `sftlab train` before it loads the model (CPU)
CPU_CACHES_BYTES = int(0.15 * GiB)  # oneDNN's kernels for the step's shapes + the allocator's free spans at the peak
NF4_BLOCK = 64


class Norm(NamedTuple):
    """A normalisation layer (RMSNorm) of a decoder layer, as the activation formula counts it."""

    width: int
    groups: int  # normalised apart: the heads, where its weight is one head wide (Qwen3's and Gemma 3's q/k norms)
    reads_output: bool  # a linear layer's output (q/k norms, Gemma's and OLMo2's norms after attention and MLP), not the stream
    fp32_product: bool  # (x x weight) in fp32, cast after (Gemma, OLMo2); Llama casts x to the input's dtype first


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model, read from its config and a meta-device instance."""

    n_params: int
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    kv_width: int
    q_width: int  # heads x head_dim: the hidden size, or not (Qwen3-0.6B: 2048 on a hidden size of 1024)
    vocab: int
    decoder_linear_params: int  # weights of nn.Linear layers outside the output head
    decoder_linear_weights: int  # same, weights only (what nf4 quantises)
    layer_linears: tuple[tuple[str, int, int], ...]  # (name, in, out) of one decoder layer (with experts, in a MoE)
    layer_params: int  # all parameters of one decoder layer (with experts, in a MoE)
    lora_candidates: tuple[tuple[str, int, int], ...]  # every linear except the output head
    architecture: str = ""
    frozen_params: int = 0  # a multimodal model's vision (audio) towers and projectors: in memory, never trained
    # parameters of the language model that the model itself creates with requires_grad=False (HRM's z_L_init):
    # full fine-tuning leaves them out too, as the trained model's trainable count does
    untrained_params: int = 0
    fused_head: bool = False  # the loss fuses lm_head and cross-entropy (train/loss.py fused_head)
    norms: tuple[Norm, ...] = ()  # of one decoder layer
    # mixture of experts: experts held as 3-D tensors (not linear layers), k of them run per token
    n_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    expert_params: int = 0  # all layers' expert tensors
    router_weights: int = 0  # all layers' routers that are not linear layers (TopKRouter: F.linear on its own weight)
    # LoRA parameters per unit of rank that all-linear adds beyond the linear layers (the router and
    # the stacked expert tensors, which PEFT wraps too): read off PEFT itself (`_all_linear_lora`)
    moe_lora_per_rank: int = 0
    expert_lora_per_rank: int = 0  # of which on the stacked expert tensors
    # a linear layer PEFT refuses to adapt, and its reason (out_proj on Mamba-type models: Mamba-2, Falcon-H1,
    # Nemotron-H): LoRA targets picking it are refused as `sftlab train` refuses them
    lora_refused: tuple[str, str] = ()
    # a mixture of experts' layers without experts (DeepSeek's and GLM-4.5's first_k_dense_replace, Qwen-MoE's
    # mlp_only_layers and decoder_sparse_step): how many, one's linear layers and its parameters
    dense_layers: int = 0
    dense_linears: tuple[tuple[str, int, int], ...] = ()
    dense_params: int = 0

    def layer_kinds(self) -> list[tuple[int, ModelShape]]:
        """(how many, a shape whose layer_* fields and experts are theirs) for each kind of decoder layer."""
        if not self.dense_layers:
            return [(self.n_layers, self)]
        dense = replace(self, layer_linears=self.dense_linears, layer_params=self.dense_params, n_experts=0,
                        experts_per_token=0, expert_intermediate=0, router_weights=0, dense_layers=0,
                        dense_linears=(), dense_params=0)
        return [(self.n_layers - self.dense_layers, self), (self.dense_layers, dense)]


def load_model_config(model: Any):
    """A transformers config from a config object, a folder, a .gguf, a run dir, or an id."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    from sftlab.models import is_run_dir, resolve_model_path, run_artifacts

    name = str(model)
    if is_run_dir(name):
        art = run_artifacts(name)
        name = art["model"] or art["base"]
    path, gguf = resolve_model_path(name)
    try:
        # With gguf_file, transformers reads the GGUF metadata only, not the tensors.
        config = AutoConfig.from_pretrained(path, gguf_file=gguf, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise SftlabError(f"could not read the config of '{model}': {str(e).splitlines()[0]}") from e
    if not gguf:
        _refuse_default_shapes(config, Path(path) / "config.json")
    return config


# The sizes an estimate stands on; a config.json without them is read with the class's defaults
# (Llama's are Llama 2 7B's), which would estimate another model.
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "vocab_size")
# what a config.json gives instead, where the config derives the size from it (LongCat-Flash: num_hidden_layers is
# 2 x num_layers, each of its layers two attention and MLP blocks)
SHAPE_ALIASES = {"num_hidden_layers": ("num_layers", "layers_block_type")}  # Nemotron-H: one type per layer


def _refuse_default_shapes(config, config_file: Path) -> None:
    if not config_file.exists():  # a hub id from the cache: its own complete config
        return
    import json

    given = json.loads(config_file.read_text())
    given |= given.get("text_config") or {}
    names = getattr(config, "attribute_map", {}) | getattr(config.get_text_config(), "attribute_map", {})
    missing = [k for k in SHAPE_KEYS if k not in given and names.get(k) not in given
               and not any(alias in given for alias in SHAPE_ALIASES.get(k, ()))]
    if missing:
        raise SftlabError(f"{config_file} does not give {', '.join(missing)}: the estimate would use "
                          f"{type(config).__name__}'s defaults, another model's sizes")


def model_shape(config) -> ModelShape:
    """Instantiate the model on the meta device (no memory, no weights) and measure it."""
    import torch

    from sftlab.models import (in_parts, lora_exclude_modules, missing_library, model_auto_class,
                               outside_language_model, text_refusal)
    from sftlab.train.loss import fused_head

    auto = model_auto_class(config)  # as sftlab train loads it: a vision-language model by AutoModelForImageTextToText
    try:
        with torch.device("meta"):
            model = auto.from_config(config)
    except ImportError as e:  # a part of the model needs a library (Gemma 3n's vision tower: timm)
        raise missing_library(getattr(config, "model_type", "?"), e) from None
    except (ValueError, KeyError) as e:  # the first line: the rest lists every class transformers knows
        reason = str(e).split(" Model type should be one of")[0].strip().splitlines()[0]
        raise SftlabError(f"cannot build a causal LM ({auto.__name__}) from this "
                          f"'{getattr(config, 'model_type', '?')}' config: {reason}") from e
    if refusal := text_refusal(model):
        raise SftlabError(refusal)
    text = getattr(config, "get_text_config", lambda: config)()
    h = text.hidden_size
    n_heads = _widest(text, "num_attention_heads")
    if not n_heads:  # Mamba and other state-space models: no attention layers for the formulas below to count
        raise SftlabError(f"cannot estimate {type(model).__name__} ('{config.model_type}'): its config gives no "
                          "num_attention_heads, and the activation formulas are those of attention layers; "
                          "train a few steps (training.max_steps) with a small batch and watch the memory instead")
    head_dim = _widest(text, "head_dim") or h // n_heads
    n_kv = _widest(text, "num_key_value_heads") or n_heads
    # the MLP width by its names: most models, OPT, GPT-2/GPT-J/CodeGen (None: 4h), Falcon
    intermediate = next((width for key in ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
                         if (width := _widest(text, key))), 4 * h)
    if isinstance(intermediate, (list, tuple)):  # one width per layer (Gemma 3n): the widest
        intermediate = max(intermediate)
    # a multimodal model's vision (audio) towers and projectors: weights that text never runs, frozen in full
    # fine-tuning and without adapters (train/trainer.py lora_exclusions); the formulas are the language model's
    outside = outside_language_model(model)
    candidates = tuple(c for c in linear_layers(model) if not in_parts(c[0], outside))
    unwrappable = [n for n in unwrappable_linears(model) if not in_parts(n, outside)]
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    frozen = sum(p.numel() for n, p in params.items() if in_parts(n, outside))
    params = {n: p for n, p in params.items() if not in_parts(n, outside)}
    untrained = sum(p.numel() for p in params.values() if not p.requires_grad)
    layers = _decoder_layers([n for n, _, _ in candidates], params)
    q_width, kv_width = n_heads * head_dim, n_kv * head_dim
    stacked = _stacked_experts(modules, params)
    sparse = [p for p in layers if any(n.startswith(p) for n in stacked)]
    # a mixture of experts' layers without experts (first_k_dense_replace, mlp_only_layers, decoder_sparse_step)
    dense = [p for p in layers if p not in sparse] if sparse else []
    layer_linears, layer_params = _layer((sparse or layers)[0], candidates, params)
    dense_linears, dense_params = _layer(dense[0], candidates, params) if dense else ((), 0)
    experts = list(stacked.values())
    n_params = sum(p.numel() for p in model.parameters())
    norms = _norms(model, modules, layers[0], {"q": q_width, "k": kv_width})  # before PEFT wraps the MoE's layers
    exclude = lora_exclude_modules(outside, unwrappable)
    lora_fields, left_out, refused = _all_linear_lora(model, candidates, exclude)  # PEFT wraps the model: last
    moe = {**_experts(text, experts), "router_weights": _router_weights(modules, sparse, candidates),
           **lora_fields} if experts else {}
    return ModelShape(
        n_params=n_params,
        n_layers=text.num_hidden_layers,
        hidden=h,
        intermediate=intermediate,
        n_heads=n_heads,
        kv_width=kv_width,
        q_width=q_width,
        vocab=text.vocab_size,
        decoder_linear_params=sum(p.numel() for n, _, _ in candidates for p in modules[n].parameters()),
        decoder_linear_weights=sum(fin * fout for _, fin, fout in candidates),
        layer_linears=layer_linears,
        layer_params=layer_params,
        dense_layers=len(dense),
        dense_linears=dense_linears,
        dense_params=dense_params,
        lora_candidates=tuple(c for c in candidates if c[0] not in left_out),
        architecture=type(model).__name__,
        frozen_params=frozen,
        untrained_params=untrained,
        fused_head=fused_head(model) is not None,
        norms=norms,
        lora_refused=refused,
        **moe,
    )


def _widest(text, key: str):
    """config.<key> (None if absent), or, where it varies per layer (a config with per_layer_config: Gemma 4's
    global layers have head_dim 512, and reading config.head_dim raised transformers'
    AmbiguousGlobalPerLayerAttributeError, a traceback through `sftlab estimate`), its largest value."""
    if key in (getattr(text, "per_layer_attributes", None) or ()):
        values = [v for layer in text.per_layer_config if (v := getattr(layer, key, None)) is not None]
        if values and all(isinstance(v, (int, float)) for v in values):
            return max(values)
        if values:
            return values[0]
    return getattr(text, key, None)


def linear_layers(model) -> list[tuple[str, int, int]]:
    """(name, in, out) of each linear layer of `model` but the output head: nn.Linear, and the Conv1D of
    GPT-2-style models (weight in x out), which PEFT's all-linear and bitsandbytes treat as linear too."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return [(n, m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else (n, *m.weight.shape)
            for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head]


def language_model_linears(model) -> list[tuple[str, int, int]]:
    """`linear_layers` of the language model alone (not a multimodal model's towers: `outside_language_model`),
    named as in the base model, without the layers PEFT adds (base_layer, lora_*) when `model` is a PEFT model."""
    from sftlab.models import in_parts, outside_language_model

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    outside = outside_language_model(base)
    return [layer for layer in linear_layers(base) if not in_parts(layer[0], outside)
            and not any(p == "base_layer" or p.startswith("lora_") for p in layer[0].split("."))]


def unwrappable_linears(model) -> list[str]:
    """The linear layers PEFT's LoRA cannot wrap: those whose own forward returns more than a tensor (PhiMoE's
    and Llama 4's routers return their logits with the routing weights), or that is no map of the last dimension
    from in_features to out_features, the form PEFT adds its x @ A @ B to (DeepSeek-V4's grouped o_a_proj reads
    [..., groups, in_features]: the first LoRA step was a RuntimeError traceback). all-linear picks them, and the
    LoRA layer then fails at the first forward. Each linear layer whose class overrides forward is called on one
    row of zeros, as [1, in] and as [1, 1, in] (on the meta device for a meta model), in eval mode (no router
    jitter)."""
    import torch

    found = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or type(m).forward is torch.nn.Linear.forward:
            continue
        training, outs = m.training, []
        for shape in ((1, m.in_features), (1, 1, m.in_features)):
            try:
                with torch.no_grad():
                    outs.append(m.eval()(torch.zeros(*shape, dtype=m.weight.dtype, device=m.weight.device)))
            except Exception:  # noqa: BLE001
                pass
            finally:
                m.train(training)
        if not outs:  # takes no input of in_features; a quantised weight this probe cannot call: left to PEFT
            if m.weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
                found.append(name)
        elif not all(isinstance(out, torch.Tensor) and out.shape[-1] == m.out_features for out in outs):
            found.append(name)
    return found


def _stacked_experts(modules: dict, params: dict) -> dict:
    """A mixture of experts' stacked expert tensors: the 3-D parameters, but those of convolutions (the
    depthwise conv1d of Mamba, LFM2, Qwen3-Next's linear attention, ...), which made hybrids pass for MoEs."""
    import torch

    conv = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return {n: t for n, t in params.items() if t.dim() == 3 and not isinstance(modules[n.rpartition(".")[0]], conv)}


def _experts(text, experts) -> dict[str, int]:
    """ModelShape's MoE fields from the config and the stacked expert tensors (experts x out x in)."""
    n = experts[0].shape[0]
    k = _widest(text, "num_experts_per_tok") or _widest(text, "moe_topk") or 1
    width = _widest(text, "moe_intermediate_size") or _widest(text, "intermediate_size") or min(experts[0].shape[1:])
    return dict(n_experts=n, experts_per_token=k, expert_intermediate=width, expert_params=sum(p.numel() for p in experts))


def _router_weights(modules: dict, layers: list[str], candidates) -> int:
    """Weights of the modules in `layers` that hold a 2-D weight but are no linear layer: a mixture of
    experts' routers (TopKRouter), which read the hidden state through F.linear as a linear layer would."""
    linear = {n for n, _, _ in candidates}
    return sum(m.weight.numel() for n, m in modules.items() if n.startswith(tuple(layers)) and n not in linear
               and getattr(m, "weight", None) is not None and m.weight.dim() == 2)


PEFT_REFUSED = re.compile(r"Module '([\w.]+)' is incompatible")  # PEFT refusing a layer: out_proj on Mamba-type models


def written_targets(targets) -> str:
    """lora.target_modules as a config writes it."""
    return f"'{targets}'" if isinstance(targets, str) else f"[{', '.join(targets)}]"


def incompatible_target_message(architecture: str, layer_names, targets, refused: str, reason: str) -> str:
    """PEFT refused a layer lora.target_modules picks (`PEFT_REFUSED` in its `reason`): name the others of
    `layer_names` (the linear layers' last name parts) to write instead; `sftlab train` and `sftlab estimate`
    refuse with it."""
    names = [n for n in layer_names if n != refused]
    return (f"lora.target_modules: {written_targets(targets)} picks '{refused}', which PEFT cannot adapt on "
            f"{architecture} ({reason.splitlines()[0].split('] ', 1)[-1]}); name the layers to adapt "
            f"without it: lora.target_modules=[{','.join(names)}]")


def _all_linear_lora(model, candidates, exclude: list[str] | str) -> tuple[dict[str, int], set[str], tuple]:
    """PEFT's all-linear itself at rank 1 on the meta-device model, as sftlab train applies it (without the
    linear layers in `exclude`: those it cannot wrap, a multimodal model's vision tower): the LoRA parameters per
    unit of rank it adds beyond the linear layers (a mixture of experts' routers and stacked expert tensors, in
    PEFT's own layout), of them those on the stacked experts, the linear layers it leaves out, and (name, PEFT's
    reason) where PEFT refuses a layer all-linear picks, else (). On the models PEFT maps from their transformers 4
    names (Qwen3-MoE, DeepSeek-V3, GLM-4.5, Qwen3-Next, ...) every gate_proj/up_proj/down_proj is taken for the
    experts', so the dense layers' and shared experts' get no adapter."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import ParamWrapper

    from sftlab.models import quiet_fused_expert_pattern_warnings

    quiet_fused_expert_pattern_warnings()
    try:
        adapted = get_peft_model(model, LoraConfig(r=1, target_modules="all-linear", exclude_modules=exclude or None))
    except ValueError as e:  # PEFT refuses a layer all-linear picks (out_proj on Mamba-type models)
        refused = PEFT_REFUSED.search(str(e))
        return {}, set(exclude) if isinstance(exclude, list) else set(), (refused[1], str(e)) if refused else ()
    total = sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n)
    # a ParamWrapper adapts one parameter (those of one module nest): its own lora_A and lora_B
    stacks = sum(p.numel() for m in adapted.modules() if isinstance(m, ParamWrapper) and m.get_param().dim() == 3
                 for p in [*m.lora_A.parameters(), *m.lora_B.parameters()])
    wrapped = {n.removeprefix("base_model.model.") for n, m in adapted.named_modules() if hasattr(m, "lora_A")}
    linear = sum(fin + fout for name, fin, fout in candidates if name in wrapped)
    return ({"moe_lora_per_rank": total - linear, "expert_lora_per_rank": stacks},
            {name for name, _, _ in candidates if name not in wrapped}, ())


def _norms(model, modules: dict, prefix: str, widths: dict[str, int]) -> tuple[Norm, ...]:
    """The norms of the decoder layer `prefix` (modules of a ...Norm class with a weight): over the hidden
    state (Llama: two before attention and MLP; OLMo2: two after them; Gemma 2 and 3: four, before and
    after), and over the queries and keys (q_norm, k_norm, query_layernorm, ...: a linear layer's output),
    per head where the weight is one head wide (Qwen3, Gemma 3), over the whole width where it is that
    wide (OLMo2). Read off the meta-device model: a forward pass to the end of the layer tells which
    norms read a linear layer's output; each norm on a bf16 input, in which dtype it multiplies its weight."""
    import copy

    import torch

    layer = {n[len(prefix):]: m for n, m in modules.items() if n.startswith(prefix)}
    norms = {n: m for n, m in layer.items() if "norm" in type(m).__name__.lower()
             and isinstance(getattr(m, "weight", None), torch.nn.Parameter) and m.weight.dim() == 1}
    outputs, post = [], set()  # the linear layers' outputs, held: an id() of a freed one may come again

    def stop(*_):  # the forward pass ends with the layer
        raise StopIteration

    hooks = [m.register_forward_hook(lambda _, __, out: outputs.append(out))
             for m in layer.values() if isinstance(m, torch.nn.Linear)]
    hooks += [m.register_forward_pre_hook(
        lambda _, args, n=n: post.update([n] if any(args[0] is o for o in outputs) else [])) for n, m in norms.items()]
    hooks.append(modules[prefix[:-1]].register_forward_hook(stop))
    try:  # with the cache (the default) transformers looks for packed sequences in no meta tensor
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta"))
    except Exception:  # noqa: BLE001  the stop, or a meta forward that fails (a MoE's grouped_mm)
        pass  # the norms not reached read the stream
    finally:
        for hook in hooks:
            hook.remove()
    found = []
    for name, m in norms.items():
        qk = re.fullmatch(r"(q|k)(?:uery|ey)?_(?:layer)?norm", name.rpartition(".")[2])
        width = widths[qk.group(1)] if qk else m.weight.numel()
        norm, x = copy.deepcopy(m).float(), torch.empty(1, m.weight.numel(), dtype=torch.bfloat16, device="meta")
        try:
            probe = norm(x)
        except (TypeError, AttributeError):  # a gated norm, norm(x) x silu(gate) (Qwen3-Next's linear attention;
            probe = norm(x, x)  # Kimi-Linear's and Lara's take gate=None and fail on None.to: a traceback)
        found.append(Norm(width, width // m.weight.numel(), bool(qk) or name in post, probe.dtype == torch.bfloat16))
    return tuple(found)


def _decoder_layers(linear_names: list[str], params: dict) -> list[str]:
    """The decoder layers' name prefixes ('model.layers.0.', 'model.layers.1.', ...), in order."""
    for n in linear_names:
        m = re.search(r"^(.*?\.)0\.", n)
        if m:
            stack = re.compile(re.escape(m.group(1)) + r"\d+\.")
            return list(dict.fromkeys(s.group(0) for p in params if (s := stack.match(p))))
    raise SftlabError("no repeated decoder layers (…layers.0.…) found: not a decoder-only transformer")


def _layer(prefix: str, linears, params: dict) -> tuple[tuple[tuple[str, int, int], ...], int]:
    """One decoder layer's linear layers (named within the layer) and its parameter count."""
    return (tuple((n[len(prefix):], fin, fout) for n, fin, fout in linears if n.startswith(prefix)),
            sum(p.numel() for n, p in params.items() if n.startswith(prefix)))


def _targets(candidates, target_modules: str | list[str]) -> list[tuple[str, int, int]]:
    """PEFT's matching: 'all-linear', or a module whose name equals or ends with '.<target>'."""
    if target_modules == "all-linear":
        return list(candidates)
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    chosen = [c for c in candidates if any(c[0] == t or c[0].endswith("." + t) for t in wanted)]
    if not chosen:
        names = sorted({c[0].rsplit(".", 1)[-1] for c in candidates})
        raise SftlabError(f"LoRA target modules {wanted} match no linear layer of this model; its linear layers are "
                          f"{', '.join(names)} (or all-linear)")
    return chosen


@dataclass
class Estimate:
    """Peak training memory in bytes, by component, for one device/process."""

    weights: int
    weight_copies: int
    lora_params: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    runtime: int
    # context
    n_params: int
    trainable_params: int
    method: str
    batch: int
    seq_len: int
    gathered: int = 0  # ZeRO-3 / FSDP: parameters gathered from the other processes for compute
    offloaded: int = 0  # in CPU memory instead of the device (DeepSpeed offload); not in `total`
    dtype: str = "fp32"
    processes: int = 1
    engine: str = "none"
    per_row: int = 0  # bytes added by each extra row of the batch
    logits_full: int = 0  # what a plain HF forward would need for the logits instead
    notes: dict[str, str] = field(default_factory=dict)
    rebuild: Callable[[int], Estimate] | None = field(default=None, repr=False, compare=False)  # same setup, another batch
    # one process without gradient accumulation: the gradients are freed after each optimizer step
    # (zero_grad sets them to None), so they do not coexist with the next forward's activations
    gradients_freed: bool = False
    caches: int = 0  # CPU: kernel caches and the allocator's free spans (module docstring)

    COMPONENTS = ("weights", "gathered", "weight_copies", "lora_params", "gradients", "optimizer", "activations", "logits",
                  "runtime", "caches")

    @property
    def total(self) -> int:
        total = sum(getattr(self, c) for c in self.COMPONENTS)
        if self.gradients_freed:  # the peak is the end of the forward pass or the end of the backward pass
            total -= min(self.gradients, self.activations + self.logits)
        return total

    def max_batch(self, memory: int) -> int:
        """Largest batch (rows of seq_len tokens) whose estimate fits in `memory` bytes; 0 if none."""
        total = (lambda b: self.rebuild(b).total) if self.rebuild else (lambda b: self.total + (b - self.batch) * self.per_row)
        if total(1) > memory:
            return 0
        lo, hi = 1, 2
        while total(hi) <= memory:  # memory grows at least linearly with the batch
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if total(mid) <= memory else (lo, mid)
        return lo

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rebuild"}
        d["total"] = self.total
        return d

    def table(self, memory: int | None = None):
        """A rich Table of the components (GiB) and what each one counts."""
        from rich.table import Table

        per = f", per process of {self.processes} ({self.engine})" if self.engine != "none" else ""
        t = Table(title=f"{self.method} fine-tuning ({self.dtype}), batch {self.batch} x {self.seq_len} tokens{per}")
        t.add_column("component")
        t.add_column("GiB", justify="right")
        t.add_column("what it counts")
        labels = {
            "weights": "weights",
            "gathered": "gathered for compute",
            "weight_copies": "weight copies",
            "lora_params": "LoRA parameters",
            "gradients": "gradients",
            "optimizer": "optimizer states",
            "activations": "activations",
            "logits": "logits (loss)",
            "runtime": "runtime",
            "caches": "kernel caches, allocator",
        }
        for c in self.COMPONENTS:
            value = getattr(self, c)
            if value or c in ("weights", "activations", "logits"):
                t.add_row(labels[c], _gib(value), self.notes.get(c, ""))
        t.add_section()
        t.add_row("total", _gib(self.total), f"{self.n_params:,} parameters, {self.trainable_params:,} trainable")
        if self.offloaded:
            t.add_row("offloaded to CPU", _gib(self.offloaded), self.notes.get("offloaded", ""))
        if memory is not None:
            t.add_row("largest batch", str(self.max_batch(memory)), f"rows of {self.seq_len} tokens in {_gib(memory)} GiB")
        return t


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def activation_bytes_per_token(
    shape: ModelShape,
    *,
    method: Method,
    compute_bytes: int,
    stream_bytes: int,
    lora_targets: list[tuple[str, int, int]],
    lora_r: int,
    lora_dropout: float,
    varlen: bool = True,
    compiled_norms: bool = False,
) -> int:
    """Bytes autograd keeps per token for ONE decoder layer (see the module docstring).

    `varlen`: sftlab's per-example attention (train/attention.py), whose concatenated output
    is one more copy than SDPA's where the output projection keeps its input (full fine-tuning).
    `compiled_norms`: RMSNorm compiled by inductor (train/compiled_norms.py)."""
    h, i, a, q = shape.hidden, shape.intermediate, compute_bytes, shape.q_width
    autocast = compute_bytes < stream_bytes
    full = method == "full"
    # what the linear layers return: bitsandbytes' 4-bit ones the dtype of their input (the stream's)
    out = stream_bytes if method == "qlora" else a
    mlp_bytes, moe = out, 0
    if shape.experts_per_token:  # each token runs k experts' gated MLPs on its own gathered copy
        i = shape.experts_per_token * shape.expert_intermediate
        mlp_bytes = stream_bytes  # grouped_mm: the weights' dtype, autocast or not
        # the router's fp32 probabilities; per copy its expert index in 4 orders (int64) and its routing weight
        # and normalised weight (fp32), its input and output; the product the down projection reads
        moe = shape.n_experts * 4 + shape.experts_per_token * (40 + 2 * h * mlp_bytes) + i * mlp_bytes
    norms = sum(_norm_bytes(n, out if n.reads_output else stream_bytes, full, compiled_norms) for n in shape.norms)
    attention = (2 * q + shape.kv_width) * a + shape.kv_width * a + shape.n_heads * 4 + (q * a if varlen and full else 0)
    mlp = 3 * i * mlp_bytes
    adapted = {n.split(".")[-1] for n, _, _ in lora_targets}
    layer_adapted = [(n, fin) for n, fin, _ in shape.layer_linears if n.split(".")[-1] in adapted]
    if full:
        # the norm outputs feed q/k/v and gate/up (or the router); the down input is the MLP product
        readers = [fin for n, fin, _ in shape.layer_linears if fin == h and not _is_output_proj(n)]
        readers += [h] if shape.router_weights else []
        inputs = (sum(readers) if autocast else 2 * h) * a + (0 if shape.experts_per_token else i * a)
        lora = 0
    else:
        inputs = _lora_inputs(layer_adapted, shape.intermediate, method, a, stream_bytes, lora_dropout, varlen)
        lora = len(layer_adapted) * lora_r * a
    return norms + attention + mlp + inputs + lora + moe


def _norm_bytes(norm: Norm, in_bytes: int, trained: bool, compiled: bool) -> int:
    """Bytes per token `norm` keeps of an input of `in_bytes`. Compiled: one kernel each way, which rebuilds
    the rest from the input and 1/rms. Eager: RMSNorm computes in fp32 whatever the input's dtype; a trained
    weight also keeps the normalised input, in the dtype the weight multiplies it in."""
    if compiled:
        return norm.width * in_bytes + norm.groups * 4
    normalised = 4 if norm.fp32_product else in_bytes
    return (norm.width + norm.groups) * 4 + (norm.width * normalised if trained else 0)


def _lora_inputs(layer_adapted: list[tuple[str, int]], intermediate: int, method: Method, a: int, stream: int,
                 dropout: float, varlen: bool) -> int:
    """Bytes per token the adapted layers keep of their inputs for lora_A's weight gradient, as
    sftlab trains (train/lora_fused.py; QLoRA's 4-bit layers stay PEFT's, without the fp32 round
    trip of the input under autocast: train/loss.py). An input's dtype: the stream's for the norm
    outputs; the compute dtype for the attention output and, under autocast, the MLP product
    (QLoRA's 4-bit layers return fp32). An fp32 input under autocast is cast by each reader into
    its own copy; readers of one input in the compute dtype share it, and the attention output is
    the kernel's own saved output, except for sftlab_varlen, whose concatenated output is a tensor
    of its own. With dropout each layer keeps its noise (the input's dtype); a fused layer rebuilds
    the dropped input from the input, PEFT's keeps it."""
    autocast = a < stream
    total, shared = 0, {}
    for name, fin in layer_adapted:
        output_proj, mlp_product = _is_output_proj(name), fin == intermediate
        xb = a if autocast and (output_proj or (mlp_product and method != "qlora")) else stream
        if dropout > 0:
            total += fin * xb  # the noise, in the input's dtype
        if xb > a or (dropout > 0 and method == "qlora"):  # its own copy: cast, or PEFT's dropped input
            total += fin * a
        else:
            shared[(name.rpartition(".")[0], output_proj, fin)] = 0 if output_proj and not varlen else fin * xb
    return total + sum(shared.values())


def _is_output_proj(name: str) -> bool:
    return name.split(".")[-1] in ("o_proj", "out_proj", "dense", "c_proj", "wo")


def settings_from_config(config, nproc: int = 1, device: str = "auto") -> dict[str, Any]:
    """`estimate_memory`'s settings for a training config (TrainConfig): what `sftlab train` would run on
    `device` (cpu, cuda; auto: this machine's). DoRA is counted as LoRA (its magnitude vectors are small); `training.compile_norms: auto` as off
    (it turns on for long CPU runs only; eager norms keep more); an optimizer other than an 8-bit one
    or SGD as AdamW's two fp32 states."""
    t = config.training
    optim = t.optim.lower()
    settings = {
        "method": "lora" if config.method == "dora" else config.method,
        "seq_len": config.data.max_seq_length,
        "batch": t.per_device_train_batch_size,
        "grad_accum": t.gradient_accumulation_steps,
        "lora_r": config.lora.r,
        "lora_dropout": config.lora.dropout,
        "target_modules": config.lora.target_modules,
        "gradient_checkpointing": t.gradient_checkpointing,
        "compiled_norms": t.compile_norms is True,
        "dtype": _dtype_of(config, device),
        "weights_dtype": {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16"}.get(config.model.dtype, "auto"),
        "optimizer": "adamw_8bit" if "8bit" in optim else "sgd" if optim.startswith("sgd") else "adamw",
        "nproc": nproc,
    }
    if nproc > 1:
        settings["distributed"] = _engine_of(config.distributed)
    align = getattr(config, "align", None)  # an AlignConfig
    if align is not None:
        settings["sequences_per_row"] = 2 if align.loss in ("dpo", "orpo") else 1
        settings["reference_copy"] = (align.loss in ("dpo", "kto") and config.method == "full"
                                      and not align.precompute_ref_log_probs)
    return settings


def _dtype_of(config, device: str) -> str:
    """The compute dtype `sftlab train` runs `config` in on `device`: training.bf16 resolved as the trainer
    resolves it (auto: off under DeepSpeed without a GPU); fp16 counts as bf16 (the same bytes)."""
    from sftlab.train.preflight import wants_bf16

    return "bf16" if config.training.fp16 or wants_bf16(config, device) else "fp32"


def _trainer_engine(engine: str) -> str:
    """The trainer's engine (ddp, deepspeed, fsdp) that runs `engine` (one of ENGINES)."""
    return "deepspeed" if engine.startswith("zero") else "ddp" if engine == "none" else engine


def _engine_of(distributed) -> str:
    """The estimate's name (ENGINES) for a config's multi-process engine."""
    if distributed.engine != "deepspeed":
        return distributed.engine
    if distributed.deepspeed in ENGINES:
        return distributed.deepspeed
    from sftlab.train.distributed import deepspeed_config

    zero = deepspeed_config(distributed.deepspeed).get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device") == "cpu"
    return f"zero{3 if zero.get('stage') == 3 else 2}" + ("_offload" if offload else "")


def estimate_memory(
    config_or_path: Any,
    method: Method = "lora",
    seq_len: int = 1024,
    batch: int = 8,
    *,
    lora_r: int = 16,
    lora_dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    gradient_checkpointing: bool = False,
    dtype: Literal["auto", "fp32", "bf16"] = "auto",
    weights_dtype: Literal["auto", "fp32", "bf16"] = "auto",
    optimizer: str = "adamw",
    trained_fraction: float = 0.5,
    loss: Literal["selective", "full"] = "selective",
    loss_chunk: int = 4096,
    double_quant: bool = True,
    runtime_bytes: int = RUNTIME_BYTES,
    shape: ModelShape | None = None,
    nproc: int = 1,
    distributed: str = "none",
    grad_accum: int = 1,
    compiled_norms: bool = False,
    sequences_per_row: int = 1,
    reference_copy: bool = False,
    device: Literal["auto", "cpu", "cuda"] = "auto",
) -> Estimate:
    """Estimate the peak memory of training `config_or_path` with `method`.

    `config_or_path`: a transformers config, a model folder / id / .gguf / run dir /
    'default'. `dtype` is the compute precision (bf16 = autocast mixed precision over
    `weights_dtype` weights; auto = as `sftlab train` resolves training.bf16 auto for `distributed` on
    `device`: bf16 where the device supports it, fp32 under DeepSpeed without a GPU). `loss="full"` models
    a plain HF forward (logits for every position); "selective" models sftlab's loss on trained positions only. `nproc` and
    `distributed` (one of ENGINES) give the memory of each of `nproc` processes. With one process
    and `grad_accum` 1 the gradients are freed between steps: the total counts the larger of
    the gradients and activations + logits, not both. `compiled_norms`: training.compile_norms
    on (its auto turns it on for long CPU runs only; without it the estimate counts eager norms,
    the larger). Alignment: `sequences_per_row` 2 for DPO/ORPO (a pair's chosen and rejected
    sides go through the model together), `reference_copy` for DPO/KTO full fine-tuning (a frozen
    copy of the weights scores the reference; LoRA's reference is the base with adapters off).
    `device`: what trains (auto: this machine's); on a CUDA GPU that is not this machine's, dtype
    auto is bf16, as on every GPU since Ampere.
    """
    if method not in ("full", "lora", "qlora"):
        raise SftlabError(f"method must be full, lora or qlora (got {method!r})")
    if method == "qlora" and distributed in ("zero3", "zero3_offload", "fsdp"):  # as train/distributed.py refuses it
        raise SftlabError(f"method qlora cannot run under {distributed} in sftlab: its 4-bit weights are not shardable "
                          "here; estimate --method lora, or qlora with --distributed zero2 or ddp")
    if optimizer not in _OPTIMIZER_BYTES:
        raise SftlabError(f"optimizer must be one of {', '.join(_OPTIMIZER_BYTES)} (got {optimizer!r})")
    if distributed not in ENGINES:
        raise SftlabError(f"distributed must be one of {', '.join(ENGINES)} (got {distributed!r})")
    if nproc < 1:
        raise SftlabError(f"nproc must be at least 1 (got {nproc})")
    if nproc > 1 and distributed == "none":
        distributed = "ddp"  # what several processes run without a distributed: section
    if seq_len < 1 or batch < 1 or lora_r < 1 or grad_accum < 1:
        raise SftlabError("seq_len, batch, lora_r and grad_accum must be positive")
    if not 0 < trained_fraction <= 1:
        raise SftlabError(f"trained_fraction must be in (0, 1] (got {trained_fraction})")
    if shape is None:
        shape = model_shape(load_model_config(config_or_path))
    from sftlab.train.preflight import device_type, resolve_bf16

    device = device_type() if device == "auto" else device
    on_cpu = device == "cpu"
    if dtype == "auto":
        dtype = "bf16" if resolve_bf16("auto", False, _trainer_engine(distributed), device) else "fp32"
    if weights_dtype == "auto":
        from sftlab.train.trainer import base_weights_dtype

        weights_dtype = "bf16" if base_weights_dtype(method, dtype == "bf16") == "bfloat16" else "fp32"
    w_bytes = {"fp32": 4, "bf16": 2}[weights_dtype]
    a_bytes = {"fp32": 4, "bf16": 2}[dtype]
    a_bytes = min(a_bytes, w_bytes)  # fp32 compute on bf16 weights is not a mode anyone runs
    autocast = a_bytes < w_bytes
    notes: dict[str, str] = {}

    targets = _targets(shape.lora_candidates, target_modules) if method != "full" else []
    if shape.lora_refused and any(n.rsplit(".", 1)[-1] == shape.lora_refused[0] for n, _, _ in targets):
        names = sorted({n.rsplit(".", 1)[-1] for n, _, _ in shape.lora_candidates})
        raise SftlabError(incompatible_target_message(shape.architecture, names, target_modules, *shape.lora_refused))
    n_lora = sum(lora_r * (fin + fout) for _, fin, fout in targets)
    lora_on_experts = method != "full" and target_modules == "all-linear" and shape.moe_lora_per_rank > 0
    if lora_on_experts:
        n_lora += lora_r * shape.moe_lora_per_rank

    if method == "qlora":
        per_block = (1 + 4 / 256) if double_quant else 4
        quantised = shape.decoder_linear_weights
        weights = int(quantised * (0.5 + per_block / NF4_BLOCK)) + (shape.n_params - quantised) * w_bytes
        notes["weights"] = f"{quantised:,} linear weights in nf4 (+ absmax per {NF4_BLOCK}), rest {weights_dtype}" + (
            f", of it {shape.expert_params:,} expert weights (bitsandbytes quantizes linear layers only)"
            if shape.expert_params else "")
    else:
        weights = shape.n_params * w_bytes
        notes["weights"] = f"{shape.n_params:,} x {w_bytes} B ({weights_dtype})"
    if shape.frozen_params:
        notes["weights"] += f", of them {shape.frozen_params:,} outside the language model (vision tower: frozen)"

    trainable = shape.n_params - shape.frozen_params - shape.untrained_params if method == "full" else n_lora
    t_bytes = w_bytes if method == "full" else 4  # adapters stay fp32
    lora_params = n_lora * 4
    if n_lora:
        experts = " and the router and experts of each layer" if lora_on_experts else ""
        notes["lora_params"] = f"r={lora_r} on {len(targets)} linear layers{experts}: {n_lora:,} x 4 B"
    gradients = trainable * t_bytes
    notes["gradients"] = f"{trainable:,} x {t_bytes} B"
    optimizer_bytes = trainable * _OPTIMIZER_BYTES[optimizer] * t_bytes // 4
    notes["optimizer"] = f"{optimizer}: {_OPTIMIZER_BYTES[optimizer] * t_bytes // 4} B per trainable parameter"

    expert_adapters = lora_r * shape.expert_lora_per_rank if lora_on_experts else 0
    weight_copies, what = _kept_weight_copies(shape, method, n_lora, a_bytes, w_bytes, expert_adapters,
                                              gradient_checkpointing)
    if what:
        notes["weight_copies"] = what

    if reference_copy:
        weight_copies += weights
        notes["weight_copies"] = "frozen reference model (a copy of the weights)" + (
            "; " + notes["weight_copies"] if "weight_copies" in notes else "")

    tokens_per_row = seq_len * sequences_per_row
    layers = [(n, activation_bytes_per_token(
        kind, method=method, compute_bytes=a_bytes, stream_bytes=w_bytes,
        lora_targets=targets, lora_r=lora_r, lora_dropout=lora_dropout, compiled_norms=compiled_norms,
    ), "" if kind is shape else "dense ") for n, kind in shape.layer_kinds()]
    head = shape.hidden * (2 * w_bytes + a_bytes) + 4 + 8  # final norm, head input, input id
    if gradient_checkpointing:
        largest = max(per_layer for _, per_layer, _ in layers)
        per_token = shape.n_layers * shape.hidden * w_bytes + largest + head
        notes["activations"] = f"checkpointed: layer inputs + 1 layer rebuilt ({largest:,} B/token)"
    else:
        per_token = sum(n * per_layer for n, per_layer, _ in layers) + head
        notes["activations"] = " + ".join(f"{n} {dense}layers x {per_layer:,} B/token" for n, per_layer, dense in layers)
    activations = per_token * tokens_per_row * batch

    full_logits = (12 + (2 if autocast else 0)) * shape.vocab * tokens_per_row
    if loss == "full":
        logits_per_row, logits_fixed = full_logits, 0
        notes["logits"] = f"every position: fp32 tokens x {shape.vocab:,} vocab, 3 alive at the peak"
    elif shape.fused_head and nproc == 1:
        from sftlab.train.loss import ce_chunk

        trained = tokens_per_row * trained_fraction
        logits_per_row = int(trained * shape.hidden * 2 * a_bytes)  # the head's input rows and their gradient
        chunk = min(ce_chunk("cpu" if on_cpu else "cuda", head_trained=method == "full"), int(trained * batch) or 1)
        head_weights = shape.vocab * shape.hidden
        # one chunk's fp32 logits and log-probabilities (alive together in log_softmax); cast head; its fp32 gradient
        logits_fixed = chunk * shape.vocab * 8 + (head_weights * a_bytes if autocast else 0) \
            + (head_weights * 4 if method == "full" else 0)
        notes["logits"] = f"head fused with the loss: {chunk}-row chunks of {shape.vocab:,} logits"
    else:
        trained = tokens_per_row * trained_fraction
        logits_per_row = int(trained * shape.vocab * (4 + 2 * a_bytes))
        logits_fixed = 8 * min(loss_chunk, int(trained * batch) or 1) * shape.vocab
        notes["logits"] = f"trained positions only ({trained_fraction:.0%} of tokens) x {shape.vocab:,} vocab"
    logits = logits_per_row * batch + logits_fixed

    options = dict(
        lora_r=lora_r, lora_dropout=lora_dropout, target_modules=target_modules, gradient_checkpointing=gradient_checkpointing,
        dtype=dtype, weights_dtype=weights_dtype, optimizer=optimizer, trained_fraction=trained_fraction, loss=loss,
        loss_chunk=loss_chunk, double_quant=double_quant, runtime_bytes=runtime_bytes, shape=shape,
        nproc=nproc, distributed=distributed, grad_accum=grad_accum, compiled_norms=compiled_norms,
        sequences_per_row=sequences_per_row, reference_copy=reference_copy, device=device,
    )
    freed = distributed == "none" and grad_accum == 1
    if freed:
        notes["gradients"] += " (freed after each step: the total counts the larger of these and activations + logits)"
    est = Estimate(
        rebuild=lambda b: estimate_memory(None, method, seq_len, b, **options),
        weights=weights,
        weight_copies=weight_copies,
        lora_params=lora_params,
        gradients=gradients,
        optimizer=optimizer_bytes,
        activations=activations,
        logits=logits,
        runtime=runtime_bytes,
        caches=CPU_CACHES_BYTES if on_cpu else 0,
        n_params=shape.n_params,
        trainable_params=trainable,
        method=method,
        batch=batch,
        seq_len=seq_len,
        dtype=dtype if not autocast else "bf16 mixed precision",
        per_row=per_token * tokens_per_row + logits_per_row,
        logits_full=full_logits * batch,
        gradients_freed=freed,
        notes=notes | {"runtime": "the process before the model: Python, libraries, data (CPU RSS) / CUDA context",
                       "caches": "oneDNN's kernels for the step's shapes, the allocator's free spans at the peak"},
    )
    return _per_process(est, shape, distributed, nproc, w_bytes, t_bytes) if distributed != "none" else est


def _kept_weight_copies(shape: ModelShape, method: str, n_lora: int, a_bytes: int, w_bytes: int,
                        expert_adapters: int, gradient_checkpointing: bool) -> tuple[int, str]:
    """Bytes of the weight-sized tensors autograd keeps for the backward pass, and what they are (module
    docstring): computing in bf16, a bf16 copy of each fp32 weight a matmul reads (the adapters, fp32 on any
    base, and under autocast the linear weights and routers; nf4 ones are dequantised per call); with LoRA on
    the experts, each expert stack merged with its adapter. PEFT merges outside autocast, in the stacks' dtype:
    the expert adapters get no bf16 copy where the stacks are fp32."""
    autocast = a_bytes < w_bytes
    linear = (shape.decoder_linear_weights if method != "qlora" else 0) + shape.router_weights
    cast = {"linear weights": linear if autocast else 0,
            "adapters": n_lora - (expert_adapters if w_bytes == 4 else 0)} if a_bytes == 2 else {}
    copies = sum(cast.values())
    total = 2 * (copies // max(shape.n_layers, 1) if gradient_checkpointing else copies)
    what = [f"bf16 copies of the {' and '.join(k for k, n in cast.items() if n)}"] if copies else []
    if expert_adapters:
        merged = shape.expert_params * w_bytes
        total += merged // max(shape.n_layers - shape.dense_layers, 1) if gradient_checkpointing else merged
        what.append("the expert weights merged with their adapters (W + BA)")
    one_layer = " (one layer at a time)" if gradient_checkpointing else ""
    return total, (" and ".join(what) + " kept for backward" + one_layer) if what else ""


def _per_process(est: Estimate, shape: ModelShape, engine: str, n: int, w_bytes: int, t_bytes: int) -> Estimate:
    """The estimate of one of `n` processes under `engine` (module docstring)."""
    est.processes, est.engine = n, engine
    notes = est.notes
    if engine == "ddp":
        notes["gradients"] += f" + {est.gradients / GiB:.2f} GiB in DDP's all-reduce buckets"
        est.gradients *= 2
        return est
    split = lambda b: -(-b // n)  # noqa: E731  (ceil: the last shard is padded)
    master = split(est.trainable_params * 4) if engine.startswith("zero") else 0
    est.gradients, est.optimizer = split(est.gradients), split(est.optimizer) + master
    notes["gradients"] += f", split {n} ways"
    notes["optimizer"] += f", split {n} ways" + (" (+ DeepSpeed's fp32 master copy, 4 B)" if master else "")
    if engine in ("zero3", "zero3_offload", "fsdp"):
        est.weights = split(est.weights)
        notes["weights"] += f", split {n} ways"
        if engine == "fsdp":
            kinds = shape.layer_kinds()
            outside = shape.n_params - sum(n * kind.layer_params for n, kind in kinds)
            est.gathered = max(2 * max(kind.layer_params for _, kind in kinds), outside) * w_bytes
            notes["gathered"] = f"max(2 decoder layers, the {outside:,} parameters outside them) x {w_bytes} B"
        else:
            live = min(shape.n_params, ZERO3_MAX_LIVE_PARAMETERS)
            est.gathered = live * w_bytes
            notes["gathered"] = f"min(all, stage3_max_live_parameters) = {live:,} x {w_bytes} B"
    if engine.endswith("_offload"):
        est.offloaded = est.optimizer + (est.weights if engine == "zero3_offload" else 0)
        what = "optimizer states + fp32 master" + (" + sharded weights" if engine == "zero3_offload" else "")
        notes["offloaded"] = f"{what}, per process, in CPU memory"
        est.optimizer = 0
        if engine == "zero3_offload":
            est.weights = 0
    return est


# binary throughout, as GPU memory is sold and accelerate's estimate-memory reads it: an "80GB" H100 has 80 GiB (79.6 usable)
_UNITS = {"": 1, "b": 1} | {p + s: 1024 ** (i + 1) for i, p in enumerate("kmgt") for s in ("", "b", "ib")}


def parse_memory(text: str) -> int:
    """'24GiB', '24GB', '1.5 TiB', '8g', '512MiB' or a byte count -> bytes (G = GB = GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise SftlabError(f"cannot read the memory size {text!r} (examples: 24GiB, 80GB, 512MiB)")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise SftlabError(f"the memory size {text!r} is not above zero")
    return size


def system_memory() -> int:
    """Total physical memory of this machine in bytes."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory(device: str = "auto") -> int | None:
    """What one training process has to fit into: the first GPU's memory where the device is this
    machine's GPU, the RAM where it is this machine's CPU; None for a device this machine lacks."""
    import torch

    here = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("auto", here):
        return None
    return torch.cuda.get_device_properties(0).total_memory if here == "cuda" else system_memory()

