"""The typed training config: YAML file + `key.sub=value` overrides.

Unknown keys are errors that name the closest valid key. Field names match
`transformers.TrainingArguments` where they overlap, so they mean what HF users expect.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from sftlab.data.curate import CurateOptions
from sftlab.data.formats import FORMATS, Columns
from sftlab.errors import SftlabError
from sftlab.train.distributed import DEEPSPEED_CONFIGS
from sftlab.yamlio import safe_load


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = Field("default", description="HF folder, hub id, .gguf file, or 'default' (embedded SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)).")
    chat_template: str | None = Field(None, description="Chat template: a named one (chatml, llama3, mistral, gemma, alpaca; adds the special tokens it needs), a .jinja file, or Jinja text. Default: the tokenizer's.")
    trust_remote_code: bool = Field(False, description="Run model code from the hub repo. Off unless you trust it.")
    allow_pickle: bool = Field(False, description="Also load pickle weights (pytorch_model.bin, ...), which can run code when loaded. Off: safetensors only.")
    attn_implementation: str | None = Field(None, description="sftlab_varlen | sdpa | eager | flash_attention_2 (default: sftlab_varlen, padding-free, where the model supports it).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype on load (auto: bf16 for a LoRA base when training in bf16, else fp32).")


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input (0, PEFT's default; 0.05-0.1 regularises; a step takes ~10 % longer on a CPU: noise for every adapted layer's input).")
    target_modules: list[str] | str = Field("all-linear", description="Module names to adapt, or 'all-linear'.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")


class DataConfig(Section):
    train: str = Field(..., min_length=1, description="Training data: .jsonl/.json/.csv/.parquet, a saved HF dataset folder or a folder of data files, or a hub id.")
    validation: str | None = Field(None, description="Validation data (same formats); enables eval loss and early stopping.")
    format: str | None = Field(None, description=f"Schema: {' | '.join(FORMATS)} (default: detect).")
    columns: Columns | None = Field(None, description="Which column is which, for data in no detected schema: {prompt, response, input?, system?}, {messages, system?} or {text} -> column names.")
    split: str | None = Field(None, description="Split name for HF datasets.")
    train_on: Literal["all", "last"] = Field("all", description="Train on all assistant turns or only the last.")
    max_seq_length: int = Field(1024, ge=8, description="Longest example in tokens.")
    truncation: Literal["drop", "truncate"] = Field("drop", description="What to do with longer chat examples (counted and reported); raw text is split into blocks instead (see stride).")
    on_error: Literal["raise", "skip"] = Field("raise", description="Bad records: stop with file:line, or skip into rejects.jsonl.")
    packing: bool = Field(True, description="Bin-pack examples into rows of max_seq_length (padding-free either way). Refused, before training, for a model in which examples sharing a row would see each other (convolution or state-space layers: LFM2, Mamba; a mask that ignores the restarts).")
    stride: int = Field(1, ge=1, description="Raw text: a document longer than max_seq_length is split into blocks; each block repeats this many tokens from the previous one as context, not trained again (at least 1: a block's first token has nothing to be predicted from).")
    curate: CurateOptions | None = Field(None, description="Curate the training data before rendering (dedup, filters, ...; see `sftlab data curate`).")


# TrainingArguments fields that sftlab sets itself, and where to say what they would say.
SET_BY_SFTLAB = {
    "output_dir": "the top-level output_dir (checkpoints go to OUTPUT_DIR/checkpoints)",
    "remove_unused_columns": "nothing: sftlab's collator needs every column it is given",
    "use_cpu": "nothing: sftlab uses the GPU when there is one; hide it with CUDA_VISIBLE_DEVICES=''",
    "data_seed": "training.seed (it seeds the data order too)",
    "save_strategy": "training.save_steps",
    "logging_first_step": "nothing: the first step is always logged",
    "prediction_loss_only": "nothing: evaluation computes the loss only",
    "metric_for_best_model": "nothing: the best checkpoint is the one with the lowest eval_loss",
    "greater_is_better": "nothing: the best checkpoint is the one with the lowest eval_loss",
    "accelerator_config": "distributed: (sftlab configures accelerate for the engine)",
    "liger_kernel_config": "training.use_liger_kernel (sftlab picks the layers: RMSNorm, RoPE, SwiGLU; its own fused loss)",
    **dict.fromkeys(("activation_checkpointing", "activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"),
                    "training.gradient_checkpointing (applied before the LoRA wrapping, non-reentrant)"),
}


class TrainingConfig(Section):
    """transformers.TrainingArguments by the same names: the fields below are typed and checked
    here; any other TrainingArguments field passes through as given (checked by name against
    TrainingArguments itself, with the closest-key hint for a misspelling)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    learning_rate: float = Field(2e-4, gt=0)
    per_device_train_batch_size: int = Field(8, ge=1, description="Rows per device per step (a row is one packed sequence, or one example without packing).")
    per_device_eval_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="If > 0, overrides num_train_epochs.")
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optim: str = "adamw_torch_fused"  # transformers' own default: one fused kernel, no temporaries
    seed: int = 42
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(200, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: logging_steps when validation data is given).")
    bf16: bool | Literal["auto"] = Field("auto", description="bf16 mixed precision (auto: on when the device supports bf16 matmuls).")
    fp16: bool = Field(False, description="fp16 mixed precision with loss scaling, for GPUs without bf16 (turns bf16 auto off).")
    gradient_checkpointing: bool = False
    use_liger_kernel: bool | Literal["auto"] = Field("auto", description="Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (auto: on a CUDA GPU where liger-kernel is installed, for the architectures checked against transformers' layers: llama, qwen2; true: any it has kernels for; sftlab train only). The lm_head + loss stay sftlab's fused ones.")
    compile_norms: bool | Literal["auto"] = Field("auto", description="Compile the model's RMSNorm layers with torch.compile (one fused kernel each way instead of a chain of small ops; ~1.1x a step and fewer activations on a CPU). auto: on a single-process CPU run that computes at least 100,000 tokens, which repays the first compile (~15 s on 2 cores, ~2 s from inductor's cache after); true: any run; false: transformers' layers.")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after N evaluations without improving eval_loss.")
    load_best_model_at_end: bool = False
    skip_nonfinite_steps: bool = Field(False, description="On a NaN/inf loss or gradient, skip the step (no weight update; counted in run.json) instead of stopping the run.")
    dataloader_num_workers: int = Field(0, ge=0)
    report_to: list[str] = Field(default_factory=list)

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_name(cls, value: Any) -> Any:
        """One name, as TrainingArguments takes it too: `report_to: wandb`, `all`; `none` is no tracker."""
        if isinstance(value, str):
            return [] if value == "none" else [value]
        return value

    @model_validator(mode="after")
    def _passthrough_names(self) -> TrainingConfig:
        extra = self.model_extra or {}
        if extra:
            known = training_argument_names()
            values = self.passthrough()
            for key in extra:
                if key in SET_BY_SFTLAB:
                    raise PydanticCustomError("set_by_sftlab", "set by sftlab", {"key": key, "instead": SET_BY_SFTLAB[key]})
                if key not in known:
                    hint = moved_key(key, "training")
                    close = difflib.get_close_matches(key, [*type(self).model_fields, *known], n=1, cutoff=0.6)
                    hint = hint or (f"training.{close[0]}" if close else "")
                    raise PydanticCustomError("unknown_training_argument", "unknown key", {"key": key, "hint": hint})
                if (wrong := passthrough_type_error(key, values[key])) is not None:
                    raise PydanticCustomError("training_argument_type", "wrong type", {"key": key, "expected": wrong})
        if self.fp16 and self.bf16 is True:
            raise ValueError("fp16 and bf16 are both on: choose one mixed precision")
        if "warmup_steps" in extra and self.warmup_ratio != type(self).model_fields["warmup_ratio"].default:
            raise ValueError("warmup_steps and warmup_ratio are both given: choose one")
        return self

    @property
    def scheduled_warmup_ratio(self) -> float | None:
        """The warm-up as a ratio of the run's steps, or None when `warmup_steps` gives it in steps
        (an explicit warmup_steps wins over warmup_ratio's default)."""
        return None if "warmup_steps" in (self.model_extra or {}) else self.warmup_ratio

    def passthrough(self) -> dict[str, Any]:
        """The TrainingArguments fields given by their HF names beyond the typed ones above.
        YAML reads a bare `no` as false: for a string field (eval_strategy: no) it means "no"."""
        extra = dict(self.model_extra or {})
        strings = training_argument_names(str) if False in extra.values() else set()
        return {k: "no" if v is False and k in strings else v for k, v in extra.items()}


# Keys sftlab types and checks when the run starts, not here: the engine settings (distributed.py).
ENGINE_KEYS = frozenset({"deepspeed", "fsdp", "fsdp_config"})


def passthrough_type_error(key: str, value: Any) -> str | None:
    """The type TrainingArguments declares for `key` when `value` is not one (None when it is):
    a dataclass does not check its fields, so `torch_compile: maybe` would turn compiling on
    and `ddp_timeout: soon` fail deep inside a run."""
    import typing

    from transformers import TrainingArguments

    if key in ENGINE_KEYS:
        return None
    hint = typing.get_type_hints(TrainingArguments).get(key)
    try:
        TypeAdapter(hint).validate_python(value)
    except ValidationError:
        return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    except Exception:  # a type pydantic cannot check: transformers checks it when training starts
        return None
    return None


def training_argument_names(default_type: type | None = None) -> set[str]:
    """Fields of transformers.TrainingArguments (all, or those whose default is a `default_type`);
    imports transformers, so only on demand."""
    import dataclasses

    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_")
            and (default_type is None or isinstance(f.default, default_type))}


class DistributedConfig(Section):
    """How several processes train together (see docs/scaling.md). With one process, ddp is plain
    single-process training, while deepspeed and fsdp still run, as a world of one.

    Shorthand: `distributed: zero3` (or ddp, zero2, zero2_offload, zero3_offload, fsdp, or a
    path to a DeepSpeed .json / FSDP .yaml file; a .json names DeepSpeed, set engine: fsdp with
    fsdp: FILE.json for an FSDP one)."""

    engine: Literal["ddp", "deepspeed", "fsdp"] = Field("ddp", description="ddp: full copy per process; deepspeed: ZeRO-2/3 (+offload); fsdp: FSDP2 fully_shard.")
    deepspeed: str = Field("zero3", description="DeepSpeed config: zero2 | zero2_offload | zero3 | zero3_offload (shipped in configs/) or a path to a JSON file.")
    fsdp: str = Field("fsdp", description="FSDP config: 'fsdp' (configs/fsdp.json) or a path to a JSON/YAML fsdp_config file.")

    @model_validator(mode="after")
    def _files(self) -> DistributedConfig:
        if self.deepspeed not in DEEPSPEED_CONFIGS and not self.deepspeed.endswith(".json"):
            raise ValueError(f"deepspeed: '{self.deepspeed}' is not one of {', '.join(DEEPSPEED_CONFIGS)} nor a .json file")
        if self.fsdp != "fsdp" and not self.fsdp.endswith((".yaml", ".yml", ".json")):
            raise ValueError(f"fsdp: '{self.fsdp}' is neither 'fsdp' nor a .yaml/.json file")
        return self

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value in ("ddp", "fsdp"):
            return {"engine": value}
        if value in DEEPSPEED_CONFIGS or value.endswith(".json"):
            return {"engine": "deepspeed", "deepspeed": value}
        if value.endswith((".yaml", ".yml")):
            return {"engine": "fsdp", "fsdp": value}
        raise PydanticCustomError(
            "distributed", "'{value}' is not ddp, zero2, zero2_offload, zero3, zero3_offload, fsdp, or a .json/.yaml file", {"value": value}
        )


SpaceRange = dict[Literal["log_uniform", "uniform", "int"], tuple[float, float]]


class SweepConfig(Section):
    """Hyper-parameter search for `sftlab sweep` (ignored by `sftlab train`)."""

    space: dict[str, list[Any] | SpaceRange] = Field(..., description="Dotted config key -> list of choices, or {log_uniform|uniform|int: [low, high]}.")
    objective: str = Field("eval_loss", description="eval_loss (of the model the run keeps: its last evaluation, or its best checkpoint's under early stopping or load_best_model_at_end), or a metric name of `sftlab eval --metrics` on data.validation (exact_match, macro_f1 or its alias f1, rougeL, bleu, accuracy, ...).")
    direction: Literal["minimize", "maximize"] | None = Field(None, description="Default: minimize for a loss or perplexity, maximize for any other metric.")
    sampler: Literal["tpe", "random", "grid"] = Field("tpe", description="Optuna sampler; grid needs a space of choices only.")
    pruner: Literal["median", "none"] = Field("median", description="Stop a trial whose eval_loss is worse than the median of earlier trials at the same step.")
    prune_after_trials: int = Field(2, ge=0, description="Trials that run to the end before pruning starts.")
    seed: int = Field(0, description="Sampler seed.")
    eval_limit: int | None = Field(None, ge=1, description="Validation examples scored by `sftlab eval` per trial (metric objectives).")

    @field_validator("space", mode="before")
    @classmethod
    def _space_shapes(cls, space):
        """One line for a key given neither a list nor a range (pydantic would list every union branch)."""
        for key, spec in (space or {}).items() if isinstance(space, dict) else ():
            if not isinstance(spec, (list, dict)):
                raise ValueError(f"'{key}': {spec!r} is one value: give a list of choices ([{spec!r}, ...]) or a "
                                 "range ({log_uniform|uniform|int: [low, high]}); a fixed value goes outside sweep.space")
            if isinstance(spec, dict) and not set(spec) <= {"log_uniform", "uniform", "int"}:
                nested = "" if "." in key else ("; the space's keys are dotted config keys: lora.r, not lora: {r: ...} "
                                                "(on the command line: sweep.space.lora.r=[8,16])")
                raise ValueError(f"'{key}': a range is {{log_uniform|uniform|int: [low, high]}}, not {spec}{nested}")
        return space

    @model_validator(mode="after")
    def _check_space(self) -> SweepConfig:
        if not self.space:
            raise ValueError("the search space is empty")
        for key, spec in self.space.items():
            if isinstance(spec, list) and not spec:
                raise ValueError(f"'{key}': no choices")
            if isinstance(spec, dict):
                if len(spec) != 1:
                    raise ValueError(f"'{key}': give exactly one of log_uniform, uniform, int")
                (kind, (low, high)), = spec.items()
                if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
                    raise ValueError(f"'{key}': int needs integer bounds, got [{low:g}, {high:g}]")
                if not low < high or (kind == "log_uniform" and low <= 0):
                    raise ValueError(f"'{key}': {kind} needs 0 < low < high" if kind == "log_uniform" else f"'{key}': {kind} needs low < high")
        if self.sampler == "grid" and any(isinstance(s, dict) for s in self.space.values()):
            raise ValueError("sampler 'grid' needs every parameter as a list of choices")
        return self


class TrainConfig(Section):
    """Everything `sftlab train` needs; `sftlab train CONFIG key.sub=value ...`."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    method: Literal["full", "lora", "dora", "qlora"] = Field("lora", description="full fine-tuning, LoRA, DoRA, or QLoRA (4-bit base).")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Engine when started on several processes (sftlab train --nproc N, torchrun, accelerate launch).")
    output_dir: str = Field("runs/latest", description="Run directory (created; a resumed run continues in it).")
    sweep: SweepConfig | None = Field(None, description="Search space and objective for `sftlab sweep` (its keys: docs/sweep.md).")

    @model_validator(mode="after")
    def _dora(self) -> TrainConfig:
        if self.method == "dora":
            self.lora.use_dora = True
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class AlignOptions(Section):
    """The preference-tuning step of `sftlab align` (the `align:` section)."""

    loss: Literal["dpo", "orpo", "kto"] = Field("dpo", description="dpo: pairs vs a reference model; orpo: pairs, no reference model (SFT + odds ratio); kto: unpaired good/bad answers vs a reference model.")
    beta: float = Field(0.1, gt=0, description="DPO/KTO: how far from the reference the model may move (higher: less); ORPO: weight of the odds-ratio term (lambda).")
    sft_weight: float = Field(0.0, ge=0, description="DPO: weight of an SFT term (mean NLL of the chosen answer) added to the DPO loss, as in RPO; keeps the chosen answer likely while the margin grows (0: plain DPO).")
    precompute_ref_log_probs: bool = Field(False, description="Full fine-tuning with DPO/KTO: score the data with the reference once before training instead of keeping a frozen copy in memory.")
    desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the desirable (label true) examples.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the undesirable (label false) examples.")

    @model_validator(mode="after")
    def _sft_weight_is_dpo_only(self) -> AlignOptions:
        if self.sft_weight and self.loss != "dpo":
            raise ValueError(f"align.sft_weight applies to loss dpo only (ORPO has its own SFT term; this is {self.loss})")
        return self


class AlignConfig(TrainConfig):
    """Everything `sftlab align` needs: the training config plus `align:`. `model.name_or_path`
    may be a base model or an SFT run directory (its adapter keeps training, or its merged model)."""

    align: AlignOptions = Field(default_factory=AlignOptions)

    @model_validator(mode="after")
    def _data_options_that_apply(self) -> AlignConfig:
        """Pairs are scored on their last assistant turn, unpacked, and dropped when too long: the data
        options that would do otherwise are refused rather than ignored (train_on and packing do not apply)."""
        if self.data.curate is not None:
            raise ValueError("data.curate does not apply to sftlab align: curate the pairs first "
                             "(sftlab data curate PAIRS --out CLEAN), then align on CLEAN")
        if self.data.truncation == "truncate":
            raise ValueError("data.truncation: truncate does not apply to sftlab align: a pair over "
                             "data.max_seq_length is dropped and counted (a cut answer would be scored as a whole one)")
        if (self.training.model_extra or {}).get("label_smoothing_factor"):
            raise ValueError("training.label_smoothing_factor smooths sftlab train's cross-entropy; the preference "
                             "losses of sftlab align do not read it")
        weights = {k for k in ("desirable_weight", "undesirable_weight") if getattr(self.align, k) != 1.0}
        if weights and self.align.loss != "kto":
            raise ValueError(f"align.{sorted(weights)[0]} applies to loss kto only (this is {self.align.loss})")
        return self


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise SftlabError(f"override '{dotted}': '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """`a.b=1 c=x` -> nested dict; values are parsed as YAML scalars (1e-4, true, [a, b])."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise SftlabError(f"override '{item}' is not key=value (e.g. training.learning_rate=1e-4)")
        key, raw = item.split("=", 1)
        if not key.strip() or "" in key.strip().split("."):
            raise SftlabError(f"override '{item}' has an empty key (e.g. training.learning_rate=1e-4)")
        try:
            value = safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_path(tree, key.strip(), value)
    return tree


def merge_trees(base: dict, extra: dict) -> dict:
    """`extra` over `base`, nested sections merged key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_trees(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# What TRL, Axolotl and HF example scripts call sftlab's keys (the key's last part -> sftlab's key).
FOREIGN_KEYS = {
    **dict.fromkeys(("lr",), "training.learning_rate"),
    **dict.fromkeys(("batch_size", "micro_batch_size", "train_batch_size", "per_device_batch_size"),
                    "training.per_device_train_batch_size"),
    **dict.fromkeys(("epochs", "num_epochs"), "training.num_train_epochs"),
    **dict.fromkeys(("gradient_accumulation", "grad_accum"), "training.gradient_accumulation_steps"),
    **dict.fromkeys(("max_seq_length", "max_length", "max_seq_len", "sequence_len", "seq_len", "cutoff_len"),
                    "data.max_seq_length"),
    **dict.fromkeys(("packing", "sample_packing"), "data.packing"),
    **dict.fromkeys(("lora_r", "rank"), "lora.r"),
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    **dict.fromkeys(("lora_target_modules", "target_modules"), "lora.target_modules"),
    "use_dora": "lora.use_dora",
    **dict.fromkeys(("base_model", "model_name_or_path", "model_name"), "model.name_or_path"),
    **dict.fromkeys(("dataset", "datasets", "dataset_name", "train_file", "path"), "data.train"),
    **dict.fromkeys(("eval_dataset", "eval_file", "validation_file", "val_set", "val", "eval"), "data.validation"),
    **dict.fromkeys(("dataset_text_field",), "data.columns"),
    **dict.fromkeys(("assistant_only_loss", "completion_only_loss", "train_on_inputs"), "data.train_on"),
    **dict.fromkeys(("adapter", "peft", "use_peft"), "method"),
}


def moved_key(name: str, section: str) -> str | None:
    """Where sftlab keeps a key given in the wrong section (`learning_rate` at the top level) or by
    another tool's name (`training.lora_r`, `micro_batch_size`); None when it knows no such key."""
    if section not in ("", "model", "data", "lora", "training", "distributed"):
        return None
    found = FOREIGN_KEYS.get(name)
    if found is None:
        for sec, field in TrainConfig.model_fields.items():
            sub = [a for a in (field.annotation, *get_args(field.annotation)) if isinstance(a, type) and issubclass(a, Section)]
            if sub and name in sub[0].model_fields and sec != "sweep":
                found = f"{sec}.{name}"
                break
    if found is None and section != "training" and name in training_argument_names():
        found = f"training.{name}"
    return found if found and found != f"{section}.{name}".lstrip(".") else None


def _given_value(tree: Any, key: str) -> Any:
    return tree.get(key) if isinstance(tree, dict) else tree


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        models = [a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not models:  # `Section | None` counts as the section
            return []
        model = models[0]
    return list(model.model_fields)


def _explain(err: ValidationError, model: type[BaseModel], origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc)
        if e["type"] == "unknown_training_argument":
            ctx = e["ctx"]
            hint = f"; did you mean '{ctx['hint']}'?" if ctx["hint"] else " (not a TrainingArguments field either)"
            lines.append(f"unknown key '{where}.{ctx['key']}'{hint}")
        elif e["type"] == "training_argument_type":
            ctx = e["ctx"]
            lines.append(f"'{where}.{ctx['key']}': TrainingArguments takes {ctx['expected']} "
                         f"(got {_given_value(e.get('input'), ctx['key'])!r})")
        elif e["type"] == "set_by_sftlab":
            lines.append(f"'{where}.{e['ctx']['key']}' is set by sftlab; use {e['ctx']['instead']}")
        elif e["type"] == "extra_forbidden":
            moved = moved_key(str(loc[-1]), ".".join(map(str, loc[:-1])))
            close = [moved] if moved else [".".join([*map(str, loc[:-1]), c]) for c in
                                           difflib.get_close_matches(str(loc[-1]), _field_names(model, loc), n=1, cutoff=0.5)]
            hint = f"; did you mean '{close[0]}'?" if close else ""
            if loc == ("align",):
                hint = " (an alignment config: run it with sftlab align)"
            lines.append(f"unknown key '{where}'{hint}")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{where}'")
        elif e["type"] == "value_error":  # a validator's own sentence, which names its keys
            got = e.get("input")
            said = e["msg"].removeprefix("Value error, ") + ("" if isinstance(got, (dict, list)) else f" (got {got!r})")
            lines.append(f"'{where}': {said}" if where else said)
        else:
            lines.append(f"'{where}': {e['msg']} (got {e.get('input')!r})")
    return f"{origin}: " + "; ".join(lines)


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file of options; a missing file, bad YAML (file:line) or a non-mapping is one error."""
    p = Path(path)
    if not p.is_file():
        raise SftlabError(f"config file not found: {p}")
    try:
        tree = safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise SftlabError(f"{p}{where}: invalid YAML: {getattr(e, 'problem', e)}") from e
    except UnicodeDecodeError as e:
        raise SftlabError(f"{p}: not UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
    if not isinstance(tree, dict):
        raise SftlabError(f"{p}: a config must be a mapping of keys to values")
    return tree


def load_config(path: str | Path | None, overrides: list[str] | None = None, cls: type[BaseModel] = TrainConfig):
    """Read YAML (optional) + overrides into a validated config; errors are one line."""
    tree = read_yaml_mapping(path) if path is not None else {}
    given = parse_overrides(overrides or [])
    tree = merge_trees(tree, given)
    try:
        config = cls.model_validate(tree)
    except ValidationError as e:
        from_overrides = all(_given_at(given, e_["loc"]) for e_ in e.errors())
        raise SftlabError(_explain(e, cls, "overrides" if path is None or from_overrides else str(path))) from None
    if path is not None:
        _refuse_paths_beside_config(config, given, Path(path))
    return config


def _refuse_paths_beside_config(config: BaseModel, given: dict, path: Path) -> None:
    """A relative path in the file that is missing from the current directory but lies beside the
    config file: the user meant it from the config's folder, while sftlab reads it from the
    current one (docs/configuration.md). Said now, in one line, not as 'file not found' later."""
    for dotted in ("data.train", "data.validation", "model.name_or_path", "model.chat_template"):
        section, key = dotted.split(".")
        value = getattr(getattr(config, section, None), key, None)
        if not isinstance(value, str) or _given_at(given, (section, key)) or value == "default":
            continue
        rel = Path(value).expanduser()
        beside = path.parent / rel
        if rel.is_absolute() or rel.exists() or not beside.exists() or path.parent.resolve() == Path.cwd().resolve():
            continue
        raise SftlabError(f"{path}: {dotted} '{value}' is not in the current directory ({Path.cwd()}) but is beside "
                          f"the config ({beside}): relative paths in a config are read from the directory sftlab "
                          f"runs in; run it from {path.parent}, or write the path from here: {beside}")


def load_any_config(path: str | Path, overrides: list[str] | None = None):
    """A training config, or an alignment one (it has an `align:` section): for the commands that read
    either (the data commands' --config, estimate)."""
    return load_config(path, overrides, cls=AlignConfig if "align" in read_yaml_mapping(path) else TrainConfig)


def _given_at(tree: dict, loc: tuple) -> bool:
    """Whether an error's location lies in the overrides' tree (a key typed on the command line)."""
    if not loc:  # the config as a whole
        return False
    for part in loc:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True
