"""`sftlab align CONFIG [key.sub=value ...]`: DPO / ORPO / KTO after SFT."""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.command()
def align(
    config: str = typer.Argument(..., help="YAML config (see configs/dpo.yaml). Use '-' for none: give everything as overrides."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. align.loss=orpo align.beta=0.2"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output_dir from its last good checkpoint."),
) -> None:
    """Preference-tune a base model or an SFT run (align.loss: dpo | orpo | kto)."""
    from sftlab.config import AlignConfig, load_config

    cfg = load_config(None if config == "-" else config, overrides or [], cls=AlignConfig)
    print("Resolved config:\n" + cfg.to_yaml(), flush=True)
    from sftlab.train.align import align as run

    run(cfg, resume=resume)
