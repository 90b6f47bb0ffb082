"""The typed training config: YAML file + `key.sub=value` overrides.

Unknown keys are errors that name the closest valid key. Field names match
`transformers.TrainingArguments` where they overlap, so they mean what HF users expect.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sftlab.data.curate import CurateOptions
from sftlab.errors import SftlabError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = Field("default", description="HF folder, hub id, .gguf file, or 'default' (embedded SmolLM2-135M-Instruct).")
    chat_template: str | None = Field(None, description="Override the tokenizer's chat template: Jinja text or a .jinja file.")
    trust_remote_code: bool = Field(False, description="Run model code from the hub repo. Off unless you trust it.")
    attn_implementation: str | None = Field(None, description="sftlab_varlen | sdpa | eager | flash_attention_2 (default: sftlab_varlen, padding-free, where the model supports it).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype on load (auto: bf16 for a LoRA base when training in bf16, else fp32).")


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field("all-linear", description="Module names to adapt, or 'all-linear'.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")


class DataConfig(Section):
    train: str = Field(..., description="Training data: .jsonl/.json/.csv/.parquet, a saved HF dataset folder, or a hub id.")
    validation: str | None = Field(None, description="Validation data (same formats); enables eval loss and early stopping.")
    format: str | None = Field(None, description="Schema: alpaca | sharegpt | messages | prompt_completion | text | preference (default: detect).")
    split: str | None = Field(None, description="Split name for HF datasets.")
    train_on: Literal["all", "last"] = Field("all", description="Train on all assistant turns or only the last.")
    max_seq_length: int = Field(1024, ge=8, description="Longest example in tokens.")
    truncation: Literal["drop", "truncate"] = Field("drop", description="What to do with longer examples (counted and reported).")
    on_error: Literal["raise", "skip"] = Field("raise", description="Bad records: stop with file:line, or skip into rejects.jsonl.")
    packing: bool = Field(True, description="Bin-pack examples into rows of max_seq_length (padding-free either way).")
    curate: CurateOptions | None = Field(None, description="Curate the training data before rendering (dedup, filters, ...; see `sftlab data curate`).")


class TrainingConfig(Section):
    """Subset of transformers.TrainingArguments, same names and meanings."""

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
    optim: str = "adamw_torch"
    seed: int = 42
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(200, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: logging_steps when validation data is given).")
    bf16: bool | Literal["auto"] = Field("auto", description="bf16 mixed precision (auto: on when the device supports bf16 matmuls).")
    gradient_checkpointing: bool = False
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after N evaluations without improving eval_loss.")
    load_best_model_at_end: bool = False
    dataloader_num_workers: int = Field(0, ge=0)
    report_to: list[str] = Field(default_factory=list)


class TrainConfig(Section):
    """Everything `sftlab train` needs; `sftlab train CONFIG key.sub=value ...`."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    method: Literal["full", "lora", "dora", "qlora"] = Field("lora", description="full fine-tuning, LoRA, DoRA, or QLoRA (4-bit base).")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output_dir: str = Field("runs/latest", description="Run directory (created; a resumed run continues in it).")

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
    precompute_ref_log_probs: bool = Field(False, description="Full fine-tuning with DPO/KTO: score the data with the reference once before training instead of keeping a frozen copy in memory.")
    desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the desirable (label true) examples.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the undesirable (label false) examples.")


class AlignConfig(TrainConfig):
    """Everything `sftlab align` needs: the training config plus `align:`. `model.name_or_path`
    may be a base model or an SFT run directory (its adapter keeps training, or its merged model)."""

    align: AlignOptions = Field(default_factory=AlignOptions)


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
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_path(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _explain(err: ValidationError, model: type[BaseModel], origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _field_names(model, loc), n=1, cutoff=0.5)
            hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
            lines.append(f"unknown key '{where}'{hint}")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{where}'")
        else:
            lines.append(f"'{where}': {e['msg']} (got {e.get('input')!r})")
    return f"{origin}: " + "; ".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | None = None, cls: type[BaseModel] = TrainConfig):
    """Read YAML (optional) + overrides into a validated config; errors are one line."""
    tree: dict = {}
    origin = "overrides"
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.exists():
            raise SftlabError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise SftlabError(f"{p}{where}: invalid YAML: {getattr(e, 'problem', e)}") from e
        if not isinstance(tree, dict):
            raise SftlabError(f"{p}: a config must be a mapping of keys to values")
    tree = _merge(tree, parse_overrides(overrides or []))
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        raise SftlabError(_explain(e, cls, origin)) from None
