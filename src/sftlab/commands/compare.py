"""`sftlab compare BASE TUNED [TUNED ...] --data FILE --out DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sftlab.commands.data import COLUMNS_HELP, _schema
from sftlab.commands.eval import CHAT_TEMPLATE_HELP

app = typer.Typer(add_completion=False, no_args_is_help=True)


def model_names(specs: list[str]) -> list[str]:
    """Short unique names for the report: a folder's name, 'default', a hub id's last part."""
    names: list[str] = []
    for spec in specs:
        name = Path(spec.rstrip("/")).name or spec
        candidate, n = name, 2
        while candidate in names:
            candidate, n = f"{name}-{n}", n + 1
        names.append(candidate)
    return names


@app.command()
def compare(
    base: str = typer.Argument(..., help="Base model (folder, hub id, .gguf, run, or 'default')."),
    tuned: list[str] = typer.Argument(..., help="One or more models or run directories to compare with the base."),
    data: str = typer.Option(..., "--data", help="Dataset file with reference answers (e.g. the test split)."),
    out: Path = typer.Option(Path("compare-report"), "--out", help="Folder for report.html, report.md, compare.json."),
    metrics: Optional[list[str]] = typer.Option(None, "--metrics", help="Comma-separated metric names (default: from the data)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts per generation batch."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Longest answer generated."),
    group_by: str = typer.Option("task", "--group-by", help="Record field to break metrics down by ('' for none)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to read when the file holds several."),
    format: Optional[str] = typer.Option(None, "--format", help="Input schema, when detection is not enough."),
    columns: Optional[str] = typer.Option(None, "--columns", help=COLUMNS_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N examples."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="Bootstrap resamples for the confidence intervals."),
    probe: Optional[str] = typer.Option(None, "--probe", help="Also run a probe set on every model: 'bias'."),
    probe_file: Optional[list[Path]] = typer.Option(None, "--probe-file", help="Extra bias probes (JSONL); repeatable."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help=CHAT_TEMPLATE_HELP),
) -> None:
    """Evaluate a base model and tuned models on the same data; write an HTML + Markdown report."""
    from sftlab.commands.eval import check_probe, load_eval_data, split_names
    from sftlab.evaluation.compare import check_models, compare_models

    check_probe(probe)
    specs = [base, *tuned]
    models = dict(zip(model_names(specs), specs))
    check_models(models)  # every model, before the data is read or anything is generated
    if probe_file and probe is None:
        probe = "bias"
    names = split_names(metrics)
    if names:
        from sftlab.evaluation.metrics import MODEL_METRICS, resolve

        resolve([n for n in names if n not in MODEL_METRICS])
    conversations = load_eval_data(data, format=_schema(format, columns), split=split, limit=limit)
    probes = None
    if probe == "bias":
        from sftlab.evaluation.bias import load_probes

        probes = load_probes(probe_file or [])
    from sftlab.evaluation.console import print_bias, print_compare

    result = compare_models(models, conversations, out, metrics=names,
                            batch_size=batch_size, max_new_tokens=max_new_tokens, group_by=group_by or None,
                            bias=probe == "bias", probes=probes, n_bootstrap=bootstrap, chat_template=chat_template,
                            checked=True)
    print_compare(result.data)
    if result.data["bias"]:
        print_bias(result.data["bias"])
    print(f"report: {result.paths['html']}  (also {result.paths['markdown'].name}, {result.paths['json'].name})")
