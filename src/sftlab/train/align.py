"""`align(config)`: DPO / ORPO / KTO after SFT, on TRL's trainers fed by our loaders and renderer.

- Data: preference files load through `sftlab.data.load` (same schemas, same file:line
  errors) and render through `sftlab.data.render` (train/preference.py); TRL's trainers get
  token ids, and their own tokenisation step (`_prepare_dataset`) is replaced by a pass-through.
- DPO: `trl.DPOTrainer`; KTO: `trl.KTOTrainer`; ORPO: our loss (train/orpo.py says why).
- Start: a base model, or an SFT run. From a LoRA run its adapter keeps training, and TRL keeps
  the adapter's starting weights as a frozen "ref" adapter (megabytes, not a model copy); from a
  run with a merged model, or a base, a new LoRA is added and the reference is the same weights
  with the adapter disabled. Full fine-tuning: a frozen copy of the starting model, or reference
  log-probs computed once before training (`align.precompute_ref_log_probs`).
- Crash safety as in `sftlab train` (train/checkpointing.py): checkpoints staged and renamed
  into place, `--resume` from the last good one (config and data checked), the non-finite
  guard, the final adapter or model written under a temporary name, clear messages on a full
  disk or no memory.
- Metrics: rewards/margins, rewards/accuracies, logps/chosen, logps/rejected (train, and eval_*
  on the validation pairs, also once before the first step) go to RUN/metrics.jsonl.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from dataclasses import fields
from functools import partial
from pathlib import Path

from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from sftlab.config import AlignConfig
from sftlab.errors import SftlabError
from sftlab.train.checkpointing import AtomicCheckpoints, explained_save_failure, save_outputs
from sftlab.train.guards import RecordsStepLosses
from sftlab.train.schedule import RatioWarmup

ALIGN_METRICS = ("rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


class RenderedDPOTrainer(AtomicCheckpoints, RatioWarmup, RecordsStepLosses, DPOTrainer):
    """DPOTrainer on rows that are already token ids (prompt_ids, chosen_ids, rejected_ids)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


class RenderedKTOTrainer(AtomicCheckpoints, RatioWarmup, RecordsStepLosses, KTOTrainer):
    """KTOTrainer on rows that are already token ids (prompt_ids, completion_ids, label)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not self.calculate_KL:
            return dataset
        size = args.per_device_train_batch_size if dataset_name == "train" else args.per_device_eval_batch_size
        return dataset.add_column("KL_completion_ids", mismatched_completions(dataset["completion_ids"], size))


def mismatched_completions(completions: list, batch_size: int) -> list:
    """KTO's KL estimate scores each prompt with another row's completion: within each batch of the loader (its
    sampler is sequential; `batch_size` is the training or the evaluation one) the completions rotated by one, as
    TRL builds them. A batch of one row (the last, where the rows do not fill it) takes the completion of the row
    before it: rotated alone it would get its own, and the KL estimate of that batch would be its reward (as
    TRL's rotation does; trl#1911 for the odd batch sizes of an earlier one)."""
    out = []
    for start in range(0, len(completions), batch_size):
        batch = completions[start:start + batch_size]
        out += batch[-1:] + batch[:-1] if len(batch) > 1 or not start else [completions[start - 1]]
    return out


def _peft_config(config: AlignConfig):
    from peft import LoraConfig

    lora = config.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                      use_dora=lora.use_dora, task_type="CAUSAL_LM")


def load_policy(config: AlignConfig, dtype: str, use_bf16: bool, tokenizer=None):
    """(model, peft_config for the trainer or None, where the saved weights apply).

    A LoRA run's adapter is loaded trainable; otherwise LoRA is left to the trainer (peft_config),
    so that TRL computes the reference with the adapter disabled. QLoRA: the same on a 4-bit base
    (a LoRA run's adapter keeps training on its base quantised). The embeddings are fitted to
    `tokenizer` first, as `sftlab train` fits them: a named chat template may have added tokens (to
    the SFT run's tokenizer, or now through model.chat_template); without their rows the ids of
    those tokens index past the embedding matrix. Full fine-tuning trains those rows with the rest;
    a LoRA would have to hold them as PEFT trainable tokens, which TRL's preference trainers cannot
    run (their fused LM head reads the head's own weight), so that is refused with the way round."""
    from peft import PeftModel

    from sftlab.models import check_weights, is_run_dir, run_artifacts
    from sftlab.train.trainer import quantization_config

    m = config.model
    attn = None if m.attn_implementation == "sftlab_varlen" else m.attn_implementation
    kwargs = {"dtype": dtype, "trust_remote_code": m.trust_remote_code, "attn_implementation": attn,
              "allow_pickle": m.allow_pickle or None,
              "quantization_config": quantization_config(config.method, use_bf16)}
    name = m.name_or_path
    art = run_artifacts(name) if is_run_dir(name) else None
    adapter = art["adapter"] if art and not art["model"] else None
    if adapter is None:
        start = art["model"] if art else name
        model = _load_start(config, start, kwargs, tokenizer)
        return model, (None if config.method == "full" else _peft_config(config)), start
    if config.method != "full" and _adapter_holds_token_rows(adapter):
        raise SftlabError(f"{name}: its adapter trains the embedding rows of tokens its chat template added, "
                          f"{_NO_TOKEN_ROWS}: merge the run (sftlab export {name} --to merged OUT) and align "
                          "from OUT (model.name_or_path=OUT), or align with method: full")
    check_weights(adapter, kwargs["allow_pickle"])
    base = _load_start(config, art["base"], kwargs, tokenizer)
    if config.method == "full":
        return PeftModel.from_pretrained(base, adapter).merge_and_unload(), None, art["base"]
    return PeftModel.from_pretrained(base, adapter, is_trainable=True), None, art["base"]


def _load_start(config: AlignConfig, path: str, kwargs: dict, tokenizer):
    """The starting weights (a LoRA run's base) with the embeddings fitted to `tokenizer`, ready for QLoRA.
    Refused for a LoRA when model.chat_template added tokens (load_policy says why)."""
    from sftlab.models import fit_embeddings, is_run_dir, load_model
    from sftlab.train.trainer import prepare_4bit_base

    model = load_model(path, **kwargs)
    new_token_rows = fit_embeddings(model, tokenizer) if tokenizer is not None else {}
    if new_token_rows and config.method != "full":
        m = config.model
        run = is_run_dir(m.name_or_path)
        own = "leave model.chat_template out (the run's tokenizer keeps its own), " if run else ""
        raise SftlabError(f"model.chat_template {m.chat_template} adds tokens to the tokenizer of {m.name_or_path}, "
                          f"whose new embedding rows a LoRA would train as PEFT trainable tokens, {_NO_TOKEN_ROWS}: "
                          f"{own}fine-tune with it first (sftlab train; SFT teaches the new tokens), merge that run "
                          "(sftlab export RUN --to merged OUT) and align from OUT, or align with method: full")
    return prepare_4bit_base(model, config.training.gradient_checkpointing) if config.method == "qlora" else model


_NO_TOKEN_ROWS = "which TRL's preference trainers cannot run with (their fused LM head reads the head's own weight)"


def _adapter_holds_token_rows(adapter_dir: str) -> bool:
    """Whether a saved adapter trains embedding rows through PEFT's trainable tokens."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return bool(config.get("trainable_token_indices"))


def trl_args(cls, config: AlignConfig, out: Path, has_eval: bool, use_bf16: bool, **extra):
    """`cls` (TrainingArguments or a TRL config) with the same values `sftlab train` uses."""
    from transformers import TrainingArguments

    from sftlab.train.trainer import training_args

    base = training_args(config, out, has_eval, use_bf16)
    shared = {f.name: getattr(base, f.name) for f in fields(TrainingArguments) if f.init}
    shared.update(gradient_checkpointing=config.training.gradient_checkpointing, **extra)
    return cls(**shared)


def build_trainer(config: AlignConfig, model, peft_config, tokenizer, train_rows, eval_rows, out: Path,
                  use_bf16: bool, callbacks=()):
    from datasets import Dataset

    a = config.align
    has_eval = bool(eval_rows)
    train_ds = Dataset.from_list(train_rows)
    eval_ds = Dataset.from_list(eval_rows) if has_eval else None
    common = dict(train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer, callbacks=list(callbacks))
    full = config.method == "full"
    ref_model = None
    if full and a.loss != "orpo" and not a.precompute_ref_log_probs:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    max_len = config.data.max_seq_length
    if a.loss == "dpo":
        losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, a.sft_weight]} if a.sft_weight else {}
        args = trl_args(DPOConfig, config, out, has_eval, use_bf16, beta=a.beta, max_length=max_len,
                        precompute_ref_log_probs=a.precompute_ref_log_probs, **losses)
        return RenderedDPOTrainer(model=model, ref_model=ref_model, args=args, peft_config=peft_config, **common)
    if a.loss == "kto":
        # TRL's KL estimate pairs each row with its neighbour in a fixed-order batch, so the
        # sampler is sequential: the rows are shuffled once here instead.
        if config.training.per_device_train_batch_size < 2:
            raise SftlabError("align.loss kto needs training.per_device_train_batch_size >= 2 (its KL estimate "
                              "pairs each example with another one of the batch)")
        train_rows = list(train_rows)
        random.Random(config.training.seed).shuffle(train_rows)
        common["train_dataset"] = Dataset.from_list(train_rows)
        args = trl_args(KTOConfig, config, out, has_eval, use_bf16, beta=a.beta, max_length=max_len,
                        train_sampling_strategy="sequential",
                        precompute_ref_log_probs=a.precompute_ref_log_probs, desirable_weight=a.desirable_weight,
                        undesirable_weight=a.undesirable_weight)
        return RenderedKTOTrainer(model=model, ref_model=ref_model, args=args, peft_config=peft_config, **common)
    from transformers import TrainingArguments
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from sftlab.train.orpo import ORPOTrainer

    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    args = trl_args(TrainingArguments, config, out, has_eval, use_bf16)
    return ORPOTrainer(model=model, args=args, beta=a.beta, data_collator=DataCollatorForPreference(pad_token_id=pad),
                       **common)


RESUME = "sftlab align CONFIG --resume"  # what a message about a failed save suggests


def rows_digest(rows: list[dict]) -> str:
    """Hash of what training sees: every row's token ids (and label), in order."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def align(config: AlignConfig, *, resume: bool = False, log=print) -> dict:
    """Run preference tuning (or continue it from its last checkpoint); returns the run summary
    written to RUN/run.json."""
    from transformers import set_seed

    from sftlab.files import atomic_write
    from sftlab.models import load_tokenizer, save_adapter
    from sftlab.train.callbacks import MetricsJsonlCallback
    from sftlab.train.guards import NonFiniteGuard
    from sftlab.train.preference import load_preferences
    from sftlab.train.run_dir import (checkpoint_state, discard_interrupted_saves, finished_run, last_good_checkpoint,
                                      model_card, refuse_existing_run, resume_point, write_run_json)
    from sftlab.train.preflight import preflight, wants_bf16
    from sftlab.train.trainer import base_weights_dtype, portable_model_name

    preflight(config)
    if config.training.use_liger_kernel is True:
        raise SftlabError("training.use_liger_kernel: sftlab align trains with transformers' own layers; "
                          "leave it at auto or false")
    out = Path(config.output_dir)
    if not resume:
        refuse_existing_run(out)
    for name in discard_interrupted_saves(out):
        log(f"discarded {name}: its saving was interrupted")
    t_start = time.perf_counter()
    m, a = config.model, config.align
    tokenizer = load_tokenizer(m.name_or_path, trust_remote_code=m.trust_remote_code, chat_template=m.chat_template)
    paired = a.loss != "kto"
    train_rows, train_stats = load_preferences(config.data.train, tokenizer, config.data, paired=paired,
                                               rejects_path=out / "rejects.jsonl")
    log(train_stats.summary())
    if not paired:
        _warn_if_kto_unbalanced(train_stats.desirable, train_stats.rows - train_stats.desirable, a)
    eval_rows, eval_stats = [], None
    if config.data.validation:
        eval_rows, eval_stats = load_preferences(config.data.validation, tokenizer, config.data, paired=paired,
                                                 rejects_path=out / "rejects.validation.jsonl")
        log(eval_stats.summary())
    state = checkpoint_state(config, {"train": rows_digest(train_rows),
                                      **({"validation": rows_digest(eval_rows)} if eval_rows else {})})
    checkpoint, saved = resume_point(out, state, resume, log)
    if (done := finished_run(out, saved, state, log)) is not None:
        return done
    use_bf16 = wants_bf16(config)
    dtype = base_weights_dtype(config.method, use_bf16) if m.dtype == "auto" else m.dtype
    set_seed(config.training.seed)
    model, peft_config, base = load_policy(config, dtype, use_bf16, tokenizer)
    # the run starts: out/ appears (earlier only with the data's rejects.jsonl)
    atomic_write(out / "config.yaml", config.to_yaml())
    model.config.use_cache = False
    nonfinite = NonFiniteGuard(config.training.skip_nonfinite_steps, last_good=lambda: last_good_checkpoint(out))
    trainer = build_trainer(config, model, peft_config, tokenizer, train_rows, eval_rows, out, use_bf16,
                            callbacks=[MetricsJsonlCallback(out / "metrics.jsonl"), nonfinite])
    trainer.checkpoint_state, trainer.nonfinite, trainer.resume_command = state, nonfinite, RESUME
    trainer.warmup_ratio = config.training.scheduled_warmup_ratio
    if checkpoint is not None:
        trainer.restore_record(saved)
        log(f"resuming from {checkpoint} (step {saved['global_step']})")
    before = _eval_before(trainer, out, resuming=checkpoint is not None) if eval_rows else {}
    t_train = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - t_train
    run_seconds = trainer.seconds_restored + train_seconds  # the whole run's, resumes included
    train_loss = trainer.run_train_loss(result.training_loss, saved.get("global_step", 0))
    after = _final_eval(trainer) if eval_rows else {}

    final = trainer.model
    if config.method == "full":
        weights = {"model": partial(final.save_pretrained, safe_serialization=True)}
    else:
        weights = {"adapter": partial(save_adapter, final, selected_adapters=["default"])}
    save_outputs(out, {**weights, "tokenizer": tokenizer.save_pretrained}, RESUME)
    info = {
        "base_model": portable_model_name(base),
        "method": config.method,
        "align": {"loss": a.loss, "beta": a.beta, "sft_weight": a.sft_weight,
                  "start": portable_model_name(m.name_or_path),
                  "reference": _reference_kind(config, peft_config)},
        "seed": config.training.seed,
        "train_data": vars(train_stats) | {"dropped": len(train_stats.dropped)},
        "validation_data": (vars(eval_stats) | {"dropped": len(eval_stats.dropped)}) if eval_stats else None,
        "eval_before": _align_metrics(before),
        "eval_after": _align_metrics(after),
        "global_step": trainer.state.global_step,
        "train_loss": train_loss,
        "train_seconds": round(run_seconds, 2),
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "bf16": use_bf16,
        "trainable_params": sum(p.numel() for p in final.parameters() if p.requires_grad),
        "nonfinite_steps_skipped": len(nonfinite.skipped),
        "nonfinite_skipped_steps": nonfinite.skipped,
        "finished": True,
    }
    with explained_save_failure("run.json and README.md", out, RESUME):
        write_run_json(out, info)
        atomic_write(out / "README.md", model_card(config, info))
    log(f"run saved in {out} ({a.loss}, train loss {train_loss:.4f}, {trainer.state.global_step} steps, "
        f"{run_seconds:.0f}s)")
    if after:
        log("held-out pairs: " + ", ".join(f"{k} {before.get('eval_' + k, float('nan')):.3f} -> "
                                           f"{after.get('eval_' + k, float('nan')):.3f}"
                                           for k in ALIGN_METRICS if "eval_" + k in after))
    return info


def _reference_kind(config: AlignConfig, peft_config) -> str:
    if config.align.loss == "orpo":
        return "none"
    if config.method == "full":
        return "precomputed log-probs" if config.align.precompute_ref_log_probs else "frozen copy"
    return "adapter disabled" if peft_config is not None else "frozen copy of the SFT adapter"


def _warn_if_kto_unbalanced(good: int, bad: int, a) -> None:
    """KTO learns from desirable and undesirable answers against each other; the KTO paper recommends
    desirable_weight x desirable / (undesirable_weight x undesirable) in [1, 4/3] (TRL's own check, which
    sftlab's rendered dataset replaces, says the same)."""
    import warnings

    if not good or not bad:
        warnings.warn(f"KTO on {good} desirable and {bad} undesirable answers: it learns from one kind only "
                      "(give it answers labelled true and false)", stacklevel=2)
        return
    ratio = a.desirable_weight * good / (a.undesirable_weight * bad)
    if not 1 <= ratio <= 4 / 3:
        fix = (f"align.desirable_weight: {a.undesirable_weight * bad / good:.2f}" if ratio < 1
               else f"align.undesirable_weight: {a.desirable_weight * good / bad:.2f}")
        warnings.warn(f"KTO weights: desirable_weight x {good} desirable / (undesirable_weight x {bad} undesirable) "
                      f"= {ratio:.2f}, outside the [1, 4/3] the KTO paper recommends (e.g. {fix})", stacklevel=2)


def _eval_before(trainer, out: Path, resuming: bool) -> dict:
    """The held-out metrics of the starting weights: evaluated once, in the first session (under the
    autocast training runs in, as the frozen reference's forward is: outside it the policy alone would
    run in fp32, and the two would differ before any step); a resumed run reads them back."""
    if not resuming:
        with trainer.accelerator.autocast():
            return trainer.evaluate()
    from sftlab.evaluation.curves import metric_events

    metrics = out / "metrics.jsonl"
    events = metric_events(metrics) if metrics.exists() else ()  # a line cut by the crash is skipped
    return next((e for e in events if e.get("step") == 0 and "eval_loss" in e), {})


def _final_eval(trainer) -> dict:
    """The evaluation at the last step: the one logged there, or a new one."""
    last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return last
    return trainer.evaluate()


def _align_metrics(metrics: dict) -> dict:
    return {k: metrics["eval_" + k] for k in ALIGN_METRICS if "eval_" + k in metrics}
