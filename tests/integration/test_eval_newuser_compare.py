"""`sftlab compare` / `sftlab eval` with a base model that has no chat template, and cut-off answers in the report."""

from __future__ import annotations

import json
import shutil

import pytest

from sftlab.cli import main
from sftlab.data.conversation import Conversation
from sftlab.errors import SftlabError


@pytest.fixture(scope="module")
def bare_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model saved without a chat template, as base models are."""
    path = tmp_path_factory.mktemp("bare") / "base"
    shutil.copytree(tiny_model_dir, path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def _convs() -> list[Conversation]:
    return [Conversation([{"role": "user", "content": f"{n}+{n}?"}, {"role": "assistant", "content": str(2 * n)}],
                         f"test.jsonl:{n}") for n in range(1, 4)]


def test_compare_refuses_a_model_without_template_before_evaluating_any(tiny_model_dir, bare_model_dir, tmp_path,
                                                                        monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a model was evaluated before the comparison was refused")
    monkeypatch.setattr("sftlab.evaluation.compare.evaluate", never)
    from sftlab.evaluation.compare import compare_models

    with pytest.raises(SftlabError, match=f"'{bare_model_dir}' has no chat template.*--chat-template"):
        compare_models({"tuned": str(tiny_model_dir), "base": str(bare_model_dir)}, _convs(), tmp_path / "report")


def test_eval_of_a_model_without_template_is_one_line(bare_model_dir, tmp_path, capsys):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"messages": c.messages}) + "\n" for c in _convs()))
    assert main(["eval", str(bare_model_dir), "--data", str(data), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "has no chat template" in err and "--chat-template" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_compare_report_warns_of_answers_cut_at_max_new_tokens(tokenizer, tmp_path, monkeypatch):
    from sftlab.evaluation.compare import write_compare_report
    from sftlab.evaluation.evaluate import evaluate

    def plant(cut: bool):
        ids = [28] * 4 if cut else []
        monkeypatch.setattr("sftlab.evaluation.generate.generate_ids", lambda m, t, prompts, **kw: [ids] * len(prompts))
        return evaluate(None, tokenizer, _convs(), metrics=["exact_match"], max_new_tokens=4, progress=False)

    result = write_compare_report({"base": plant(False), "tuned": plant(True)}, tmp_path, n_bootstrap=10)
    assert result.data["models"]["tuned"]["cut_off"] == 3 and result.data["models"]["base"]["cut_off"] == 0
    report = result.paths["markdown"].read_text()
    assert "tuned: 3 of 3 answers reached max_new_tokens (4)" in report and "base: " not in report.split("## ")[0]
