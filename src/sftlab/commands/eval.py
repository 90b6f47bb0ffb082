"""`sftlab eval MODEL_OR_RUN --data FILE [--metrics ...] [--out DIR] [--probe bias]`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sftlab.commands.data import COLUMNS_HELP, REJECTS_HELP, SKIP_HELP, print_rejects

app = typer.Typer(add_completion=False, no_args_is_help=True)


def split_names(values: Optional[list[str]]) -> Optional[list[str]]:
    """`--metrics a,b --metrics c` -> [a, b, c]; None when not given."""
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    return names or None


def load_eval_data(data, *, format, split: Optional[str], limit: Optional[int]):
    """The examples to evaluate on: `data` a path, read strictly, or a Reading (e.g. in skip mode);
    `format` as the loaders take it (a name or a column mapping)."""
    from sftlab.data.load import as_reading
    from sftlab.errors import SftlabError

    reading = as_reading(data, format, split)
    conversations = reading.load()
    undesirable = sum(c.meta.get("label") is False for c in conversations)
    if undesirable:  # unpaired preference (KTO) records: an answer not to give is no reference
        conversations = [c for c in conversations if c.meta.get("label") is not False]
        print(f"{undesirable} labelled undesirable (label: false) left out: their answers are not references")
    if limit is not None:
        conversations = conversations[:limit]
    if not conversations:
        raise SftlabError(f"{reading.path}: no examples to evaluate")
    return conversations


CHAT_TEMPLATE_HELP = ("Chat template for a model that is not a run (a name such as chatml, or a .jinja file): the "
                      "one a run was trained with, so the base is asked the same prompts. Runs use their own.")


def check_probe(probe: Optional[str]) -> None:
    from sftlab.errors import SftlabError

    if probe not in (None, "bias"):
        raise SftlabError(f"unknown probe '{probe}': the available probe is 'bias'")


@app.command()
def run_eval(
    model: str = typer.Argument(..., help="Model folder, hub id, .gguf file, run directory, or 'default'."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset file (any supported format) with reference answers."),
    metrics: Optional[list[str]] = typer.Option(
        None, "--metrics", help="Comma-separated metric names or 'module:function' (default: chosen from the data)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN/eval for a run, else ./eval-results)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts per generation batch."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Longest answer generated."),
    group_by: str = typer.Option("task", "--group-by", help="Record field to break metrics down by ('' for none)."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (with --sample)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold (with --sample)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to read when the file holds several."),
    format: Optional[str] = typer.Option(None, "--format", help="Input schema, when detection is not enough."),
    columns: Optional[str] = typer.Option(None, "--columns", help=COLUMNS_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N examples."),
    skip: bool = typer.Option(False, "--skip", help=SKIP_HELP),
    rejects: Optional[Path] = typer.Option(None, "--rejects", help=REJECTS_HELP("OUT/rejects.jsonl")),
    probe: Optional[str] = typer.Option(None, "--probe", help="Also run a probe set: 'bias'."),
    probe_file: Optional[list[Path]] = typer.Option(None, "--probe-file", help="Extra bias probes (JSONL); repeatable."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help=CHAT_TEMPLATE_HELP),
) -> None:
    """Evaluate a model or run: metrics table, metrics.json and predictions.jsonl (and bias.json)."""
    from sftlab.errors import SftlabError
    from sftlab.models import is_run_dir

    check_probe(probe)
    if chat_template and is_run_dir(model):
        raise SftlabError(f"{model} is a run: it is evaluated with the chat template it was trained with "
                          "(--chat-template is for a model that is not a run)")
    if probe_file and probe is None:
        probe = "bias"
    if data is None and probe is None:
        raise SftlabError("give --data FILE to evaluate on (or --probe bias to run only the bias probes)")
    from sftlab.commands.data import _schema
    from sftlab.data.load import Reading
    from sftlab.models import is_run_dir, load_model, load_tokenizer

    out_dir = out or (Path(model) / "eval" if is_run_dir(model) else Path("eval-results"))
    schema = _schema(format, columns)
    reading = (Reading(data, format=schema, split=split, skip=skip, rejects_path=rejects or out_dir / "rejects.jsonl")
               if data else None)
    conversations = load_eval_data(reading, format=schema, split=split, limit=limit) if reading else None
    from sftlab.evaluation.metrics import MODEL_METRICS, resolve

    names = split_names(metrics)
    if names:
        resolve([n for n in names if n not in MODEL_METRICS])  # fail on a bad name before loading the model

    from sftlab.evaluation.console import print_bias, print_eval
    from sftlab.evaluation.evaluate import check_chat_template

    tokenizer = load_tokenizer(model, chat_template=chat_template)
    check_chat_template(tokenizer, model)
    llm = load_model(model)
    if conversations is not None:
        from sftlab.evaluation.evaluate import answerable, evaluate

        if skip:
            with reading:
                conversations = answerable(conversations, llm, tokenizer, max_new_tokens=max_new_tokens,
                                           reject=reading.reject)
            print_rejects(reading)

        result = evaluate(llm, tokenizer, conversations, metrics=names, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, group_by=group_by or None, do_sample=sample,
                          temperature=temperature, top_p=top_p)
        result.save(out_dir)
        print_eval({Path(model).name or model: result})
        print(f"metrics: {out_dir / 'metrics.json'}  predictions: {out_dir / 'predictions.jsonl'}")
    if probe == "bias":
        from sftlab.evaluation.bias import bias_probe, load_probes

        bias = bias_probe(llm, tokenizer, load_probes(probe_file or []), batch_size=batch_size)
        print_bias({Path(model).name or model: bias.to_json()})
        print(f"bias probes: {bias.save(out_dir)}")
