"""`sftlab estimate MODEL --method lora ...` or `sftlab estimate CONFIG.yaml`: memory needed to train,
from the model's config only (no weights loaded)."""

from __future__ import annotations

from enum import Enum

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True)


class Method(str, Enum):
    full = "full"
    lora = "lora"
    qlora = "qlora"


class Dtype(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Optimizer(str, Enum):
    adamw = "adamw"
    adamw_8bit = "adamw_8bit"
    sgd = "sgd"


class Engine(str, Enum):
    none = "none"
    ddp = "ddp"
    zero2 = "zero2"
    zero2_offload = "zero2_offload"
    zero3 = "zero3"
    zero3_offload = "zero3_offload"
    fsdp = "fsdp"


class Loss(str, Enum):
    selective = "selective"
    full = "full"


@app.command()
def estimate(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="HF folder, hub id, .gguf file, run directory, or 'default'; or a training config (.yaml), whose model and settings are estimated (a run directory's are its config's). Options given override them."),
    method: Method = typer.Option(Method.lora, help="full fine-tuning, LoRA, or QLoRA (4-bit nf4 base)."),
    seq_len: int = typer.Option(1024, "--seq-len", min=1, help="Tokens per row (max_seq_length; a packed row is full)."),
    batch: int = typer.Option(8, min=1, help="Rows per device per step."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Gradient accumulation steps (above 1 the gradients stay alive through the forward passes)."),
    lora_r: int = typer.Option(16, "--lora-r", min=1, help="LoRA rank."),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout", min=0, max=1, help="LoRA dropout (> 0 keeps more activations)."),
    target_modules: str = typer.Option("all-linear", "--target-modules", help="'all-linear' or comma-separated module names."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute activations in the backward pass."),
    compile_norms: bool = typer.Option(False, "--compile-norms", help="RMSNorm layers compiled (training.compile_norms; its auto compiles them for CPU runs of 100,000 tokens or more): fewer activations kept."),
    dtype: Dtype = typer.Option(Dtype.auto, help="Compute precision: fp32, bf16 mixed precision (autocast), or auto (bf16 where supported, as sftlab train)."),
    weights_dtype: Dtype = typer.Option(Dtype.auto, "--weights-dtype", help="How the weights are stored; auto as sftlab train: a LoRA base in bf16 when computing in bf16, else fp32."),
    optimizer: Optimizer = typer.Option(Optimizer.adamw, help="adamw (2 fp32 states), adamw_8bit, or sgd."),
    trained_fraction: float = typer.Option(0.5, "--trained-fraction", min=0.001, max=1, help="Share of tokens that are trained (assistant tokens)."),
    loss: Loss = typer.Option(Loss.selective, help="selective: sftlab's loss on trained positions; full: plain HF logits."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes (GPUs) training together; the estimate is per process."),
    distributed: Engine = typer.Option(Engine.none, "--distributed", help="Engine: ddp, zero2/zero3 (+_offload, DeepSpeed), fsdp (FSDP2); none = one process (ddp when --nproc > 1)."),
    device: Device = typer.Option(Device.auto, help="What trains: auto (this machine: its GPU, else its CPU), cpu, or cuda (a GPU elsewhere: bf16, no CPU caches; give --memory)."),
    memory: str = typer.Option(None, help="Memory to fit into, e.g. 24GiB or 80GB; GB and GiB both mean 2^30 bytes, as GPU memory is sold (an 80GB card has 80 GiB). Default: this machine's GPU memory, else its RAM."),
    as_json: bool = typer.Option(False, "--json", help="Print the estimate as JSON (bytes) instead of a table."),
) -> None:
    """Estimate peak training memory (weights, gradients, optimizer, activations, logits) without loading weights."""
    import json
    import sys

    from rich.console import Console

    from sftlab.estimate import device_memory, estimate_memory, parse_memory, settings_from_config

    targets = "all-linear" if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    budget = parse_memory(memory) if memory else device_memory(device.value)
    settings = dict(method=method.value, seq_len=seq_len, batch=batch, lora_r=lora_r, lora_dropout=lora_dropout,
                    target_modules=targets, gradient_checkpointing=grad_checkpointing, dtype=dtype.value,
                    weights_dtype=weights_dtype.value, optimizer=optimizer.value, trained_fraction=trained_fraction,
                    loss=loss.value, nproc=nproc, distributed=distributed.value, grad_accum=grad_accum,
                    compiled_norms=compile_norms, device=device.value)
    config_source = model
    model, config = _config_of(model)
    if config is not None:  # the config's settings, where no option says otherwise
        setting = {option: key for key, option in _OPTION.items()}
        given = {setting.get(name, name) for name in ctx.params
                 if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
        settings |= {k: v for k, v in settings_from_config(config, nproc, device.value).items() if k not in given}
        batch = settings["batch"]
        print(f"settings of {config_source}: {_as_options(settings)}", file=sys.stderr)
    est = estimate_memory(model, settings.pop("method"), settings.pop("seq_len"), settings.pop("batch"), **settings)
    if as_json:
        fit = {"memory": budget, "max_batch": est.max_batch(budget)} if budget else {}
        print(json.dumps(est.as_dict() | fit, indent=2))
        return
    console = Console()
    console.print(est.table(memory=budget))
    if loss is Loss.selective:
        console.print(f"A plain HF forward would need {est.logits_full / 1024**3:.2f} GiB for the logits instead of "
                      f"{est.logits / 1024**3:.2f} GiB.")
    if budget is None:
        console.print("Give --memory (e.g. 80GiB) to see whether it fits and the largest batch that does.")
        return
    fits = "fits" if est.total <= budget else "does NOT fit"
    console.print(f"Batch {batch} {fits} in {budget / 1024**3:.2f} GiB; the largest batch that fits is {est.max_batch(budget)}.")


# setting -> option, where the names differ
_OPTION = {"gradient_checkpointing": "grad_checkpointing", "compiled_norms": "compile_norms"}
_ALIGN = ("sequences_per_row", "reference_copy")  # alignment's settings, which no option gives


def _as_options(settings: dict) -> str:
    """The settings as the options that give them (what a config's estimate used)."""
    full, one_process = settings["method"] == "full", settings["nproc"] == 1
    out = []
    for key, value in settings.items():
        lora = key.startswith("lora_") or key == "target_modules"
        if key in ("trained_fraction", "loss", *_ALIGN) or (full and lora) or (one_process and key == "distributed") \
                or (key == "device" and value == "auto"):
            continue
        flag = "--" + _OPTION.get(key, key).replace("_", "-")
        if isinstance(value, bool):
            out += [flag] if value else []
        else:
            out.append(f"{flag} {','.join(value) if isinstance(value, list) else value}")
    counted = (["a pair's two sides per row"] if settings.get("sequences_per_row", 1) > 1 else []) + \
        (["a frozen reference copy"] if settings.get("reference_copy") else [])
    return " ".join(out) + (f" (alignment: {' and '.join(counted)})" if counted else "")


def _config_of(model: str):
    """(the model to estimate, the training config whose settings apply, or None): a .yaml config names
    its model; a run directory is its own model, trained with its config.yaml."""
    from pathlib import Path

    from sftlab.config import load_any_config
    from sftlab.models import is_run_dir

    run = is_run_dir(model)
    path = Path(model) / "config.yaml" if run else Path(model)
    if (run and not path.is_file()) or path.suffix not in (".yaml", ".yml"):
        return model, None
    config = load_any_config(path)
    return (model if run else config.model.name_or_path), config
