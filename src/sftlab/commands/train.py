"""`sftlab train CONFIG [key.sub=value ...] [--resume] [--nproc N]`."""

from __future__ import annotations

import os
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.command()
def train(
    config: str = typer.Argument(..., help="YAML config (see configs/). Use '-' for none: give everything as overrides."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. training.learning_rate=1e-4"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in output_dir."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes on this machine (torchrun); the engine is the config's distributed: section."),
) -> None:
    """Fine-tune a model: full, LoRA, DoRA or QLoRA, as the config says."""
    from sftlab.config import load_config
    from sftlab.errors import SftlabError
    from sftlab.train.distributed import is_main_process, launch
    from sftlab.train.preflight import preflight

    cfg = load_config(None if config == "-" else config, overrides or [])  # checked before any process starts
    preflight(cfg)  # QLoRA under ZeRO-3/FSDP, engine files, fp16 without a GPU: before any process starts
    if nproc > 1:
        if "WORLD_SIZE" in os.environ:
            raise SftlabError("--nproc: this process was already started by a launcher (WORLD_SIZE is set); drop --nproc")
        argv = ["train", config, *(overrides or []), *(["--resume"] if resume else [])]
        code = launch(nproc, argv)
        if code:
            raise typer.Exit(code)
        return
    if is_main_process():
        print("Resolved config:\n" + cfg.to_yaml(), flush=True)
    from sftlab.train.trainer import train as run

    run(cfg, resume=resume)
