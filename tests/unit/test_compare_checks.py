"""`sftlab compare` checks each model once, all of them before it reads the data or loads any."""

from __future__ import annotations

import json

import pytest

from sftlab.errors import SftlabError


CHECKED = [("check", "base"), ("check", "tuned"), ("tokenizer", "base"), ("tokenizer", "tuned")]


def test_each_model_is_checked_once_before_any_loads(tmp_path, monkeypatch):
    """The CLI checked the models before reading the data, and compare_models checked them all again."""
    from sftlab.cli import main
    from sftlab.evaluation.compare import compare_models

    events = []
    monkeypatch.setattr("sftlab.models.check_model", lambda spec: events.append(("check", spec)))

    def load_model(spec):
        events.append(("load", spec))
        raise SftlabError("stop")
    monkeypatch.setattr("sftlab.models.load_model", load_model)

    class Tokenizer:
        chat_template = "{{ messages }}"
    # every model's chat template is checked before any model loads
    monkeypatch.setattr("sftlab.models.load_tokenizer",
                        lambda spec, chat_template=None: events.append(("tokenizer", spec)) or Tokenizer())
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}))
    assert main(["compare", "base", "tuned", "--data", str(data)]) == 1
    assert events == [*CHECKED, ("load", "base")]
    events.clear()
    with pytest.raises(SftlabError, match="stop"):  # an API caller's models are checked by compare_models itself
        compare_models({"base": "base", "tuned": "tuned"}, [], tmp_path / "out", progress=False)
    assert events == [*CHECKED, ("load", "base")]
