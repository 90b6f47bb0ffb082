"""`train(config)`: SFT on a transformers.Trainer with sftlab's loss (per trained token), the
per-token eval loss and warm-up, and crash-safe checkpoints (train/checkpointing.py, which
overrides private Trainer methods: tests/unit/test_trainer_contract.py checks them)."""

from __future__ import annotations

import ctypes
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from transformers import Trainer

from sftlab.config import TrainConfig
from sftlab.data.conversation import Example
from sftlab.data.render import IGNORE
from sftlab.estimate import PEFT_REFUSED, incompatible_target_message, written_targets
from sftlab.errors import SftlabError
from sftlab.train import allocator, compiled_norms, kernels
from sftlab.train.attention import NAME as VARLEN
from sftlab.train.attention import can_flatten, choose_attention
from sftlab.train.checkpointing import AtomicCheckpoints, explained_save_failure, save_outputs
from sftlab.train.guards import TRAIN_RESUME, NonFiniteGuard, is_out_of_memory, out_of_memory_message
from sftlab.train.lora_fused import fuse_lora_layers
from sftlab.train.loss import router_aux_coefficient, selective_loss_sum
from sftlab.train.preflight import device_type, preflight, wants_bf16
from sftlab.train.run_dir import last_good_checkpoint
from sftlab.train.schedule import RatioWarmup


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


class SFTTrainer(AtomicCheckpoints, RatioWarmup, Trainer):
    """Trainer with the selective, token-normalised SFT loss (see train/loss.py).

    Also per token, not per batch: the eval loss (the sum of losses over the whole eval set
    divided by its trained tokens, so early stopping and the best checkpoint do not weigh a
    batch of 10 trained tokens like one of 1,000), the LR warm-up (`warmup_ratio` of the
    real number of steps) and `trained_tokens_seen` (summed over processes).

    Crash-safe: each checkpoint is written under checkpoints/.saving/ and renamed into place
    whole, with sftlab's record (`checkpoint_state` plus the step, trained tokens and skipped
    steps) inside; `nonfinite` checks each step for NaN/inf (train/guards.py); running out of
    memory or disk becomes an SftlabError saying what to change.
    """

    def __init__(self, *args, warmup_ratio: float | None = None, checkpoint_state: dict | None = None,
                 nonfinite: NonFiniteGuard | None = None, oom_message=None, **kwargs):
        super().__init__(*args, **kwargs)
        # We divide by the trained-token count of the whole accumulation window ourselves,
        # so the Trainer must count it and must not divide again by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        self.warmup_ratio = warmup_ratio
        self.checkpoint_state = checkpoint_state  # AtomicCheckpoints writes it into each checkpoint
        self.nonfinite = nonfinite
        self.oom_message = oom_message  # step -> the advice for an out-of-memory step
        if nonfinite is not None:
            self.add_callback(nonfinite)
        self.trained_tokens_restored = 0  # the count a resumed checkpoint had reached
        self._trained_tokens_local = 0  # trained tokens this process has run since start
        self._eval_totals: torch.Tensor | None = None  # [loss sum, trained tokens] during evaluation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # label smoothing (transformers' label_smoothing_factor) in training only: eval_loss stays the plain CE
        loss_sum, n = selective_loss_sum(model, inputs, self.args.label_smoothing_factor if model.training else 0.0)
        if model.training:
            self._trained_tokens_local += n
            if self.nonfinite is not None:
                self.nonfinite.record(loss_sum, inputs.get("sources"))
        elif self._eval_totals is not None:
            self._eval_totals[0] += loss_sum.detach().to(self._eval_totals)
            self._eval_totals[1] += n
        denom = num_items_in_batch if num_items_in_batch is not None else n
        if torch.is_tensor(denom):
            denom = denom.to(loss_sum.device)
        loss = loss_sum / (denom if (not isinstance(denom, int) or denom > 0) else 1)
        if self.args.average_tokens_across_devices and self.args.world_size > 1 and num_items_in_batch is not None:
            loss = loss * self.args.world_size  # DDP averages gradients; the count was already global
        return (loss, {}) if return_outputs else loss

    def get_eval_dataloader(self, eval_dataset=None):
        """Under several processes, the eval set padded to a whole number of batches on every
        process (`EvenedEvalSet`), so accelerate repeats no example into the eval loss."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        multiple = self.args.eval_batch_size * self.args.world_size
        if self.args.world_size > 1 and isinstance(dataset, RowDataset) and len(dataset) % multiple:
            eval_dataset = EvenedEvalSet(dataset, multiple)
        return super().get_eval_dataloader(eval_dataset)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Replace transformers' mean of per-batch losses by the per-token loss of the eval set."""
        self._eval_totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                             ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
            loss_sum, tokens = self.accelerator.reduce(self._eval_totals, reduction="sum").tolist()
        finally:
            self._eval_totals = None
        if tokens > 0:
            output.metrics[f"{metric_key_prefix}_loss"] = loss_sum / tokens
        return output

    def training_step(self, model, inputs, num_items_in_batch=None):
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        except (MemoryError, RuntimeError) as e:
            if not is_out_of_memory(e) or self.oom_message is None:
                raise
            raise SftlabError(self.oom_message(self.state.global_step + 1)) from None

    def checkpoint_record(self) -> dict | None:
        record = super().checkpoint_record()
        if record is not None:
            record["trained_tokens_seen"] = self.trained_tokens_seen  # collective: every process
        return record

    def restore_record(self, saved: dict) -> None:
        super().restore_record(saved)
        self.trained_tokens_restored = saved["trained_tokens_seen"]

    @property
    def trained_tokens_seen(self) -> int:
        """Trained tokens over all processes since the run began (a collective call under DDP)."""
        local = torch.tensor(self._trained_tokens_local, dtype=torch.int64, device=self.args.device)
        return self.trained_tokens_restored + int(self.accelerator.reduce(local, reduction="sum"))


class RowDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class EvenedEvalSet(RowDataset):
    """Eval rows grown to a multiple of `multiple` by one-token rows that train nothing.

    accelerate evens out the last eval batch across processes by repeating examples from the
    start, and their loss would count again in the per-token eval loss; with a length that
    divides evenly it repeats none, and the filler rows add no loss and no trained token."""

    def __init__(self, rows: RowDataset, multiple: int):
        first = rows[0][0]
        filler = [Example(first.ids[:1], [IGNORE], "(eval filler: trains nothing)")]
        super().__init__([*rows.rows, *[filler] * (-len(rows) % multiple)])


def return_freed_memory_to_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB for this process (a CPU run not on tcmalloc).

    By default glibc raises the threshold each time a large block is freed; after the first
    steps, activations come from the heap and stay there when freed, so a CPU run's RSS sits
    25-35 % above its live memory (bench/estimate_check.py). With a fixed threshold, blocks
    over 1 MiB are mmapped and handed back on free, at the price of faulting them in again at
    every step (train/allocator.py: tcmalloc has neither cost). Honours MALLOC_MMAP_THRESHOLD_.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc
        pass


def base_weights_dtype(method: str, use_bf16: bool) -> str:
    """The dtype `model.dtype: auto` loads: a LoRA/DoRA base in bf16 when training in bf16, else fp32.

    A frozen base needs no fp32 master copy (checkpoints are bf16 anyway): bf16 halves the
    weights, drops autocast's per-step bf16 copies and the fp32 residual activations (peak
    RSS -13 % on SmolLM2, bench/README.md). PEFT keeps the adapters, DoRA's magnitude
    vector included, in fp32, and takes DoRA's column norm of W + BA in fp32: DoRA's
    gradients on a bf16 base stay as close to an fp32 base's as LoRA's do
    (tests/integration/test_train_loop.py). Full fine-tuning keeps fp32 master weights under
    bf16 autocast (pure bf16 updates round away); QLoRA's base is 4-bit.
    """
    return "bfloat16" if use_bf16 and method in ("lora", "dora") else "float32"


def quantization_config(method: str, use_bf16: bool):
    """QLoRA's 4-bit NF4 base (double quantisation, computing in the training dtype); None otherwise."""
    if method != "qlora":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:  # pragma: no cover
        raise SftlabError("QLoRA needs bitsandbytes: pip install 'sftlab[qlora]'") from e
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if use_bf16 else torch.float32,
    )


def prepare_4bit_base(model, gradient_checkpointing: bool):
    """A 4-bit base made ready for QLoRA training (PEFT's `prepare_model_for_kbit_training`).

    bitsandbytes' repacking of 4-bit weights for its CPU inference kernel is turned off first: on
    a CPU with AVX512-BF16, a `Linear4bit` in eval mode repacks its weight in place for
    `gemv_4bit`, which has no backward, so after the first evaluation training would go on with no
    gradient flowing through the frozen base layers, silently (tests/integration/test_qlora_eval.py)."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    # non-reentrant checkpointing, as LoRA and full fine-tuning use (PEFT's default leaves torch's
    # use_reentrant unset, which torch warns will become an error)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def build_model(config: TrainConfig, use_bf16: bool, tokenizer=None):
    """Base model, with LoRA / DoRA / QLoRA applied through PEFT; embeddings fitted to `tokenizer`."""
    from sftlab.models import (fit_embeddings, freeze_outside_language_model, load_model,
                               quiet_fused_expert_pattern_warnings, text_refusal)

    quant = quantization_config(config.method, use_bf16)
    m = config.model
    dtype = base_weights_dtype(config.method, use_bf16) if m.dtype == "auto" else m.dtype
    # sftlab_varlen is set by choose_attention once the model is built (a model whose constructor
    # reads the name, as Falcon's does, would fail on it before any refusal could say why)
    model = load_model(m.name_or_path, dtype=dtype, trust_remote_code=m.trust_remote_code,
                       attn_implementation=None if m.attn_implementation == VARLEN else m.attn_implementation,
                       quantization_config=quant,
                       allow_pickle=m.allow_pickle or None)
    model.config.use_cache = False
    refuse_fixed_length_rows(model)
    if refusal := text_refusal(model, run=True):
        raise SftlabError(refusal)
    new_token_kwargs = fit_embeddings(model, tokenizer) if tokenizer is not None else {}
    if config.data.packing:
        text_positions_first(model)
    choose_attention(model, m.attn_implementation, packing=config.data.packing)
    if config.method == "full":
        freeze_outside_language_model(model)  # a multimodal model's vision (audio) towers: text never runs them
        keep_frozen_as_built(model)
        if config.training.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    from peft import LoraConfig, get_peft_model

    if config.method == "qlora":
        model = prepare_4bit_base(model, config.training.gradient_checkpointing)
    elif config.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = config.lora
    peft_config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        use_dora=lora.use_dora, task_type="CAUSAL_LM", exclude_modules=lora_exclusions(model, lora.target_modules),
        **new_token_kwargs,
    )
    quiet_fused_expert_pattern_warnings()
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as e:
        if type(e).__name__ == "NoMatchingPeftModuleError":
            raise SftlabError(no_target_message(model, lora.target_modules)) from None
        if lora.use_dora and "dora" in str(e).lower():  # e.g. a mixture-of-experts model's fused expert weights
            raise SftlabError(f"method dora: PEFT cannot apply DoRA to every layer lora.target_modules "
                              f"({lora.target_modules}) picks: {str(e).splitlines()[0]} On a mixture-of-experts "
                              "model, target the attention projections, e.g. "
                              "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]") from None
        if refused := PEFT_REFUSED.search(str(e)):  # PEFT: out_proj on Mamba-type models
            raise SftlabError(incompatible_target_message(type(model).__name__, _linear_layer_names(model),
                                                          lora.target_modules, refused[1], str(e))) from None
        raise
    check_tied_head_not_adapted(model, lora.target_modules)
    fuse_lora_layers(model)
    return model


def refuse_fixed_length_rows(model) -> None:
    """Reformer trains only on rows of one length (its forward raises a ValueError at the first training step on any
    other, a traceback): sftlab's rows are as long as their examples, so it is refused in one line."""
    config = model.config
    if config.model_type != "reformer":
        return
    if config.axial_pos_embds:
        rows = f"exactly {math.prod(config.axial_pos_shape)} tokens (its axial position embeddings' axial_pos_shape)"
    else:
        chunks = {"local": config.local_attn_chunk_length, "lsh": config.lsh_attn_chunk_length}
        rows = f"a multiple of {math.lcm(*(chunks[kind] for kind in config.attn_layers))} tokens (its attention chunks)"
    raise SftlabError(f"model: {type(model).__name__} trains only on rows of {rows}, and sftlab's rows are as long as "
                      "their examples: it cannot train this model")


def keep_frozen_as_built(model) -> list[str]:
    """Freeze again the parameters the model's class creates with requires_grad=False (a MoE router's
    e_score_correction_bias, HRM's z_L_init) that loading made trainable: transformers gives every parameter it
    loads under another name than the checkpoint's (Laguna's experts.e_score_correction_bias) requires_grad=True,
    and full fine-tuning then counted (and handed the optimizer) parameters the estimate rightly leaves out.
    Returns their names; nothing where the class cannot be built again on the meta device."""
    import copy

    import torch

    try:
        with torch.device("meta"):
            built = type(model)(copy.deepcopy(model.config))
    except Exception:  # noqa: BLE001  a class this cannot rebuild: left as loaded
        return []
    fixed = {n for n, p in built.named_parameters() if not p.requires_grad}
    names = [n for n, p in model.named_parameters() if n in fixed and p.requires_grad]
    for n in names:
        model.get_parameter(n).requires_grad_(False)
    return names


def _four_position_rows(module, args, kwargs):
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.dim() == 2:
        kwargs["position_ids"] = position_ids[None].expand(4, -1, -1)  # text positions, then the 3 rotary rows
    return args, kwargs


def text_positions_first(model) -> bool:
    """Keep packed examples apart in the vision-language models that read 2-D position_ids as the three rows of
    their multimodal rotary positions and then build a plain causal mask (Qwen2-VL, Qwen2.5-VL: each packed example
    saw the ones before it, and data.packing was refused): their language model is given the form their code
    documents for packed text, [4, batch, length], the text positions first, on text alone the same rotary
    positions. Done where a multimodal model's examples are not kept apart with 2-D positions and are with
    these (`examples_kept_apart`); returns whether it was."""
    from sftlab.models import outside_language_model
    from sftlab.train.attention import examples_kept_apart

    if not outside_language_model(model) or examples_kept_apart(model) is not False:
        return False
    handle = model.get_decoder().register_forward_pre_hook(_four_position_rows, with_kwargs=True)
    if examples_kept_apart(model):
        return True
    handle.remove()
    return False


def lora_exclusions(model, targets) -> list[str] | str | None:
    """PEFT's exclude_modules for `targets`: the linear layers PEFT cannot wrap (`unwrappable_targets`) and, on a
    multimodal model, every layer outside its language model (vision and audio towers, projectors:
    `outside_language_model`), which all-linear and a list of names (a vision tower has its q_proj too) would
    pick; then a regular expression. A regular expression of the user's own picks what it matches."""
    from sftlab.models import lora_exclude_modules, outside_language_model

    unwrappable = unwrappable_targets(model, targets)
    parts = outside_language_model(model) if targets == "all-linear" or isinstance(targets, list) else []
    return lora_exclude_modules(parts, unwrappable)


def unwrappable_targets(model, targets) -> list[str] | None:
    """The linear layers all-linear leaves out (PEFT cannot wrap them: `unwrappable_linears`, a router returning
    its routing with its logits), as PEFT's exclude_modules; a list naming one is refused."""
    from sftlab.estimate import unwrappable_linears

    unwrappable = unwrappable_linears(model)
    if not unwrappable:
        return None
    if isinstance(targets, list):
        picked = sorted({n.rsplit(".", 1)[-1] for n in unwrappable if any(n == t or n.endswith("." + t) for t in targets)})
        if picked:
            names = [n for n in _linear_layer_names(model) if n not in picked]
            raise SftlabError(incompatible_target_message(
                type(model).__name__, names, targets, picked[0],
                "its forward is not x @ weight: it returns the routing with the logits, or reads its input in groups"))
    return unwrappable


def linears_left_out(model) -> list[str]:
    """The linear layers (named within their decoder layer) a PEFT model has no adapter on. Under all-linear:
    routers PEFT cannot wrap (`unwrappable_targets`), and on the mixtures of experts PEFT maps from their
    transformers 4 names (DeepSeek-V3, GLM-4.5, Qwen3-Next, ...) the dense layers' and shared experts'
    gate_proj/up_proj/down_proj, names PEFT takes for the experts' stacked tensors."""
    from sftlab.estimate import language_model_linears
    from sftlab.models import name_in_layer

    # a multimodal model's towers are left out on purpose: said apart
    return sorted({name_in_layer(n) for n, _, _ in language_model_linears(model)})


def _linear_layer_names(model) -> list[str]:
    """The names a lora.target_modules list can give: the model's linear layers' last name parts (not the
    parts of LoRA layers PEFT may have added before it refused a target)."""
    from sftlab.estimate import language_model_linears

    return sorted({n.rsplit(".", 1)[-1] for n, _, _ in language_model_linears(model)})


def no_target_message(model, targets) -> str:
    """lora.target_modules matched no layer: say which names this model's linear layers have."""
    names = _linear_layer_names(model)
    example = ["q_proj", "v_proj"] if {"q_proj", "v_proj"} <= set(names) else names[:2]
    comma = " (a list is written [a,b]; one string is a regular expression)" if isinstance(targets, str) and "," in targets else ""
    return (f"lora.target_modules: {written_targets(targets)} matches no layer of {type(model).__name__}{comma}; its linear "
            f"layers are {', '.join(names)}: e.g. lora.target_modules=[{','.join(example)}], or all-linear")


def check_tied_head_not_adapted(model, targets) -> None:
    """A LoRA on an lm_head that shares its weight with the input embeddings cannot be merged: the merged
    weight would change the embeddings too (PEFT only warns; the export then fails its check)."""
    base = model.get_base_model()
    head = base.get_output_embeddings()
    if hasattr(head, "lora_A") and getattr(base.config.get_text_config(), "tie_word_embeddings", False):
        raise SftlabError(f"lora.target_modules ({targets}) adapts the lm_head, which shares its weight with the input "
                          f"embeddings in {type(base).__name__} (tie_word_embeddings): a merged model cannot hold that "
                          "adapter (the merge would change the embeddings too); leave the lm_head out (all-linear does)")


def planned_tokens(pstats: dict, args) -> int:
    """Tokens (padding included) the run will compute, from one epoch's count and the step plan."""
    batches = max(1, math.ceil(pstats["rows"] / args.per_device_train_batch_size))
    if args.max_steps > 0:
        return round(pstats["computed_tokens"] / batches * args.max_steps * args.gradient_accumulation_steps)
    return round(pstats["computed_tokens"] * args.num_train_epochs)


def training_args(config: TrainConfig, out: Path, has_eval: bool, use_bf16: bool, liger: dict | None = None):
    from transformers import TrainingArguments

    from sftlab.train.distributed import engine_arguments

    t = config.training
    eval_steps = t.eval_steps or t.logging_steps
    save_steps = t.save_steps
    load_best = bool(has_eval and (t.load_best_model_at_end or t.early_stopping_patience))
    if load_best and save_steps % eval_steps:
        save_steps = eval_steps * max(1, round(save_steps / eval_steps))  # HF needs save_steps % eval_steps == 0
    kwargs = dict(
        output_dir=str(out / "checkpoints"),
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=0,  # SFTTrainer(warmup_ratio=...) sets it once the number of steps is known,
        # unless training.warmup_steps (pass-through) gives it
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        load_best_model_at_end=load_best,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        bf16=use_bf16,
        fp16=t.fp16,
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=False,  # gradient checkpointing, applied in build_model (before the PEFT wrap)
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinned host memory only speeds copies to a GPU
        remove_unused_columns=False,
        prediction_loss_only=True,
        report_to=t.report_to or "none",
        disable_tqdm=False,
        use_liger_kernel=liger is not None,
        liger_kernel_config=liger,
    )
    kwargs.update(t.passthrough())  # TrainingArguments fields given by their HF names
    check_evaluation(t.passthrough(), has_eval, load_best)
    kwargs.update(engine_arguments(config))  # training.deepspeed / fsdp_config resolved and checked
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError, ImportError) as e:  # a value TrainingArguments itself refuses
        raise SftlabError(f"training: {' '.join(str(e).split())}") from None


@contextmanager
def tracker_errors(report_to: list[str]):
    """A tracker of training.report_to that fails (wandb without `wandb login`, say) as one line
    naming it, not as a traceback from inside the Trainer's callbacks."""
    try:
        yield
    except Exception as e:
        package = type(e).__module__.split(".")[0]
        if package not in report_to:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        raise SftlabError(f"training.report_to: {package} failed: {message} (docs/sweep.md: each tracker's "
                          "offline use, e.g. WANDB_MODE=offline; or leave it out of training.report_to)") from None


def check_evaluation(passthrough: dict, has_eval: bool, load_best: bool) -> None:
    """Refuse the evaluation settings given by their TrainingArguments names that cannot work with
    what sftlab sets: evaluating with no validation data, or keeping the best checkpoint (early
    stopping) while evaluating at other points than sftlab's step-wise saves."""
    strategy = str(passthrough.get("eval_strategy", "steps" if has_eval else "no"))
    if strategy not in ("no", "steps", "epoch"):
        return  # not a strategy: TrainingArguments says so, with the valid names
    if not has_eval:
        asked = [k for k, on in (("eval_strategy", strategy != "no"), ("eval_on_start", passthrough.get("eval_on_start")))
                 if on]
        if asked:
            raise SftlabError(f"training.{asked[0]}: evaluation needs validation data: set data.validation "
                              f"(or leave training.{asked[0]} out)")
    elif load_best and strategy != "steps":
        raise SftlabError(f"training.eval_strategy: {strategy} cannot keep the best checkpoint "
                          "(training.early_stopping_patience / load_best_model_at_end): sftlab saves every "
                          "training.save_steps steps, so it evaluates every training.eval_steps; leave eval_strategy out")


def train(config: TrainConfig, *, resume: bool = False, log=print) -> dict:
    """Run SFT; returns the run summary written to RUN/run.json."""
    from transformers import EarlyStoppingCallback, set_seed

    from sftlab.data.pack import collate, packing_stats
    from sftlab.models import cache_dir, load_tokenizer, model_auto_class, outside_language_model, parts_not_loaded
    from sftlab.train import distributed
    from sftlab.files import atomic_write
    from sftlab.train.callbacks import IdleAdaptersCallback, MetricsJsonlCallback, OverfitWarningCallback
    from sftlab.train.dataset import make_rows, no_usable_examples, prepare_examples
    from sftlab.train.run_dir import (checkpoint_state, discard_interrupted_saves, finished_run, model_card,
                                      refuse_existing_run, resume_point, write_run_json)

    preflight(config)
    main = distributed.is_main_process()
    log = log if main else (lambda *a, **k: None)  # one log: rank 0's

    out = Path(config.output_dir)
    if not resume:
        refuse_existing_run(out)
    if main:
        for name in discard_interrupted_saves(out):
            log(f"discarded {name}: its saving was interrupted")
    t_start = time.perf_counter()
    malloc = allocator.loaded()
    if not torch.cuda.is_available() and malloc == "system":
        return_freed_memory_to_os()
        advice = allocator.advice(malloc)
        if advice:
            log(advice)

    m = config.model
    tokenizer = load_tokenizer(m.name_or_path, trust_remote_code=m.trust_remote_code, chat_template=m.chat_template)
    cache_root = cache_dir() / "tokenized"
    train_ex, train_stats = prepare_examples(config.data.train, tokenizer, config.data, cache_root,
                                             out / "rejects.jsonl" if main else None)
    log(train_stats.summary())
    if not train_ex:
        raise SftlabError(no_usable_examples(train_stats, "training"))
    eval_ex, eval_stats = [], None
    if config.data.validation:
        eval_ex, eval_stats = prepare_examples(
            config.data.validation, tokenizer, config.data, cache_root, out / "rejects.validation.jsonl" if main else None
        )
        log(eval_stats.summary())
        if not eval_ex:  # no eval loss would be computed, nor early stopping: without a word
            raise SftlabError(f"{no_usable_examples(eval_stats, 'validation')}; or leave data.validation out")
    digests = {"train": train_stats.digest, **({"validation": eval_stats.digest} if eval_stats else {})}
    state = checkpoint_state(config, digests)
    checkpoint, saved = resume_point(out, state, resume, log)
    if (done := finished_run(out, saved, state, log)) is not None:
        return done
    use_bf16 = wants_bf16(config)
    set_seed(config.training.seed)  # LoRA's initialisation too must repeat for the same seed
    model = build_model(config, use_bf16, tokenizer)
    # the run starts: out/ appears (earlier only with the data's rejects.jsonl)
    distributed.on_main_process(atomic_write, out / "config.yaml", config.to_yaml())
    flatten = can_flatten(model)
    bucket = not torch.cuda.is_available()  # CPU kernels are built per matmul shape (data/pack.py shape_bucket)
    rows = make_rows(train_ex, config.data.max_seq_length, config.data.packing)
    pstats = packing_stats(rows, config.training.per_device_train_batch_size, flatten=flatten,
                           bucket=bucket)
    log(f"rows: {pstats['rows']} ({'packed' if config.data.packing else 'one example each'}), "
        f"attention {model.config._attn_implementation}{' (batches flattened)' if flatten else ''}, "
        f"trained/computed tokens {pstats['trained_per_computed']:.3f}, padding {pstats['padding_ratio']:.3f}")
    if outside := outside_language_model(model):
        log(multimodal_message(model, config, outside))
    elif dropped := parts_not_loaded(m.name_or_path, model):
        log(f"{type(model.get_base_model() if hasattr(model, 'get_base_model') else model).__name__}: transformers "
            f"loads this multimodal checkpoint for text generation as its language model alone: its "
            f"{', '.join(dropped)} part is not loaded, and what this run saves (a full model, a merged export) "
            "has none")
    if hasattr(model, "print_trainable_parameters"):
        distributed.on_main_process(model.print_trainable_parameters)
        if config.lora.target_modules == "all-linear" and (left := linears_left_out(model)):
            log(f"lora.target_modules all-linear: PEFT leaves {', '.join(left)} without an adapter")
    has_eval = bool(eval_ex)
    if not has_eval and (unused := [k for k in ("early_stopping_patience", "load_best_model_at_end")
                                    if getattr(config.training, k)]):
        log(f"training.{unused[0]}: no data.validation, so no evaluation: it does not apply to this run")
    if getattr(model.config, "output_router_logits", False) and (coef := router_aux_coefficient(model)) is not None:
        log(f"router load-balancing loss x {coef} added to the training loss (the model's config.output_router_logits)")
    liger = kernels.liger_kernel_config(config.training.use_liger_kernel, model.config)
    liger_layers = sorted(k for k, on in (liger or {}).items() if on)
    if liger_layers:
        log(f"Liger kernels: {', '.join(liger_layers)}")
    args = training_args(config, out, has_eval, use_bf16, liger)
    compile_norms, why_not = compiled_norms.wanted(
        config.training.compile_norms, device_type=device_type(),
        planned_tokens=planned_tokens(pstats, args), processes=distributed.world_size(),
        taken_by_liger=bool(liger and liger["rms_norm"]), whole_model_compiled=args.torch_compile)
    if why_not:
        log(f"compiled norms: {why_not}")
    patience = config.training.early_stopping_patience
    # with early stopping, the warning marks the onset that stops the run
    warn = OverfitWarningCallback(metrics_path=out / "metrics.jsonl", **({"patience": patience} if patience else {}))
    callbacks = [MetricsJsonlCallback(out / "metrics.jsonl"), warn, IdleAdaptersCallback(log)]
    if has_eval and patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=patience))
    nonfinite = NonFiniteGuard(config.training.skip_nonfinite_steps, last_good=lambda: last_good_checkpoint(out))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=RowDataset(rows),
        eval_dataset=RowDataset([[e] for e in eval_ex]) if has_eval else None,
        data_collator=partial(collate, flatten=flatten, bucket=bucket, sources=True),
        processing_class=tokenizer,
        callbacks=callbacks,
        warmup_ratio=config.training.scheduled_warmup_ratio,
        checkpoint_state=state,
        nonfinite=nonfinite,
        oom_message=partial(out_of_memory_message, config),
    )
    nonfinite.scaler_active = getattr(trainer.accelerator, "scaler", None) is not None
    distributed.attach(trainer)
    log(f"engine: {distributed.describe(trainer)}")
    if checkpoint is not None:
        trainer.restore_record(saved)
        log(f"resuming from {checkpoint} (step {saved['global_step']}, {saved['trained_tokens_seen']} trained tokens)")
    autocast_dtype = torch.bfloat16 if use_bf16 else torch.float16 if config.training.fp16 else None
    with compiled_norms.compiled_norms(model, autocast_dtype, required=config.training.compile_norms is True,
                                       log=log) if compile_norms else nullcontext(False) as norms_compiled:
        t_train = time.perf_counter()
        with tracker_errors(config.training.report_to):
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_seconds = time.perf_counter() - t_train
        run_seconds = trainer.seconds_restored + train_seconds  # the whole run's, resumes included
    train_loss = trainer.run_train_loss(result.training_loss, saved.get("global_step", 0))

    tokens_seen = trainer.trained_tokens_seen  # a collective call: every rank takes part
    save_outputs(out, {"model" if config.method == "full" else "adapter": partial(distributed.save_final_model, trainer),
                       "tokenizer": partial(distributed.on_main_process, tokenizer.save_pretrained)},
                 TRAIN_RESUME, main=main)
    info = {
        "base_model": portable_model_name(m.name_or_path),
        "method": config.method,
        "seed": config.training.seed,
        "data_fingerprint": train_stats.fingerprint,
        "train_data": {k: v for k, v in asdict(train_stats).items() if k != "dropped"},
        "validation_data": {k: v for k, v in asdict(eval_stats).items() if k != "dropped"} if eval_stats else None,
        "packing": pstats,
        "global_step": trainer.state.global_step,
        "train_loss": train_loss,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "train_seconds": round(run_seconds, 2),
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "bf16": use_bf16,
        "attention": model.config._attn_implementation,
        "liger_kernels": liger_layers,
        "compiled_norms": norms_compiled,
        "trainable_params": distributed.parameter_count(model, trainable_only=True),
        "trained_tokens_seen": tokens_seen,
        "trained_tokens_per_second": round((tokens_seen - trainer.trained_tokens_restored) / train_seconds, 1)
        if train_seconds else None,
        "nonfinite_steps_skipped": len(nonfinite.skipped),
        "nonfinite_skipped_steps": nonfinite.skipped,
        "processes": trainer.args.world_size,
        "engine": distributed.describe(trainer),
        "allocator": malloc,
        "finished": True,
    }
    with explained_save_failure("run.json and README.md", out, TRAIN_RESUME):
        distributed.on_main_process(write_run_json, out, info)
        distributed.on_main_process(atomic_write, out / "README.md",
                                    model_card(config, info, model_auto_class(model.config).__name__))
    log(f"run saved in {out} (train loss {train_loss:.4f}, {trainer.state.global_step} steps, {run_seconds:.0f}s)")
    return info


def multimodal_message(model, config: TrainConfig, outside: list[str]) -> str:
    """What a run on a multimodal model trains: its language model; the parts `outside` it (`outside_language_model`)
    get no adapter (LoRA) or stay frozen (full fine-tuning)."""
    from sftlab.models import part_parameters

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parts = ", ".join(outside)
    count = sum(p.numel() for part in outside for p in part_parameters(base, part))
    what = f"{type(base).__name__} is multimodal and the data is text"
    if config.method == "full":
        return (f"method full: {what}: the language model trains; {parts} ({count:,} parameters) stay frozen, "
                "as the base has them")
    if isinstance(config.lora.target_modules, str) and config.lora.target_modules != "all-linear":
        return f"lora.target_modules: {what}: the regular expression picks the layers it matches, {parts} included"
    return (f"lora.target_modules {config.lora.target_modules}: {what}: the language model's linear layers get "
            f"adapters; {parts} ({count:,} parameters) get none and stay as the base has them")


def portable_model_name(name: str) -> str:
    """Record local folders as absolute paths; ids and embedded names as they are."""
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name

