"""The docs stay true to the code.

- docs/configuration.md holds a table of every config key generated from the pydantic
  models in `sftlab.config` (type, default, description); the test regenerates it and
  fails when the doc differs. Refresh it with `python tests/unit/test_docs_commands.py`.
- Every `sftlab COMMAND` shown in README.md and docs/*.md names a registered command;
  where that command's module exists, its subcommands and `--flags` exist too.
- Every YAML in configs/ and every YAML snippet in the docs validates as a TrainConfig (an
  AlignConfig when it has an `align:` section).
- Every documented command line runs, offline, in a sandbox on tiny data, unless it is on a
  short list of lines that cannot (each with the reason): see "running the documented commands".
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from sftlab.cli import COMMANDS
from sftlab.config import AlignConfig, TrainConfig, TrainingConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DOC = ROOT / "docs" / "configuration.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BEGIN = "<!-- BEGIN config-keys (generated from sftlab.config by `python tests/unit/test_docs_commands.py`; do not edit) -->"
END = "<!-- END config-keys -->"


# ---------------------------------------------------------------- the config table

def config_fields(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[tuple[str, type[BaseModel], str, object]]:
    """(dotted key, owning model, field name, FieldInfo) for every leaf key, in declaration order."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += config_fields(ann, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", model, name, field))
    return out


def _type_text(ann) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return str(args[0]) if len(args) == 1 else "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in args)
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if ann is type(None):
        return "null"
    return ann.__name__


_BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def _bounds(field) -> str:
    found = [f"{sym} {getattr(m, attr)}" for m in field.metadata for attr, sym in _BOUNDS.items()
             if getattr(m, attr, None) is not None]
    return f" ({', '.join(found)})" if found else ""


def _value_text(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n").removesuffix("\n...")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_table() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, owner, name, field in config_fields():
        if field.is_required():
            default = "**required**"
        else:
            value = field.default_factory() if field.default_factory is not None else field.default
            default = f"`{_value_text(value)}`"
        meaning = field.description
        if not meaning and owner is TrainingConfig:
            meaning = f"Same name and meaning as `transformers.TrainingArguments.{name}`."
        rows.append(f"| `{key}` | {_cell(_type_text(field.annotation) + _bounds(field))} | {_cell(default)} "
                    f"| {_cell(meaning or '')} |")
    return "\n".join(rows)


def _generated_block(text: str) -> str | None:
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def write_config_doc() -> None:
    text = CONFIG_DOC.read_text(encoding="utf-8")
    if _generated_block(text) is None:
        raise SystemExit(f"{CONFIG_DOC}: no {BEGIN!r} ... {END!r} markers to fill")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    CONFIG_DOC.write_text(f"{head}{BEGIN}\n{config_table()}\n{END}{tail}", encoding="utf-8")


def test_every_config_key_is_documented():
    text = CONFIG_DOC.read_text(encoding="utf-8")
    missing = [key for key, *_ in config_fields() if f"`{key}`" not in text]
    assert not missing, f"docs/configuration.md does not mention: {missing}"


def test_config_table_matches_the_models():
    block = _generated_block(CONFIG_DOC.read_text(encoding="utf-8"))
    assert block is not None, "docs/configuration.md lost its generated-table markers"
    assert block == config_table(), "docs/configuration.md is stale: run `python tests/unit/test_docs_commands.py`"


def test_config_table_shows_types_defaults_and_meanings():
    table = config_table()
    assert "| `data.train` | str | **required** |" in table
    assert "| `training.learning_rate` | float (> 0) | `0.0002` |" in table
    assert "| `method` | one of full, lora, dora, qlora | `lora` |" in table
    assert "| `training.report_to` | list of str | `[]` |" in table
    assert "| `training.bf16` | bool or auto | `auto` |" in table
    assert "sdpa \\| eager" in table  # a '|' inside a description must not split the cell


# ---------------------------------------------------------------- commands in the docs

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`\n]+)`")
_INVOCATION = re.compile(r"(?:^|(?<=[\s/]))sftlab\s+[a-z][\w-]*.*")


def invocations(text: str) -> list[str]:
    """Every `sftlab COMMAND ...` in fenced code (comments and pipes cut off) or inline code."""
    pieces: list[str] = []
    for block in _FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            pieces += re.split(r"&&|;|\s\|\s", re.split(r"\s#", line, maxsplit=1)[0])
    pieces += _INLINE.findall(_FENCE.sub("", text))
    found = (_INVOCATION.search(piece) for piece in pieces)
    return [" ".join(m.group(0).split()) for m in found if m]


def _doc_invocations() -> list[tuple[str, str]]:
    return [(doc.relative_to(ROOT).as_posix(), inv) for doc in DOCS for inv in invocations(doc.read_text(encoding="utf-8"))]


def test_invocations_are_found():
    text = ("Run `sftlab data inspect x.jsonl --json` or\n```bash\nsftlab train a.yaml \\\n  --resume  # go\n"
            "sftlab eval runs/x --data t.jsonl | head\n```\nnot src/sftlab/cli.py nor `sftlab`.\n")
    assert sorted(invocations(text)) == ["sftlab data inspect x.jsonl --json", "sftlab eval runs/x --data t.jsonl",
                                         "sftlab train a.yaml --resume"]


def test_docs_name_only_registered_commands():
    pairs = _doc_invocations()
    assert len(pairs) >= 20, "expected the docs to show commands"
    unknown = [(doc, inv) for doc, inv in pairs if inv.split()[1] not in COMMANDS]
    assert not unknown, f"commands not in sftlab.cli.COMMANDS: {unknown}"
    documented = {inv.split()[1] for _, inv in pairs}
    assert documented == set(COMMANDS), f"commands never shown in the docs: {set(COMMANDS) - documented}"


def _click_command(name: str):
    """The click command behind `sftlab NAME`, or None while its module is not written yet."""
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            return None
        raise
    import typer.main

    return typer.main.get_command(module.app)


_FLAG = re.compile(r"(?:^|(?<=[\s\[(]))(--?[A-Za-z][\w-]*)")


def _problems(invocation: str, command) -> list[str]:
    """What in `invocation` the click command does not accept (typer vendors click, so duck-type)."""
    try:
        words = shlex.split(invocation)[2:]
    except ValueError:
        words = invocation.split()[2:]
    path = invocation.split()[1]
    while hasattr(command, "commands") and words and not words[0].startswith("-"):
        sub = command.commands.get(words[0])
        if sub is None:
            return [f"'{path}' has no subcommand '{words[0]}'"]
        path, command, words = f"{path} {words[0]}", sub, words[1:]
    options = {"--help"}
    for param in command.params:
        if param.param_type_name == "option":
            options.update(param.opts + param.secondary_opts)
    flags = _FLAG.findall(" ".join(words))
    return [f"'sftlab {path}' has no option {flag}" for flag in flags if flag.split("=")[0] not in options]


def test_documented_subcommands_and_flags_exist():
    problems, checked = [], 0
    commands = {name: _click_command(name) for name in COMMANDS}
    for doc, inv in _doc_invocations():
        command = commands.get(inv.split()[1])
        if command is not None:
            checked += 1
            problems += [f"{doc}: `{inv}`: {p}" for p in _problems(inv, command)]
    assert checked, "no documented command could be checked"
    assert not problems, "\n".join(problems)


def test_flag_check_catches_a_wrong_flag():
    command = _click_command("train")
    assert _problems("sftlab train configs/lora.yaml --resume", command) == []
    assert _problems("sftlab train configs/lora.yaml --resumee", command) == ["'sftlab train' has no option --resumee"]


# ---------------------------------------------------------------- example records

def test_every_schema_has_a_converting_example_in_data_formats():
    """Each ```jsonl record in docs/data-formats.md converts; together they cover every schema."""
    from sftlab.data.formats import FORMATS, detect_format, to_conversation

    doc = ROOT / "docs" / "data-formats.md"
    blocks = re.findall(r"^```jsonl\n(.*?)^```", doc.read_text(encoding="utf-8"), re.S | re.M)
    from sftlab.data.oasst import conversations_from_trees, is_message_row

    seen = set()
    for block in blocks:
        records = [(f"{doc.name} example", json.loads(line)) for line in block.splitlines()]
        if all(is_message_row(r) for _, r in records):  # OpenAssistant rows: a file of them is read as trees
            records = list(conversations_from_trees(records))
        for source, record in records:
            to_conversation(record, source)
            seen.add(detect_format(record))
    assert seen == set(FORMATS), f"schemas without an example: {set(FORMATS) - seen}"


# ---------------------------------------------------------------- configs

@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_config_validates(path):
    config = load_config(path, cls=_config_class(yaml.safe_load(path.read_text(encoding="utf-8"))))
    assert isinstance(config, TrainConfig)


def _config_class(tree: dict) -> type[TrainConfig]:
    return AlignConfig if "align" in tree else TrainConfig


def test_there_are_example_configs():
    names = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert {"lora.yaml", "full.yaml"} <= names


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_yaml_snippets_in_docs_validate():
    """Config snippets may be partial; merged into a minimal config they must validate."""
    snippets = [(doc.name, block) for doc in DOCS
                for block in re.findall(r"^```ya?ml\n(.*?)^```", doc.read_text(encoding="utf-8"), re.S | re.M)]
    assert snippets, "expected YAML config examples in the docs"
    for name, block in snippets:
        try:
            tree = yaml.safe_load(block)
            _config_class(tree).model_validate(_deep_merge({"data": {"train": "train.jsonl"}}, tree))
        except ValidationError as e:
            pytest.fail(f"{name}: a YAML snippet does not validate:\n{block}\n{e}")


# ---------------------------------------------------------------- running the documented commands
#
# Each documented `sftlab ...` line runs in-process, in a fresh copy of a sandbox folder that holds
# what the docs assume exists: the repository's configs/ and examples/, small demo files under the
# names the docs use (data.jsonl, train.jsonl, test.jsonl, runs/quickstart/data/, ...), and a
# finished LoRA run in runs/lora and runs/my-lora (as `sftlab train configs/lora.yaml` leaves it), and the
# other runs the docs use (runs/dpo, runs/tools, runs/sweep).
# The embedded default model is replaced by the tiny random Llama through SFTLAB_CACHE, so
# `default` costs nothing. One change to the lines themselves keeps them fast: a `sftlab train`
# line gets `training.max_steps=2`; and it starts where its output_dir holds no run yet (as the
# docs assume), unless it resumes.

# Documented lines that are not run here, by prefix, with the reason.
NOT_RUN = {
    "sftlab quickstart": "trains the real SmolLM2-135M for minutes; scripts/quickstart.sh runs it",
    "sftlab serve": "starts a server that runs until stopped; tests/e2e/test_deploy_serve.py starts one and queries it",
    "sftlab export runs/my-lora --to triton": "starts Triton Inference Server to verify the repository; "
                                               "tests/integration/test_deploy_export.py does",
    "sftlab export runs/lora --to gguf": "a q8_0 GGUF build and check: tests/integration/test_export_gguf.py exports "
                                         "the embedded model so (a tiny model's logits would pass any bound), and "
                                         "a LoRA run at f16, q8_0 and q4_0",
    "sftlab export runs/my-lora --to gguf": "the same as README.md's `sftlab export runs/lora --to gguf`",
    "sftlab export runs/my-lora --to onnx": "the same ONNX build and check as docs/guide.md's `sftlab export runs/lora "
                                            "runs/lora-onnx --to onnx`, which runs here (about a minute each on CPU)",
}
_SYNOPSIS = re.compile(r"\b[A-Z][A-Z_]{2,}\b|\.\.\.|\[--|\\\|")  # RUN, OUT, FILE, ..., [--opt], a\|b


def _positionals(words: list[str], command) -> list[str]:
    """The words of a command line that are arguments, not options or option values."""
    takes_value = {opt for p in getattr(command, "params", []) if p.param_type_name == "option" and not p.is_flag
                   for opt in p.opts}
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w.startswith("-"):
            skip = w in takes_value
        else:
            out.append(w)
    return out


def not_run_reason(invocation: str) -> str | None:
    """Why a documented line is not run, or None when it runs."""
    words = shlex.split(invocation)
    command = _click_command(words[1]) if words[1] in COMMANDS else None
    words = words[2:]
    while hasattr(command, "commands") and words and words[0] in command.commands:
        command, words = command.commands[words[0]], words[1:]
    if _SYNOPSIS.search(invocation):
        return "a usage synopsis with placeholders"
    listed = next((why for prefix, why in NOT_RUN.items() if invocation.startswith(prefix)), None)
    if listed:
        return listed
    params = getattr(command, "params", [])
    arguments = [p for p in params if p.param_type_name == "argument"]
    missing_option = any(p.required and not set(p.opts) & set(words) for p in params if p.param_type_name == "option")
    if hasattr(command, "commands") or missing_option or (arguments and not words) \
            or len(_positionals(words, command)) < sum(p.required for p in arguments):
        return "a command named in prose, not a command line"
    if "$" in invocation:
        return "uses a shell variable of the surrounding script"
    if "--nproc" in words:
        return "launches several processes under torchrun; tests/integration/test_distributed_cli.py runs `--nproc 2`"
    if invocation.startswith("sftlab data review") and "--export" not in words:
        return "starts the review page, which runs until stopped; tests/e2e/test_review_api.py starts one and uses it"
    return None


def _unique_invocations() -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for doc, inv in _doc_invocations():
        seen.setdefault(inv, doc)
    return [(doc, inv) for inv, doc in seen.items()]


def test_not_run_reasons():
    prose = "a command named in prose, not a command line"
    assert not_run_reason("sftlab eval") == prose
    assert not_run_reason("sftlab data validate --skip") == prose
    assert not_run_reason("sftlab data report data.jsonl") == prose  # --out-dir is required
    assert not_run_reason("sftlab export RUN --to merged OUT") == "a usage synopsis with placeholders"
    assert not_run_reason("sftlab serve runs/x").startswith("starts a server")
    assert not_run_reason("sftlab data inspect data.jsonl --json") is None
    assert not_run_reason("sftlab data inspect --config configs/lora.yaml") is None
    assert not_run_reason("sftlab train configs/lora.yaml lora.target_modules=[q_proj,v_proj]") is None


def test_every_documented_line_is_run_or_has_a_reason():
    pairs = _unique_invocations()
    ran = [inv for _, inv in pairs if not_run_reason(inv) is None]
    assert len(ran) >= 40, "most documented lines must run"
    unused = [p for p, why in NOT_RUN.items() if not any(not_run_reason(inv) == why for _, inv in pairs)]
    assert not unused, f"NOT_RUN names lines the docs no longer show: {unused}"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_model_dir):
    """(folder each documented line starts from a copy of, the model cache shared by all)."""
    import shutil

    from sftlab.cli import main
    from sftlab.demo.dataset import write_demo_dataset

    root = tmp_path_factory.mktemp("docs-sandbox")
    work, cache = root / "base", root / "cache"
    shutil.copytree(tiny_model_dir, cache / "models" / "smollm2-135m-instruct")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTLAB_CACHE", str(cache))
        work.mkdir()
        mp.chdir(work)
        for folder in ("configs", "examples"):
            shutil.copytree(ROOT / folder, work / folder)
        for path in (work / "examples" / "data").glob("*.jsonl"):  # the shipped data, cut short
            path.write_text("".join(path.read_text().splitlines(keepends=True)[:16]))
        demo = write_demo_dataset(work / "runs" / "quickstart" / "data", sizes={"train": 6, "validation": 2, "test": 2})
        shutil.copytree(work / "runs" / "quickstart" / "data", work / "data")
        for name, split in (("data.jsonl", "train"), ("train.jsonl", "train"), ("test.jsonl", "test")):
            shutil.copy(demo[split], work / name)
        shutil.copy(ROOT / "examples" / "data" / "corpus.jsonl", work / "corpus.jsonl")
        shutil.copy(ROOT / "examples" / "data" / "reading.csv", work / "qa.csv")
        shutil.copy(ROOT / "src" / "sftlab" / "templates" / "chatml.jinja", work / "my_template.jinja")
        shutil.copy(work / "data.jsonl", work / "reviewed.jsonl")
        for split in ("train", "validation"):  # what docs/alignment.md's `sftlab data pairs` lines write
            shutil.copy(work / "examples" / "data" / f"pairs.{split}.jsonl", work / "data" / f"pairs.{split}.jsonl")
        from datasets import load_dataset

        load_dataset("json", data_files=str(work / "train.jsonl")).save_to_disk(str(work / "ds"))
        for line in SANDBOX_LINES:  # -> runs/lora, runs/dpo, runs/tools, runs/sweep
            assert main(_argv(line)) == 0, line
            if line == SANDBOX_LINES[0]:
                for copy in ("my-lora", "quickstart/run"):
                    shutil.copytree(work / "runs" / "lora", work / "runs" / copy)
    return work, cache


# Documented lines the sandbox runs to make the runs the other lines read; each is checked there
# (test_documented_command_runs does not run it a second time).
SANDBOX_LINES = ("sftlab train configs/lora.yaml", "sftlab align configs/dpo.yaml", "sftlab train configs/tools.yaml",
                 "sftlab sweep configs/sweep.yaml")


def _argv(invocation: str) -> list[str]:
    """The argv a documented line runs as: a training line (train, align, sweep) trains 2 steps (a
    sweep 1 trial)."""
    argv = shlex.split(invocation)[1:]
    if ">" in argv:  # `... > file`: the shell's redirection; the output is captured here
        argv = argv[: argv.index(">")]
    if argv[0] not in ("train", "align", "sweep"):
        return argv
    if "--trials" in argv:
        argv[argv.index("--trials") + 1] = "1"
    elif argv[0] == "sweep":
        argv += ["--trials", "1"]
    return [*argv, "training.max_steps=2"]


def _runnable(invocation: str) -> list[str]:
    """`_argv`, its training line started from a clear output_dir unless it resumes."""
    argv = _argv(invocation)
    if argv[0] in ("train", "align", "sweep") and "--resume" not in argv:
        import shutil

        config = argv[1]
        overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
        tree = {} if config == "-" else yaml.safe_load(Path(config).read_text()) or {}
        cfg = load_config(None if config == "-" else config, overrides, cls=_config_class(tree))
        shutil.rmtree(cfg.output_dir, ignore_errors=True)
    return argv


def _lines_to_run() -> list[tuple[str, str]]:
    """The documented lines that run, each argv once (`sweep X` and `sweep X --trials 8` run alike)."""
    seen: dict[tuple[str, ...], tuple[str, str]] = {}
    for doc, inv in _unique_invocations():
        if not_run_reason(inv) is None:
            seen.setdefault(tuple(_argv(inv)), (doc, inv))
    return list(seen.values())


@pytest.mark.slow
@pytest.mark.parametrize("doc,invocation", _lines_to_run(),
                         ids=lambda v: v if v.startswith("sftlab") else None)
def test_documented_command_runs(doc, invocation, sandbox, tmp_path, monkeypatch, capsys):
    import io
    import shutil

    from sftlab.cli import main

    work, cache = sandbox
    if _argv(invocation) in map(_argv, SANDBOX_LINES):
        return  # the sandbox ran this very line, from this state, and checked that it exits 0
    shutil.copytree(work, tmp_path / "w", symlinks=True)  # every line starts from the same state
    monkeypatch.chdir(tmp_path / "w")
    monkeypatch.setenv("SFTLAB_CACHE", str(cache))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))  # `sftlab chat`: one message, then end of input
    code = main(_runnable(invocation))
    out = capsys.readouterr()
    assert code == 0, f"{doc}: `{invocation}` exited {code}:\n{out.err[-2000:]}\n{out.out[-2000:]}"


if __name__ == "__main__":
    write_config_doc()
    print(f"wrote {CONFIG_DOC.relative_to(ROOT)}", file=sys.stderr)
