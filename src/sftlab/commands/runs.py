"""`sftlab runs [DIR] [--csv | --markdown]`."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False)


@app.command()
def runs(
    root: Path = typer.Argument(Path("runs"), help="Folder searched (recursively) for run directories."),
    as_csv: bool = typer.Option(False, "--csv", help="CSV instead of an aligned table."),
    markdown: bool = typer.Option(False, "--markdown", help="A Markdown table."),
) -> None:
    """One line per run: method, data, steps, final loss, best eval loss, training time, `sftlab eval` metrics."""
    from sftlab.errors import SftlabError
    from sftlab.train.runs import find_runs, render, summarize

    if as_csv and markdown:
        raise SftlabError("choose one of --csv and --markdown")
    found = find_runs(root)
    if not found:
        raise SftlabError(f"{root}: no run directory (run.json + config.yaml) found")
    rows = [summarize(run, root) for run in found]
    print(render(rows, "csv" if as_csv else "markdown" if markdown else "table"), end="")
