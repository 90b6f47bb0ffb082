"""`sftlab sweep CONFIG --trials N [key.sub=value ...]`."""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.command()
def sweep(
    config: str = typer.Argument(..., help="YAML config with a 'sweep:' section (see configs/sweep.yaml)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. output_dir=sweeps/lr"),
    trials: int = typer.Option(10, "--trials", min=1, help="Trials to finish in the sweep folder (finished ones count on a resume)."),
) -> None:
    """Hyper-parameter search (Optuna): each trial a run dir in output_dir, then report.html and best.yaml."""
    from sftlab.config import load_config
    from sftlab.train.sweep import run_sweep

    cfg = load_config(config, overrides or [])
    run_sweep(cfg, trials)
