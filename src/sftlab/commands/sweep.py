"""`sftlab sweep CONFIG --trials N [key.sub=value ...]`."""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True)
SPACE = "sweep.space."


def space_overrides(overrides: list[str]) -> list[str]:
    """`sweep.space.lora.r=[4,8]` sets the space's key `lora.r` (its keys are dotted config keys), where a
    plain override would make `lora` a section of the space: passed on as `sweep.space={lora.r: [4, 8]}`."""
    import yaml

    from sftlab.config import parse_overrides

    space = {item.split("=", 1)[0].removeprefix(SPACE): parse_overrides([f"v={item.split('=', 1)[1]}"])["v"]
             for item in overrides if item.startswith(SPACE) and "=" in item}
    rest = [item for item in overrides if not (item.startswith(SPACE) and "=" in item)]
    return rest + ([f"sweep.space={yaml.safe_dump(space, default_flow_style=True, width=10**6).strip()}"] if space else [])


@app.command()
def sweep(
    config: str = typer.Argument(..., help="YAML config with a 'sweep:' section (see configs/sweep.yaml)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. output_dir=sweeps/lr or sweep.space.lora.r=[8,16]"),
    trials: int = typer.Option(10, "--trials", min=1, help="Trials to finish in the sweep folder (finished ones count on a resume)."),
) -> None:
    """Hyper-parameter search (Optuna): each trial a run dir in output_dir, then report.html and best.yaml."""
    from sftlab.config import load_config
    from sftlab.train.sweep import run_sweep

    cfg = load_config(config, space_overrides(overrides or []))
    run_sweep(cfg, trials)
