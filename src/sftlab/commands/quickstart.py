"""`sftlab quickstart`: the whole path on the embedded default model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False)


@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), help="Where the data, run, evaluations and report go."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Config overrides, e.g. training.num_train_epochs=1"),
) -> None:
    """Generate the demo dataset, evaluate SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), fine-tune it with LoRA on
    the CPU, evaluate again and write a base-vs-tuned report."""
    from sftlab.demo.quickstart import run_quickstart

    run_quickstart(out, overrides or [])
