"""The broken-input corpus (tests/data/bad/) through every command that reads data.

For each file and command: no traceback; a bad file is exit 1 with one line naming the file and
the line (or row) of the first bad record; in skip mode every good record is kept and
records in == kept + rejected. CASES says what each file holds; make_bad.py how it was made.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from sftlab.cli import main
from sftlab.models import load_model, load_tokenizer

BAD = Path(__file__).parents[1] / "data" / "bad"
TOKENIZER = Path(__file__).parents[1] / "fixtures" / "smollm2-tokenizer"


@dataclass(frozen=True)
class Case:
    good: int = 0  # records every command keeps
    bad: int = 0  # records skip mode rejects (a file that breaks part-way: its rest is one)
    where: str | None = None  # where the first error points, after the path (":3", ":row 2")
    fatal: bool = False  # unreadable as a whole: an error in skip mode too


CASES: dict[str, Case] = {
    # unreadable files
    "empty.json": Case(where=":1", fatal=True),
    "truncated.parquet": Case(where=":", fatal=True),
    "not_parquet.parquet": Case(where=":", fatal=True),
    "scalar.json": Case(where=":1", fatal=True),
    "utf16.jsonl": Case(where=":1", fatal=True),
    "utf16.json": Case(where=":1", fatal=True),
    "columns_unequal.json": Case(where=":1", fatal=True),
    # no records at all
    "empty.jsonl": Case(),
    "empty.csv": Case(),
    "blank_lines.jsonl": Case(),
    "header_only.csv": Case(),
    # broken part-way: the records before the break are kept, the rest is one reject
    "cut_array.json": Case(good=4, bad=1, where=":6"),
    "unbalanced_quotes.csv": Case(good=1, bad=1, where=":3"),
    "corrupt_pages.parquet": Case(bad=1, where=":row 1"),
    "deep_nesting.json": Case(bad=1, where=":1"),  # an array whose first element is too deep to parse
    # bad records among good ones
    "bad_middle.jsonl": Case(good=4, bad=1, where=":3"),
    "deep_nesting.jsonl": Case(good=2, bad=1, where=":2"),
    "control_chars.jsonl": Case(good=3, bad=1, where=":3"),
    "lone_surrogates.jsonl": Case(good=3, bad=2, where=":2"),
    "latin1_mixed.jsonl": Case(good=3, bad=2, where=":2"),
    "latin1_mixed.csv": Case(good=2, bad=1, where=":3"),
    "binary_garbage.jsonl": Case(bad=5, where=":1"),
    "crlf_and_cr.jsonl": Case(good=2, bad=1, where=":3"),
    "ragged.csv": Case(good=3, bad=2, where=":3"),
    "ragged.tsv": Case(good=2, bad=1, where=":3"),
    "bad_message_json.csv": Case(good=1, bad=3, where=":3"),
    "huge_number.jsonl": Case(good=2, bad=1, where=":2"),  # an integer past Python's 4300-digit limit
    "missing_fields.jsonl": Case(good=2, bad=7, where=":2"),
    "wrong_types.jsonl": Case(good=2, bad=17, where=":2"),
    "wrong_types.parquet": Case(good=1, bad=3, where=":row 2"),
    "nested_columns.parquet": Case(good=2, bad=2, where=":row 2"),
    "empty_answers.jsonl": Case(good=2, bad=7, where=":2"),
    "roles_out_of_order.jsonl": Case(good=2, bad=8, where=":2"),
    "mixed_schemas.jsonl": Case(good=5, bad=1, where=":3"),
    "preference_bad.jsonl": Case(good=3, bad=4, where=":2"),
    # odd but readable
    "bom.jsonl": Case(good=2),
    "bom.json": Case(good=2),
    "bom.csv": Case(good=2),
    "long_line.jsonl": Case(good=3),
    "long_field.csv": Case(good=2),  # a field longer than the csv module's 128 KiB default limit
    "numbers_and_dupes.jsonl": Case(good=4),
    "arrow_types.parquet": Case(good=2),  # timestamp, bytes and decimal columns
    "forbidden_answer.jsonl": Case(good=3),  # bad only under raising_template.jinja
}
FILES = sorted(CASES)


def test_corpus_is_complete_and_reproducible():
    sys.path.insert(0, str(BAD))
    try:
        import make_bad
    finally:
        sys.path.remove(str(BAD))
    assert {p.name for p in BAD.iterdir() if p.suffix != ".py" and p.is_file()} == set(make_bad.FILES)
    for name, data in make_bad.FILES.items():
        assert (BAD / name).read_bytes() == data, f"{name} differs from make_bad.py: rerun it"
    assert set(CASES) == {n for n in make_bad.FILES if not n.endswith(".jinja")}
    assert len(make_bad.FILES) >= 25


def run(capsys, *argv) -> tuple[int, str, str]:
    """The CLI in-process; any exception escaping main() is a traceback the user would see."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def one_line_error(err: str) -> str:
    """The error line (progress bars aside): exactly one, on one line."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def assert_names_record(err: str, name: str) -> None:
    case = CASES[name]
    line = one_line_error(err)
    assert f"error: {BAD / name}{case.where}" in line, line


def count_lines(path: Path) -> int:
    return sum(1 for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()) if path.exists() else 0


# --------------------------------------------------------------------------- data commands

@pytest.mark.parametrize("name", FILES)
def test_validate_strict_and_skip(name, tmp_path, capsys):
    case, path = CASES[name], BAD / name
    code, _, err = run(capsys, "data", "validate", path)
    if case.bad or case.fatal:
        assert code == 1
        assert_names_record(err, name)
    else:
        assert code == 0, err
    out, rejects = tmp_path / "kept.jsonl", tmp_path / "rejects.jsonl"
    code, _, err = run(capsys, "data", "validate", path, "--skip", "--out", out, "--rejects", rejects, "--no-dedup")
    if case.fatal:
        assert code == 1
        assert_names_record(err, name)
        return
    assert code == 0, err
    summary = json.loads((tmp_path / "kept.validate.json").read_text())
    assert (summary["kept"], summary["rejected"]) == (case.good, case.bad)
    assert summary["records_in"] == summary["kept"] + summary["rejected"]
    assert count_lines(out) == case.good and count_lines(rejects) == case.bad
    for reject in map(json.loads, rejects.read_text(encoding="utf-8").splitlines() if case.bad else []):
        assert reject["source"].startswith(f"{path}:") and reject["reason"]


DATA_COMMANDS = {
    "curate": lambda p, o: ["data", "curate", p, "--out", o / "c.jsonl", "--set", "near_dedup=false", "--set", "exact_dedup=false"],
    "split": lambda p, o: ["data", "split", p, "--out-dir", o],
    "augment": lambda p, o: ["data", "augment", p, "--out", o / "a.jsonl", "--strategy", "system"],
    "report": lambda p, o: ["data", "report", p, "--out-dir", o, "--model", "none"],
    "review": lambda p, o: ["data", "review", p, "--export", o / "r.jsonl", "--review-dir", o / "review"],
    "inspect": lambda p, o: ["data", "inspect", p, "--model", TOKENIZER, "--json"],
}


@pytest.fixture
def quick(monkeypatch):
    """The data commands without the parts that are slow and read no data: drawing the report's
    plots, and loading the same tokenizer again for every file."""
    import sftlab.data.report
    import sftlab.models

    monkeypatch.setattr(sftlab.data.report, "_plots", lambda summary, series: {})
    monkeypatch.setattr(sftlab.models, "load_tokenizer", _cached_tokenizer)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(name_or_path, **options):
    return load_tokenizer(name_or_path, **options)


@pytest.mark.parametrize("name", FILES)
def test_strict_data_commands(name, tmp_path, capsys, quick):
    """curate, split, augment, report, review --export and inspect read strictly: a bad record stops
    them with its file:line; a clean file goes through with all its records."""
    case, path = CASES[name], BAD / name
    for command, argv in DATA_COMMANDS.items():
        if command == "report" and not (case.bad or case.fatal) and case.good == 0:
            continue  # nothing to plot: covered by test_empty_inputs
        out = tmp_path / command
        code, stdout, err = run(capsys, *argv(path, out))
        if case.bad or case.fatal:
            assert code == 1, (command, err)
            assert_names_record(err, name)
        elif command == "review" and case.good == 0:
            assert code == 1 and f"{path}: no records to review" in one_line_error(err)
        else:
            assert code == 0, (command, err)
            assert_kept_rows(command, out, stdout, case.good)


def assert_kept_rows(command: str, out: Path, stdout: str, good: int) -> None:
    """What split, inspect and report produced holds every good record."""
    if command == "split":
        assert sum(json.loads((out / "split.json").read_text())["sizes"].values()) == good
    if command == "inspect":
        assert len(stdout.splitlines()) == good
    if command == "report":
        assert json.loads((out / "summary.json").read_text())["conversations"] == good


SKIP_OUTPUTS = {  # where each command, given --skip, writes its rejects and its summary (with "reading")
    "curate": ("c.rejects.jsonl", "c.curate.json"),
    "split": ("rejects.jsonl", "split.json"),
    "augment": ("a.rejects.jsonl", "a.augment.json"),
    "report": ("rejects.jsonl", "summary.json"),
    "review": ("r.rejects.jsonl", "r.review.json"),
    "inspect": ("{name}.rejects.jsonl", None),  # inspect writes no file: ./<FILE>.rejects.jsonl
}
COUNTS = re.compile(r"^records in (\d+): kept (\d+), rejected (\d+)$", re.M)


def printed_counts(text: str) -> tuple[int, int, int]:
    """The skip-mode line every command prints: records in, kept, rejected."""
    match = COUNTS.search(text)
    assert match, text
    return tuple(map(int, match.groups()))


@pytest.mark.parametrize("name", FILES)
def test_skip_data_commands(name, tmp_path, capsys, quick, monkeypatch):
    """The same commands with --skip: every good record is kept, every bad one is in the rejects
    file (by default beside the output) with its file:line, records in == kept + rejected,
    printed and in the summary JSON."""
    case, path = CASES[name], BAD / name
    monkeypatch.chdir(tmp_path)
    for command, argv in DATA_COMMANDS.items():
        out = tmp_path / command
        rejects_name, summary_name = SKIP_OUTPUTS[command]
        rejects = (Path() if command == "inspect" else out) / rejects_name.format(name=path.name)
        code, stdout, err = run(capsys, *argv(path, out), "--skip")
        if case.fatal:
            assert code == 1, (command, err)
            assert_names_record(err, name)
            continue
        if command == "review" and case.good == 0:
            assert code == 1 and f"{path}: no records to review" in one_line_error(err)
            continue
        assert code == 0, (command, err)
        printed = err if command == "inspect" else stdout
        assert printed_counts(printed) == (case.good + case.bad, case.good, case.bad), command
        assert count_lines(rejects) == case.bad, command
        if case.bad:
            assert f"rejects written to {rejects}" in printed, command
        for reject in map(json.loads, rejects.read_text().splitlines() if case.bad else []):
            assert reject["source"].startswith(f"{path}:") and reject["reason"], command
        if summary_name:
            reading = json.loads((out / summary_name).read_text())["reading"]
            counts = (reading["records_in"], reading["kept"], reading["rejected"])
            assert counts == (case.good + case.bad, case.good, case.bad), command
        assert_kept_rows(command, out, stdout, case.good)
        if command == "report":
            assert ("Rejected on reading" in (out / "report.md").read_text()) == bool(case.bad)
        if command == "review":
            assert json.loads((out / summary_name).read_text())["total"] == case.good


def test_empty_inputs_report(tmp_path, capsys):
    code, _, err = run(capsys, "data", "report", BAD / "header_only.csv", "--out-dir", tmp_path, "--model", "none")
    assert code == 0, err
    assert json.loads((tmp_path / "summary.json").read_text())["conversations"] == 0


def test_damaged_saved_dataset_folders(tmp_path, capsys):
    from datasets import Dataset

    good = tmp_path / "good"
    Dataset.from_list([{"prompt": "What is 1 plus 1?", "completion": "2."}, {"prompt": "q", "completion": " "}]).save_to_disk(good)
    code, _, err = run(capsys, "data", "validate", good)
    assert code == 1 and f"error: {good}:row 2: empty content" in one_line_error(err)
    no_data = tmp_path / "no_data"
    no_data.mkdir()
    (no_data / "dataset_info.json").write_text("{")
    cut = tmp_path / "cut"
    shutil.copytree(good, cut)
    for arrow in cut.glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:200])
    for folder in (no_data, cut):
        code, _, err = run(capsys, "data", "validate", folder, "--skip")
        assert code == 1 and f"error: {folder}: not a readable saved Hugging Face dataset" in one_line_error(err)


@pytest.mark.parametrize("command", ["curate", "augment"])
def test_bad_option_files_and_sets(command, tmp_path, capsys):
    (tmp_path / "tab.yaml").write_text("near_dedup: false\n\tpii: [\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "latin1.yaml").write_bytes(b"pii: true # caf\xe9\n")
    argv = [*DATA_COMMANDS[command](BAD / "bom.jsonl", tmp_path)]
    for extra, message in ((["--config", tmp_path / "tab.yaml"], f"{tmp_path / 'tab.yaml'}:2: invalid YAML"),
                           (["--config", tmp_path / "list.yaml"], "a config must be a mapping"),
                           (["--config", tmp_path / "latin1.yaml"], "not UTF-8"),
                           (["--set", "seed=[unclosed"], "option 'seed'"),
                           (["--set", "seed"], "--set needs KEY=VALUE")):
        code, _, err = run(capsys, *argv, *extra)
        assert code == 1 and message in one_line_error(err), (extra, err)


@pytest.mark.parametrize("argv,message", [
    (["data", "curate", "x.jsonl"], "Missing option '--out'"),
    (["data", "inspect", "x.jsonl", "--limit", "-1"], "Invalid value for '--limit'"),
    (["data", "pairs", "m", "--data", "x.jsonl", "--out", "p.jsonl", "--limit", "0"], "Invalid value for '--limit'"),
    (["eval", "m", "--batch-size", "abc"], "Invalid value for '--batch-size'"),
    (["data", "nosuch"], "No such command 'nosuch'"),
])
def test_usage_errors_are_messages_not_tracebacks(argv, message, capsys):
    """typer carries its own copy of click: its usage errors must be caught too."""
    code, _, err = run(capsys, *argv)
    assert code == 2 and f"Error: {message}" in err


def test_unusable_output_paths(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    folder = tmp_path / "out.jsonl"
    folder.mkdir()
    for argv, message in ((["data", "report", BAD / "bom.jsonl", "--out-dir", blocker / "sub", "--model", "none"], "Not a directory"),
                          (["data", "validate", BAD / "bom.jsonl", "--out", folder], f"Is a directory: {tmp_path / '.out.jsonl.tmp'} -> {folder}"),
                          (["data", "split", BAD / "bom.jsonl", "--out-dir", tmp_path, "--names", "a,a", "--ratios", "1,1"], "split names must differ")):
        code, _, err = run(capsys, *argv)
        assert code == 1 and message in one_line_error(err), err


# --------------------------------------------------------------------------- templates and tokenizers

def test_template_that_raises_rejects_only_its_record(tmp_path, capsys):
    path, template = BAD / "forbidden_answer.jsonl", BAD / "raising_template.jinja"
    code, _, err = run(capsys, "data", "inspect", path, "--model", TOKENIZER, "--chat-template", template, "--json")
    line = one_line_error(err)
    assert code == 1 and f"error: {path}:2: chat template error:" in line and "may not say forbidden" in line
    assert str(template) in line
    out = tmp_path / "kept.jsonl"
    code, _, err = run(capsys, "data", "validate", path, "--skip", "--out", out, "--model", TOKENIZER,
                       "--chat-template", template, "--max-seq-length", "256")
    assert code == 0, err
    summary = json.loads((tmp_path / "kept.validate.json").read_text())
    assert (summary["records_in"], summary["kept"], summary["rejected_by_reason"]) == (3, 2, {"chat template error": 1})


@pytest.mark.parametrize("template,message", [
    ("broken_template.jinja", "does not parse: unexpected '}' (template line 1)"),
    ("sandbox_escape.jinja", "access to attribute '__class__' of 'list' object is unsafe"),
])
def test_broken_or_unsafe_template_is_one_line(template, message, capsys):
    code, _, err = run(capsys, "data", "inspect", BAD / "bom.jsonl", "--model", TOKENIZER,
                       "--chat-template", BAD / template)
    line = one_line_error(err)
    assert code == 1 and message in line and str(BAD / template) in line


@pytest.fixture(scope="module")
def no_template_tokenizer(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("no-template")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, folder / f)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_tokenizer_without_chat_template(no_template_tokenizer, tmp_path, capsys):
    for argv in (["data", "inspect", BAD / "bom.jsonl", "--model", no_template_tokenizer],
                 ["data", "validate", BAD / "bom.jsonl", "--model", no_template_tokenizer, "--max-seq-length", "64"]):
        code, _, err = run(capsys, *argv)
        assert code == 1 and f"'{no_template_tokenizer}' has no chat template" in one_line_error(err)


# --------------------------------------------------------------------------- train, eval, align

@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_training_data_path_counts_every_record(on_error, tokenizer, tmp_path):
    """What `sftlab train` does with each file (prepare_examples: load, render, cache), in both modes."""
    from sftlab.config import DataConfig
    from sftlab.errors import DataError, SftlabError
    from sftlab.train.dataset import prepare_examples

    for name in FILES:
        case = CASES[name]
        data = DataConfig(train=str(BAD / name), max_seq_length=512, on_error=on_error)
        rejects = tmp_path / f"{name}.rejects.jsonl"
        if case.fatal or (case.bad and on_error == "raise"):
            with pytest.raises(SftlabError) as e:
                prepare_examples(data.train, tokenizer, data, tmp_path / "cache", rejects)
            assert f"{BAD / name}{case.where}" in str(e.value) and "\n" not in str(e.value), name
            assert case.fatal or isinstance(e.value, DataError)
            continue
        examples, stats = prepare_examples(data.train, tokenizer, data, tmp_path / "cache", rejects)
        conversations = stats.examples - stats.text_blocks + stats.text_documents
        assert stats.records == conversations + stats.rejected + stats.too_long, name
        assert stats.rejected == case.bad and count_lines(rejects) == case.bad, name
        assert conversations + stats.too_long == case.good, name


def train_argv(tiny_model_dir, data, out, *extra):
    return ["train", "-", f"model.name_or_path={tiny_model_dir}", f"data.train={data}", f"output_dir={out}",
            "data.max_seq_length=128", "training.max_steps=1", "training.per_device_train_batch_size=2",
            "training.bf16=false", "training.save_steps=100", *extra]


def test_train_skip_mode_keeps_every_good_record(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    path = BAD / "roles_out_of_order.jsonl"
    for run_name in ("first", "cached"):  # the second run hits the render cache: same counts, same rejects file
        out = tmp_path / run_name
        code, _, err = run(capsys, *train_argv(tiny_model_dir, path, out, "data.on_error=skip"))
        assert code == 0, err
        info = json.loads((out / "run.json").read_text())["train_data"]
        assert (info["records"], info["examples"], info["rejected"]) == (10, 2, 8)
        assert info["cached"] == (run_name == "cached")
        assert count_lines(out / "rejects.jsonl") == 8


def test_train_strict_and_template_errors_name_the_record(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    code, _, err = run(capsys, *train_argv(tiny_model_dir, BAD / "lone_surrogates.jsonl", tmp_path / "a"))
    assert code == 1 and f"error: {BAD / 'lone_surrogates.jsonl'}:2: invalid unicode: lone surrogate" in one_line_error(err)
    template = f"model.chat_template={BAD / 'raising_template.jinja'}"
    path = BAD / "forbidden_answer.jsonl"
    code, _, err = run(capsys, *train_argv(tiny_model_dir, path, tmp_path / "b", template))
    assert code == 1 and f"error: {path}:2: chat template error" in one_line_error(err)
    code, _, err = run(capsys, *train_argv(tiny_model_dir, path, tmp_path / "c", template, "data.on_error=skip"))
    assert code == 0, err
    info = json.loads((tmp_path / "c" / "run.json").read_text())["train_data"]
    assert (info["records"], info["examples"], info["rejected"]) == (3, 2, 1)


EVAL_UNUSABLE: dict[str, tuple[int, str]] = {  # good records eval cannot ask the model: how many, the first
    "long_line.jsonl": (1, ":2: the prompt is "),  # longer than the tiny model's context
    "long_field.csv": (1, ":2: the prompt is "),
    "mixed_schemas.jsonl": (1, ":6: no assistant answer"),  # raw text: no answer to compare with
}


@functools.lru_cache(maxsize=1)
def _cached_model(name_or_path, **options):
    return load_model(name_or_path, **options)


@pytest.mark.parametrize("name", FILES)
def test_eval_strict_and_skip(name, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`sftlab eval` on every file (the model loaded once): strict stops at the first bad record;
    --skip evaluates every usable record and rejects the rest, records in == kept + rejected."""
    import sftlab.models

    monkeypatch.setattr(sftlab.models, "load_model", _cached_model)
    monkeypatch.setattr(sftlab.models, "load_tokenizer", _cached_tokenizer)
    case, path = CASES[name], BAD / name
    unusable, where = EVAL_UNUSABLE.get(name, (0, None))
    argv = ["eval", tiny_model_dir, "--data", path, "--max-new-tokens", "1", "--metrics", "exact_match"]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "strict")
    if case.bad or case.fatal:
        assert code == 1
        assert_names_record(err, name)
    elif unusable:
        assert code == 1 and f"error: {path}{where}" in one_line_error(err)
    elif case.good == 0:
        assert code == 1 and f"{path}: no examples to evaluate" in one_line_error(err)
    else:
        assert code == 0, err
        assert count_lines(tmp_path / "strict" / "predictions.jsonl") == case.good
    out = tmp_path / "skip"
    code, stdout, err = run(capsys, *argv, "--out", out, "--skip")
    if assert_skip_counts(name, code, stdout, err, out / "rejects.jsonl"):
        assert count_lines(out / "predictions.jsonl") == case.good - unusable


def assert_skip_counts(name: str, code: int, stdout: str, err: str, rejects: Path) -> bool:
    """eval or pairs in skip mode: every usable record answered, the rest rejected and counted.
    False where there was nothing to answer (an unreadable or empty file: exit 1)."""
    case, path = CASES[name], BAD / name
    unusable, where = EVAL_UNUSABLE.get(name, (0, None))
    if case.fatal:
        assert code == 1
        assert_names_record(err, name)
        return False
    if case.good == 0:
        assert code == 1 and f"{path}: no exam" in one_line_error(err)
        return False
    assert code == 0, err
    assert printed_counts(stdout) == (case.good + case.bad, case.good - unusable, case.bad + unusable)
    assert count_lines(rejects) == case.bad + unusable
    lines = [json.loads(x) for x in rejects.read_text(encoding="utf-8").splitlines()] if rejects.exists() else []
    assert all(r["source"].startswith(f"{path}:") for r in lines)
    if unusable:
        assert any(f"{r['source']}: {r['reason']}".startswith(f"{path}{where}") for r in lines), lines
    return True


def test_pairs_strict_and_skip(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`sftlab data pairs` (it asks the model, as eval does) on every file, strict and --skip."""
    import sftlab.models

    monkeypatch.setattr(sftlab.models, "load_model", _cached_model)
    monkeypatch.setattr(sftlab.models, "load_tokenizer", _cached_tokenizer)
    for name in FILES:
        case, path = CASES[name], BAD / name
        argv = ["data", "pairs", tiny_model_dir, "--data", path, "--max-new-tokens", "1"]
        code, _, err = run(capsys, *argv, "--out", tmp_path / "strict.jsonl")
        unusable, where = EVAL_UNUSABLE.get(name, (0, None))
        if case.bad or case.fatal:
            assert code == 1, name
            assert_names_record(err, name)
        elif unusable and "prompt" in where:  # strict pairs leaves out records without an answer
            assert code == 1 and f"error: {path}{where}" in one_line_error(err)
        out = tmp_path / name / "pairs.jsonl"
        code, stdout, err = run(capsys, *argv, "--out", out, "--skip")
        if assert_skip_counts(name, code, stdout, err, tmp_path / name / "pairs.rejects.jsonl"):
            reading = json.loads((tmp_path / name / "pairs.pairs.json").read_text())["reading"]
            assert reading["kept"] == json.loads((tmp_path / name / "pairs.pairs.json").read_text())["examples"]


def test_eval_on_odd_but_readable_data(tiny_model_dir, tmp_path, capsys):
    code, _, err = run(capsys, "eval", tiny_model_dir, "--data", BAD / "numbers_and_dupes.jsonl", "--out", tmp_path,
                       "--max-new-tokens", "2", "--metrics", "exact_match,perplexity")
    assert code == 0, err
    assert count_lines(tmp_path / "predictions.jsonl") == 4


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_align_data_path_counts_every_record(on_error, tokenizer, tmp_path):
    """What `sftlab align` does with each file (load_preferences: read, pair, render), in both modes.
    Only preference pairs are usable: any other record is one more reject, never a silent drop."""
    from sftlab.config import DataConfig
    from sftlab.errors import SftlabError
    from sftlab.train.preference import load_preferences

    for name in FILES:
        case, path = CASES[name], BAD / name
        data = DataConfig(train=str(path), max_seq_length=512, on_error=on_error)
        rejects = tmp_path / f"{name}.rejects.jsonl"
        try:
            rows, stats = load_preferences(data.train, tokenizer, data, paired=True, rejects_path=rejects)
        except SftlabError as e:
            message = str(e)
            assert message.startswith(f"{path}:") and "\n" not in message, (name, message)
            if case.fatal:
                assert message.startswith(f"{path}{case.where}"), (name, message)
            elif on_error == "skip":  # no pair among them: every record is in the rejects file
                assert "no usable preference record" in message and count_lines(rejects) == case.good + case.bad, name
            continue
        assert stats.records == case.good + case.bad, name
        assert stats.records == len(rows) + stats.rejected + stats.too_long, name
        assert stats.rejected >= case.bad and count_lines(rejects) == stats.rejected, name
        assert on_error == "skip" or stats.rejected == 0, name


def test_align_skip_counts_and_strict_error(tiny_model_dir, tmp_path, capsys):
    path = BAD / "preference_bad.jsonl"
    argv = ["align", "-", f"model.name_or_path={tiny_model_dir}", f"data.train={path}", "data.max_seq_length=128",
            "training.max_steps=1", "training.per_device_train_batch_size=2", "training.bf16=false"]
    code, _, err = run(capsys, *argv, f"output_dir={tmp_path / 'strict'}")
    assert code == 1 and f"error: {path}:2: identical pair" in one_line_error(err)
    code, _, err = run(capsys, *argv, f"output_dir={tmp_path / 'skip'}", "data.on_error=skip")
    assert code == 0, err
    info = json.loads((tmp_path / "skip" / "run.json").read_text())["train_data"]
    # 7 records: 2 good pairs; 4 bad records and 1 prompt/completion record that is no pair
    assert (info["records"], info["rows"], info["rejected"]) == (7, 2, 5)
    assert count_lines(tmp_path / "skip" / "rejects.jsonl") == 5


# --------------------------------------------------------------------------- a real process

@pytest.mark.parametrize("name", ["deep_nesting.jsonl", "utf16.jsonl", "corrupt_pages.parquet"])
def test_subprocess_stderr_is_one_line(name):
    proc = subprocess.run([sys.executable, "-m", "sftlab.cli", "data", "validate", str(BAD / name)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"error: {BAD / name}{CASES[name].where}" in one_line_error(proc.stderr)


def test_a_column_mapping_that_no_record_fits_is_an_error_in_skip_mode_too(tmp_path, capsys, monkeypatch):
    """Skip mode counts bad records; a mapping naming a column no record has is the user's mistake, not
    40 bad records: one error, and in strict mode the missing field's error names the columns there are."""
    monkeypatch.chdir(tmp_path)  # where the rejects file goes by default
    data = tmp_path / "clf.csv"
    data.write_text("text,label\n" + "".join(f"review {i},pos\n" for i in range(40)))
    assert main(["data", "validate", str(data), "--columns", "prompt=txt,response=label", "--skip"]) == 1
    assert "every record (40) lacks a field the format or column mapping reads" in capsys.readouterr().err
    assert main(["data", "validate", str(data), "--columns", "prompt=txt,response=label"]) == 1
    assert "clf.csv:2: missing field: 'txt' (the record has: text, label)" in capsys.readouterr().err
