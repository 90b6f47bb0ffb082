"""Mistakes a new user makes, answered with one line that says what is wrong and where."""

from __future__ import annotations

import json
import sys

import pytest

from sftlab.cli import main
from sftlab.errors import SftlabError
from sftlab.models import load_model, load_tokenizer


@pytest.mark.parametrize("load", [load_tokenizer, load_model])
def test_an_empty_folder_is_not_a_hub_error(load, tmp_path):
    with pytest.raises(SftlabError) as e:
        load(str(tmp_path))
    assert str(e.value) == f"{tmp_path} holds no model or tokenizer (no config.json, tokenizer files or run.json)"


@pytest.mark.parametrize("written", ["checkpoints", "metrics.jsonl"])
def test_a_run_folder_without_run_json_is_an_unfinished_run(written, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" if written == "checkpoints" else run).mkdir(parents=True)
    (run / "config.yaml").write_text("model: {name_or_path: default}\n")
    if written == "metrics.jsonl":
        (run / written).write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello"}]}) + "\n")
    assert main(["data", "inspect", str(data), "--model", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run} is a training run that has not finished (no run.json yet")
    assert "--resume" in err and "hub" not in err and len(err.splitlines()) == 1


def test_a_missing_relative_model_folder_names_the_current_directory(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(SftlabError) as e:
        load_tokenizer("../tiny")
    assert str(e.value) == f"model folder not found: ../tiny (relative paths are read from the current directory, {work})"
    with pytest.raises(SftlabError) as e:
        load_tokenizer(str(tmp_path / "tiny"))
    assert str(e.value) == f"model folder not found: {tmp_path / 'tiny'}"  # absolute: nothing to add


def test_top_level_help_names_every_export_target(capsys):
    from sftlab.commands.export import TARGETS

    assert main(["--help"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("export "))
    assert all(target in line.lower() for target in TARGETS), line


def test_the_one_line_warning_format_is_set_once_however_often_main_runs():
    """Each `sftlab.cli.main` call wrapped the warning formatter in place in another layer: a process that
    runs many commands (a notebook, a sweep, a test worker) hit RecursionError formatting any warning."""
    import warnings

    from sftlab import cli

    for _ in range(2 * sys.getrecursionlimit()):
        cli._quiet_third_party_logs()
    assert warnings.formatwarning("w", UserWarning, "/elsewhere/a.py", 3, "").startswith("/elsewhere/a.py:3: UserWarning")
