"""`sftlab data inspect|validate|curate|augment|split|report|pairs`: datasets in, datasets out.

Every command reads any supported input (JSON, JSONL, CSV, Parquet, a saved HF dataset, an
HF id) and writes JSONL, or Parquet when the output path ends in .parquet. Each writes a
JSON summary next to its output, which `sftlab data report` picks up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

# Imported here (numpy, pydantic; no torch) so --help can list their fields.
from sftlab.data.augment import AugmentOptions
from sftlab.data.curate import CurateOptions
from sftlab.data.formats import FORMATS
from sftlab.files import write_json

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Datasets in, datasets out.")

FORMAT_HELP = f"Input schema ({', '.join(FORMATS)}); detected per record when unset."
COLUMNS_HELP = ("Which column is which, for data in no detected schema: ROLE=COLUMN pairs, e.g. "
                "prompt=question,input=passage,response=answer,system=sys (or messages=COL, or text=COL).")
TEMPLATE_HELP = "Chat template: chatml, llama3, mistral, gemma, alpaca, or a .jinja file (default: the tokenizer's)."
CONFIG_HELP = "A train config (YAML): model, chat template, data format/columns and train file are read from it; flags win."
SET_HELP = "Override an option: KEY=VALUE (YAML value; dotted keys for nested options). Repeatable."
SKIP_HELP = "Skip bad records into a rejects file instead of stopping at the first."
REJECTS_HELP = "Rejects file (skip mode; default {}).".format


def _options(model_cls, config: Optional[Path], sets: Optional[list[str]], **given):
    """Build a pydantic options model from a YAML file, then --set KEY=VALUE, then explicit flags."""
    from pydantic import ValidationError

    from sftlab.config import merge_trees, parse_overrides, read_yaml_mapping
    from sftlab.errors import SftlabError

    data: dict = read_yaml_mapping(config) if config is not None else {}
    bad = next((item for item in sets or [] if "=" not in item), None)
    if bad is not None:
        raise SftlabError(f"--set needs KEY=VALUE, got '{bad}'")
    data = merge_trees(data, parse_overrides(sets or []))
    data.update({k: v for k, v in given.items() if v is not None})
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        import difflib

        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        hint = ""
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][-1]), model_cls.model_fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(model_cls.model_fields)})"
        raise SftlabError(f"option '{where}': {err['msg']}{hint}") from None


def _field_help(model_cls) -> str:
    """The options a --set can change, with defaults and descriptions (from the pydantic model)."""
    lines = []
    for name, f in model_cls.model_fields.items():
        default = f.default_factory() if f.default_factory else f.default
        lines.append(f"{name} (default {default!r}): {f.description or ''}".rstrip(": "))
    return "\n\n".join(lines)


def _schema(format: Optional[str], columns: Optional[str], config=None):
    """The loaders' `format`: --format or --columns, else the config's data.format / data.columns."""
    from sftlab.data.formats import Columns, schema

    if format is None and columns is None and config is not None:
        return schema(config.data.format, config.data.columns)
    return schema(format, Columns.parse(columns) if columns else None)


def _train_config(path: Optional[Path]):
    if path is None:
        return None
    from sftlab.config import load_any_config

    return load_any_config(path)


def _model_and_template(model: Optional[str], chat_template: Optional[str], config) -> tuple[str, Optional[str]]:
    """--model / --chat-template, else the config's model section, else the embedded default."""
    if config is not None:
        return model or config.model.name_or_path, chat_template or config.model.chat_template
    return model or "default", chat_template


def _data_file(file: Optional[str], config) -> str:
    from sftlab.errors import SftlabError

    if file is None and config is None:
        raise SftlabError("give a dataset FILE, or --config with data.train")
    return file or config.data.train


def _tokenizer(model: Optional[str], chat_template: Optional[str]):
    if model is None or model.lower() == "none":
        return None
    from sftlab.models import load_tokenizer

    return load_tokenizer(model, chat_template=chat_template)


def _sidecar(out: Path, name: str, ext: str = "json") -> Path:
    return out.with_name(f"{out.name.rsplit('.', 1)[0]}.{name}.{ext}")


def _rejects_path(skip: bool, rejects: Optional[Path], file: str, *, out: Optional[Path] = None,
                  out_dir: Optional[Path] = None) -> Optional[Path]:
    """--rejects, else in skip mode beside the output: OUT.rejects.jsonl, OUT_DIR/rejects.jsonl,
    or ./<FILE>.rejects.jsonl for a command that writes no file."""
    if not skip or rejects is not None:
        return rejects
    if out is not None:
        return _sidecar(out, "rejects", "jsonl")
    if out_dir is not None:
        return out_dir / "rejects.jsonl"
    return Path(f"{Path(file).name}.rejects.jsonl")  # data.jsonl and data.csv keep rejects of their own


def _not_the_input(file: str, out: Optional[Path]) -> None:
    """Refuse an output that is the input file: it would be overwritten with (or appended to) itself."""
    from sftlab.errors import SftlabError

    if out is not None and out.exists() and Path(file).exists() and out.resolve() == Path(file).resolve():
        raise SftlabError(f"--out {out} is the input file; write to another file")


def _reading(file: str, fmt, *, skip: bool, rejects: Optional[Path], split: Optional[str] = None, **beside):
    """The input in strict or skip mode (the one reader every data command shares)."""
    from sftlab.data.load import Reading

    return Reading(file, format=fmt, split=split, skip=skip, rejects_path=_rejects_path(skip, rejects, file, **beside))


def warn_if_empty(file: str, records: int) -> None:
    if records == 0:
        typer.echo(f"warning: {file} holds no records", err=True)


def print_rejects(reading, stderr: bool = False) -> None:
    """In skip mode: records in, kept, rejected by kind, and where the rejects went."""
    if reading.skip:
        typer.echo("\n".join(reading.report_lines()), err=stderr)


@app.command()
def inspect(
    file: Optional[str] = typer.Argument(None, help="Dataset file (any supported format); default: the config's data.train."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
    model: Optional[str] = typer.Option(None, "--model", help="Model/tokenizer whose chat template renders the examples (default: the config's, else 'default')."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help=TEMPLATE_HELP),
    json_: bool = typer.Option(False, "--json", help="One JSON object per example (all of them unless --limit): source, input_ids, labels."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="How many examples to show (default: 3 on screen, all with --json)."),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    columns: Optional[str] = typer.Option(None, "--columns", help=COLUMNS_HELP),
    last_turn_only: bool = typer.Option(False, "--last-turn-only", help="Train on the last assistant turn only."),
    skip: bool = typer.Option(False, "--skip", help=SKIP_HELP + " Counts go to stderr."),
    rejects: Optional[Path] = typer.Option(None, "--rejects", help=REJECTS_HELP("./<FILE>.rejects.jsonl")),
) -> None:
    """Show rendered examples with the trained tokens highlighted (or as JSON)."""
    from sftlab.data.inspect import inspect_file

    cfg = _train_config(config)
    model, chat_template = _model_and_template(model, chat_template, cfg)
    from sftlab.config import AlignConfig

    # an alignment config scores each side's last answer: shown as its chosen side trains under SFT masks
    train_on = "last" if last_turn_only or isinstance(cfg, AlignConfig) else (cfg.data.train_on if cfg else "all")
    reading = _reading(_data_file(file, cfg), _schema(format, columns, cfg), skip=skip, rejects=rejects)
    inspect_file(reading, model=model, chat_template=chat_template, as_json=json_, limit=limit, train_on=train_on)
    print_rejects(reading, stderr=True)
    warn_if_empty(reading.path, reading.records_in)


@app.command()
def validate(
    file: str = typer.Argument(..., help="Dataset file, saved HF dataset folder or folder of data files, or HF dataset id."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the kept records here (.jsonl or .parquet)."),
    skip: bool = typer.Option(False, "--skip", help=SKIP_HELP),
    rejects: Optional[Path] = typer.Option(None, "--rejects", help=REJECTS_HELP("OUT.rejects.jsonl or ./<FILE>.rejects.jsonl")),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    columns: Optional[str] = typer.Option(None, "--columns", help=COLUMNS_HELP),
    split: Optional[str] = typer.Option(None, "--split", help="Split to read when the input holds several."),
    no_dedup: bool = typer.Option(False, "--no-dedup", help="Keep exact duplicates."),
    model: Optional[str] = typer.Option(None, "--model", help="Render every record with this model's tokenizer and chat template, as training does: one the template cannot render is rejected (default with --chat-template: 'default')."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help=TEMPLATE_HELP),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", help="Token limit (needs --model or --chat-template): over-long records are rejected or truncated."),
    length_policy: str = typer.Option("drop", "--length-policy", help="Over-long conversations: drop (reject) or truncate."),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Summary JSON (default OUT.validate.json when --out is given)."),
) -> None:
    """Check every record; strict (exit 1 at the first bad one) or --skip (rejects file + counts)."""
    from sftlab.data.formats import Columns
    from sftlab.data.load import reject_lines
    from sftlab.data.validate import ValidateOptions, validate as run
    from sftlab.errors import SftlabError

    if chat_template and not model:
        model = "default"
    if max_seq_length and not model:
        raise SftlabError("--max-seq-length needs --model (the tokenizer that counts tokens)")
    opts = _options(ValidateOptions, None, None, format=format, columns=Columns.parse(columns) if columns else None,
                    split=split, on_error="skip" if skip else "raise",
                    dedup=not no_dedup, max_seq_length=max_seq_length, length_policy=length_policy)
    _not_the_input(file, out)
    rejects = _rejects_path(skip, rejects, file, out=out)
    report = run(file, opts, out=out, rejects_path=rejects, tokenizer=_tokenizer(model, chat_template), progress=True)
    data = report.to_json()
    print(f"records in {report.records_in}: kept {report.kept}, rejected {report.rejected_total}, "
          f"exact duplicates {report.duplicates}" + (f", truncated {report.truncated}" if report.truncated else ""))
    for line in reject_lines(dict(report.rejected.most_common()), rejects):
        print(line)
    warn_if_empty(file, report.records_in)
    summary = summary or (_sidecar(out, "validate") if out else None)
    if summary:
        write_json(summary, data)
    if out:
        print(f"wrote {report.kept} records to {out}")


@app.command(epilog="Options for --set / --config:\n\n" + _field_help(CurateOptions))
def curate(
    file: str = typer.Argument(..., help="Dataset (any supported format)."),
    out: Path = typer.Option(..., "--out", help="Curated output (.jsonl or .parquet)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of curate options (as data.curate in a train config)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    decontaminate: Optional[list[str]] = typer.Option(None, "--decontaminate", help="Eval/test file to decontaminate against (PATH:SPLIT for one split of a dataset folder with several). Repeatable."),
    pii: bool = typer.Option(False, "--pii", help="Scrub emails, phone numbers and API-key-like strings."),
    model: Optional[str] = typer.Option(None, "--model", help="Tokenizer for min_tokens / max_tokens."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help=TEMPLATE_HELP),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    columns: Optional[str] = typer.Option(None, "--columns", help=COLUMNS_HELP),
    split: Optional[str] = typer.Option(None, "--split", help="Split to read when the input holds several."),
    removed: Optional[Path] = typer.Option(None, "--removed", help="Removed records with reasons, each as written to OUT (default OUT.removed.jsonl)."),
    skip: bool = typer.Option(False, "--skip", help=SKIP_HELP),
    rejects: Optional[Path] = typer.Option(None, "--rejects", help=REJECTS_HELP("OUT.rejects.jsonl")),
) -> None:
    """Exact and near-duplicate removal, quality and length filters, PII scrubbing, decontamination."""
    from sftlab.data.curate import curate as run
    from sftlab.data.load import save_conversations, writes_parquet

    opts = _options(CurateOptions, config, set_, decontaminate=decontaminate or None, pii=pii or None)
    _not_the_input(file, out)
    writes_parquet(out)  # before the input is read and curated
    reading = _reading(file, _schema(format, columns), skip=skip, rejects=rejects, split=split, out=out)
    kept, report = run(reading.load(), opts, tokenizer=_tokenizer(model, chat_template), progress=True)
    print_rejects(reading)
    warn_if_empty(reading.path, reading.records_in)
    save_conversations(out, kept)
    removed = removed or _sidecar(out, "removed", "jsonl")
    with open(removed, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in report.removals)
    write_json(_sidecar(out, "curate"), {**report.to_json(), "reading": reading.to_json()})
    print(f"records in {report.records_in}: kept {report.kept}, removed {report.records_in - report.kept}")
    for reason, n in report.removed.most_common():
        print(f"  removed  {n:>7}  {reason}")
    for kind, n in report.pii.items():
        print(f"  scrubbed {n:>7}  {kind}")
    print(f"wrote {out} (removed records with reasons: {removed})")


@app.command()
def split(
    file: str = typer.Argument(..., help="Dataset (any supported format)."),
    out_dir: Path = typer.Option(..., "--out-dir", help="Folder for the split files and split.json."),
    names: str = typer.Option("train,validation,test", "--names", help="Split names, comma-separated."),
    ratios: str = typer.Option("0.8,0.1,0.1", "--ratios", help="Split proportions, comma-separated (normalised)."),
    seed: int = typer.Option(0, "--seed", help="Shuffle seed: the same seed gives the same split."),
    stratify: Optional[str] = typer.Option(None, "--stratify", help="Record field (e.g. label) to keep proportional per split."),
    group: Optional[str] = typer.Option(None, "--group", help="Record field (e.g. conversation_id) whose records all go to one split: the parts of one conversation."),
    ext: str = typer.Option("jsonl", "--ext", help="Output format: jsonl or parquet."),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    columns: Optional[str] = typer.Option(None, "--columns", help=COLUMNS_HELP),
    from_split: Optional[str] = typer.Option(None, "--split", help="Split to read when the input holds several."),
    skip: bool = typer.Option(False, "--skip", help=SKIP_HELP),
    rejects: Optional[Path] = typer.Option(None, "--rejects", help=REJECTS_HELP("OUT_DIR/rejects.jsonl")),
) -> None:
    """Deterministic seeded train/validation/test split, optionally stratified by a field or grouped by one."""
    from sftlab.data.load import save_conversations
    from sftlab.data.split import parse_ratios, split_conversations
    from sftlab.errors import SftlabError
    from sftlab.files import inside

    if ext not in ("jsonl", "parquet"):
        raise SftlabError(f"--ext must be jsonl or parquet, got '{ext}'")
    split_names = [n.strip() for n in names.split(",") if n.strip()]
    paths = {n: inside(out_dir, f"{n}.{ext}", "split name") for n in split_names}
    reading = _reading(file, _schema(format, columns), skip=skip, rejects=rejects, split=from_split, out_dir=out_dir)
    shares = parse_ratios(ratios, split_names)
    parts, together = split_conversations(reading.load(), split_names, shares, seed=seed, stratify=stratify,
                                          group=group)
    warn_if_empty(reading.path, reading.records_in)
    print_rejects(reading)
    sizes = {}
    for name, convs in parts.items():
        sizes[name] = save_conversations(paths[name], convs)
        print(f"{name:>12}  {sizes[name]:>7}  {paths[name]}")
    for name, share in zip(split_names, shares):
        if share > 0 and not sizes[name]:
            typer.echo(f"warning: split '{name}' is empty: too few records for ratio {share:g}", err=True)
    if together:
        print(f"kept {together} group(s) of exact duplicates each in one split (run `sftlab data curate` to remove them)")
    write_json(out_dir / "split.json", {"input": file, "sizes": sizes, "ratios": ratios, "seed": seed,
                                        "stratify": stratify, "group": group, "duplicate_groups": together,
                                        "reading": reading.to_json()})


@app.command(epilog="Options for --set / --config:\n\n" + _field_help(AugmentOptions))
def augment(
    file: str = typer.Argument(..., help="Dataset (any supported format)."),
    out: Path = typer.Option(..., "--out", help="Output (.jsonl or .parquet): the originals plus the kept new records."),
    strategy: Optional[list[str]] = typer.Option(None, "--strategy", help="paraphrase, system (a generic system prompt; a record's own is kept), noise, prefixes, model_paraphrase, self_instruct. Repeatable."),
    model: Optional[str] = typer.Option(None, "--model", help="Local model for model_paraphrase / self_instruct ('default': the embedded model)."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help=TEMPLATE_HELP),
    copies: Optional[int] = typer.Option(None, "--copies", help="Variants per conversation for each strategy."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of augment options."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    only_new: bool = typer.Option(False, "--only-new", help="Write only the new records, not the originals."),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    columns: Optional[str] = typer.Option(None, "--columns", help=COLUMNS_HELP),
    skip: bool = typer.Option(False, "--skip", help=SKIP_HELP),
    rejects: Optional[Path] = typer.Option(None, "--rejects", help=REJECTS_HELP("OUT.rejects.jsonl")),
) -> None:
    """Rule-based and model-based augmentation with provenance (augmented_from), then filtered.

    New records are checked against the originals and each other: exact duplicates and the answer quality filters for every strategy; near-duplicates for self_instruct only (variants are near-copies by design). A self_instruct reply cut off at max_new_tokens is dropped, and a model_paraphrase rewrite is dropped when cut off at max_new_tokens, empty, unchanged, repetitive, or under 0.3x / over 3x the original's word count (an original under 5 words counting as 5).
    """
    from sftlab.data.augment import augment as run
    from sftlab.data.load import save_conversations

    opts = _options(AugmentOptions, config, set_, strategies=strategy or None, model=model,
                    chat_template=chat_template, copies=copies, seed=seed)
    _not_the_input(file, out)
    reading = _reading(file, _schema(format, columns), skip=skip, rejects=rejects, out=out)
    convs = reading.load()
    print_rejects(reading)
    new, report = run(convs, opts)
    n = save_conversations(out, new if only_new else [*convs, *new])
    write_json(_sidecar(out, "augment"), {**report.to_json(), "reading": reading.to_json()})
    for s in opts.strategies:
        print(f"{s:>18}: generated {report.generated[s]:>6}, kept {report.kept[s]:>6}")
    if report.unparseable:
        print(f"{'unusable outputs':>18}: {report.unparseable}")
    if report.cut_off:
        print(f"{'cut-off outputs':>18}: {report.cut_off} (stopped at max_new_tokens {opts.max_new_tokens}; "
              "raise it with --set max_new_tokens=N to keep them)")
    if report.rewrites_dropped:
        dropped = ", ".join(f"{reason} {k}" for reason, k in report.rewrites_dropped.most_common())
        print(f"{'dropped rewrites':>18}: {dropped}")
    print(f"wrote {n} records to {out}")


@app.command()
def report(
    file: Optional[str] = typer.Argument(None, help="Dataset to describe (any supported format); default: the config's data.train."),
    out_dir: Path = typer.Option(..., "--out-dir", help="Folder for report.html, report.md, summary.json, plots/."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
    model: Optional[str] = typer.Option(None, "--model", help="Tokenizer for token lengths ('none': count words; default: the config's, else 'default')."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help=TEMPLATE_HELP),
    validate_summary: Optional[Path] = typer.Option(None, "--validate-summary", help="A validate summary JSON (default: FILE's X.validate.json if present)."),
    curate_summary: Optional[Path] = typer.Option(None, "--curate-summary", help="A curate summary JSON (default: X.curate.json if present)."),
    split_summary: Optional[Path] = typer.Option(None, "--split-summary", help="A split.json (default: split.json beside FILE if present)."),
    review_dir: Optional[Path] = typer.Option(None, "--review-dir", help="Review folder given to 'data review --review-dir' (default: FILE.review/ if present)."),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    columns: Optional[str] = typer.Option(None, "--columns", help=COLUMNS_HELP),
    skip: bool = typer.Option(False, "--skip", help=SKIP_HELP),
    rejects: Optional[Path] = typer.Option(None, "--rejects", help=REJECTS_HELP("OUT_DIR/rejects.jsonl")),
) -> None:
    """Self-contained HTML + Markdown report with plots, and summary.json with every number."""
    from sftlab.data.report import write_report
    from sftlab.errors import SftlabError

    cfg = _train_config(config)
    model, chat_template = _model_and_template(model, chat_template, cfg)
    file = _data_file(file, cfg)
    given = {"validate": validate_summary, "curate": curate_summary, "split": split_summary}
    missing = [str(p) for p in given.values() if p is not None and not p.is_file()]
    if missing:
        raise SftlabError(f"summary file not found: {', '.join(missing)}")
    reading = _reading(file, _schema(format, columns, cfg), skip=skip, rejects=rejects, out_dir=out_dir)
    summary = write_report(reading, out_dir, tokenizer=_tokenizer(model, chat_template),
                           summaries={k: v for k, v in given.items() if v is not None}, review_dir=review_dir)
    print_rejects(reading)
    warn_if_empty(reading.path, reading.records_in)
    print(f"{summary['conversations']} conversations; steps included: {', '.join(summary['steps']) or 'none'}")
    print(f"wrote {out_dir / 'report.html'} and {out_dir / 'report.md'}")


@app.command()
def review(
    file: str = typer.Argument(..., help="Dataset to review (any supported format)."),
    port: int = typer.Option(8765, "--port", help="Port of the review page."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; the default accepts local connections only."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SFTLAB_API_KEY", help="Require 'Authorization: Bearer KEY' (the page asks for it)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", envvar="SFTLAB_API_KEY_FILE", help="Read the API key from this file's first line (keeps it out of the process list)."),
    max_body_bytes: int = typer.Option(1_000_000, "--max-body-bytes", help="Reject larger request bodies (413), while they stream in."),
    max_concurrent: int = typer.Option(64, "--max-concurrent", min=1, help="Requests in flight at once; more get 429."),
    body_timeout: float = typer.Option(30.0, "--body-timeout", min=0.1, help="Seconds a request body may take to arrive (408 after)."),
    model: Optional[str] = typer.Option(None, "--model", help="Tokenizer whose chat template gives token counts and the trained-token view."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="Chat template (.jinja) overriding the tokenizer's."),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", help="Flag examples longer than this many tokens (needs --model)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Label choices offered on the page (and to --suggest models), comma-separated."),
    suggest: Optional[str] = typer.Option(None, "--suggest", help="Local model that pre-scores/labels every example ('default': the embedded model)."),
    suggest_url: Optional[str] = typer.Option(None, "--suggest-url", help="OpenAI-compatible endpoint (base URL ending in /v1) that pre-scores every example."),
    suggest_chat_template: Optional[str] = typer.Option(None, "--suggest-chat-template", help="Chat template (.jinja) for the --suggest model (--chat-template is --model's)."),
    suggest_model: Optional[str] = typer.Option(None, "--suggest-model", help="Model name sent to --suggest-url."),
    suggest_api_key: Optional[str] = typer.Option(None, "--suggest-api-key", envvar="SFTLAB_SUGGEST_API_KEY", help="API key for --suggest-url."),
    review_dir: Optional[Path] = typer.Option(None, "--review-dir", help="Folder of the review log (default: FILE.review/ beside FILE)."),
    export: Optional[Path] = typer.Option(None, "--export", help="Write the accepted (edited) records here (.jsonl or .parquet) and exit."),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    columns: Optional[str] = typer.Option(None, "--columns", help=COLUMNS_HELP),
    split: Optional[str] = typer.Option(None, "--split", help="Split to read when the input holds several."),
    skip: bool = typer.Option(False, "--skip", help=SKIP_HELP + " Only the good ones are reviewed."),
    rejects: Optional[Path] = typer.Option(None, "--rejects", help=REJECTS_HELP("EXPORT.rejects.jsonl or ./<FILE>.rejects.jsonl")),
) -> None:
    """Local web page to read, label, score, fix and accept or reject examples; every decision is logged."""
    from sftlab.data.review.session import ReviewSession
    from sftlab.errors import SftlabError

    if max_seq_length and not model:
        raise SftlabError("--max-seq-length needs --model (the tokenizer that counts tokens)")
    if suggest and suggest_url:
        raise SftlabError("give --suggest (a local model) or --suggest-url (an endpoint), not both")
    if not export:
        from sftlab.serve.guard import read_api_key

        api_key = read_api_key(api_key, api_key_file)
    choices = [x.strip() for x in (labels or "").split(",") if x.strip()]
    reading = _reading(file, _schema(format, columns), skip=skip, rejects=rejects, split=split, out=export)
    session = ReviewSession(reading, review_dir=review_dir, labels=choices,
                            tokenizer=None if export else _tokenizer(model, chat_template), max_seq_length=max_seq_length)
    print_rejects(reading)
    if export:
        from sftlab.data.load import save_conversations

        session.check_export(export, _sidecar(export, "review"))
        n = save_conversations(export, session.approved())
        stats = session.stats()
        write_json(_sidecar(export, "review"), {**stats, "reading": reading.to_json()})
        print(f"reviewed {stats['reviewed']} / {stats['total']}: accepted {stats['accepted']}, "
              f"rejected {stats['rejected']}, edited {stats['edited']}")
        print(f"wrote {n} accepted records to {export}")
        return
    from sftlab.data.review.app import LOOPBACK_HOSTS, create_app
    from sftlab.data.review.suggest import EndpointSuggester, LocalSuggester, start_suggestions
    from sftlab.serve.guard import GuardLimits
    from sftlab.serve.openai_api import run_server

    app_ = create_app(session, api_key=api_key, allowed_hosts=LOOPBACK_HOSTS if host in LOOPBACK_HOSTS else None,
                      limits=GuardLimits(max_body_bytes, max_concurrent, body_timeout))
    if suggest or suggest_url:
        suggester = (LocalSuggester(suggest, suggest_chat_template) if suggest
                     else EndpointSuggester(suggest_url, suggest_model, suggest_api_key))
        start_suggestions(session, suggester)
    if session.log.skipped:
        print(f"warning: {session.log.path}: skipped {len(session.log.skipped)} unreadable line(s) "
              f"(first: line {session.log.skipped[0]}; a write cut short by a crash)")
    progress = session.progress()
    print(f"{progress['total']} examples from {file}, {progress['reviewed']} reviewed; decisions go to {session.log.path}")
    print(f"review page: http://{host}:{port}/  (Ctrl+C stops; the log keeps every decision)")
    run_server(app_, host=host, port=port, api_key=api_key)


@app.command()
def pairs(
    model: str = typer.Argument(..., help="Model or run whose mistakes to collect (e.g. an SFT run directory)."),
    data: str = typer.Option(..., "--data", help="Examples with reference answers (any supported format)."),
    out: Path = typer.Option(..., "--out", help="Preference pairs to write (.jsonl or .parquet)."),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    columns: Optional[str] = typer.Option(None, "--columns", help=COLUMNS_HELP),
    skip: bool = typer.Option(False, "--skip", help=SKIP_HELP),
    rejects: Optional[Path] = typer.Option(None, "--rejects", help=REJECTS_HELP("OUT.rejects.jsonl")),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use only the first N examples."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Longest generated answer."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts generated together."),
    anchors: float = typer.Option(0.0, "--anchors", min=0.0,
                                  help="Also R x as many anchor pairs from right answers (the right answer chosen, "
                                       "another reference of the same group rejected), so DPO keeps them right."),
    group: str = typer.Option("task", "--group", help="Field whose value groups examples for anchor pairs."),
) -> None:
    """Preference pairs from a model's mistakes: reference answer chosen, the model's wrong answer rejected."""
    from sftlab.data.load import save_conversations
    from sftlab.data.formats import to_conversation
    from sftlab.errors import SftlabError
    from sftlab.models import load_model, load_tokenizer
    from sftlab.train.mistake_pairs import pairs_from_model

    _not_the_input(data, out)
    reading = _reading(data, _schema(format, columns), skip=skip, rejects=rejects, out=out)
    conversations = reading.load()
    if not skip:  # skip mode rejects (and counts) them with the prompts the model cannot take, below
        conversations = [c for c in conversations if c.reference() is not None]
    conversations = conversations[:limit] if limit else conversations
    if not conversations:
        raise SftlabError(f"{data}: no example with a reference answer")
    llm, tokenizer = load_model(model), load_tokenizer(model)
    if skip:
        from sftlab.evaluation.evaluate import answerable

        with reading:
            conversations = answerable(conversations, llm, tokenizer, max_new_tokens=max_new_tokens,
                                       reject=reading.reject)
        print_rejects(reading)
    found, stats = pairs_from_model(llm, tokenizer, conversations,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size, anchors=anchors, group=group)
    written = save_conversations(out, (to_conversation(p, p["source"]) for p in found))
    write_json(_sidecar(out, "pairs"), {"model": model, "data": data, **stats.to_json(), "reading": reading.to_json()})
    print(f"{stats.examples} examples: {stats.correct} right, {stats.empty} empty answers, "
          f"{stats.pairs} pairs from wrong answers" + (f" + {stats.anchors} anchor pairs" if anchors else "")
          + f" -> {out} ({written} written)")
