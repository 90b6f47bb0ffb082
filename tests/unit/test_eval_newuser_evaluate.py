"""`evaluate` on planted generations (no model): several references, answers cut at max_new_tokens,
and a tokenizer without a chat template."""

from __future__ import annotations

import copy

import pytest

from sftlab.data.conversation import Conversation
from sftlab.errors import SftlabError
from sftlab.evaluation.evaluate import evaluate


def _conv(question: str, answer: str, line: int, **meta) -> Conversation:
    return Conversation([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                        f"squad.jsonl:{line}", meta=meta)


def _plant(monkeypatch, tokenizer, replies: dict[str, list[int] | str]) -> None:
    """generate_ids answers each prompt with the planted ids (or the ids of the planted text)."""
    def fake(model, tok, prompts, **kwargs):
        out = [replies[p[-1]["content"]] for p in prompts]
        return [tokenizer.encode(x, add_special_tokens=False) if isinstance(x, str) else x for x in out]
    monkeypatch.setattr("sftlab.evaluation.generate.generate_ids", fake)


def test_the_records_own_answer_counts_among_its_references(monkeypatch, tokenizer):
    convs = [_conv("Which team won?", "Denver Broncos", 1, references=["The Denver Broncos", "Broncos"]),
             _conv("Where?", "Levi's Stadium", 2, references=["Levi's Stadium", "Santa Clara"])]
    _plant(monkeypatch, tokenizer, {"Which team won?": "Denver Broncos", "Where?": "Santa Clara"})
    result = evaluate(None, tokenizer, convs, metrics=["exact_match", "bleu"], progress=False)
    assert [r["scores"]["exact_match"] for r in result.records] == [1.0, 1.0]
    assert result.records[0]["references"] == ["Denver Broncos", "The Denver Broncos", "Broncos"]
    assert result.records[1]["references"] == ["Levi's Stadium", "Santa Clara"]  # no repeat


def test_answers_cut_at_max_new_tokens_are_flagged_and_warned(monkeypatch, tokenizer, capsys):
    from sftlab.evaluation.console import print_eval

    convs = [_conv("Think, then answer: 2+2?", "4", 1), _conv("3+3?", "6", 2)]
    _plant(monkeypatch, tokenizer, {"Think, then answer: 2+2?": [28] * 5, "3+3?": "6"})
    result = evaluate(None, tokenizer, convs, metrics=["exact_match"], max_new_tokens=5, progress=False)
    assert [r["cut_off"] for r in result.records] == [True, False]
    assert result.summary()["cut_off"] == 1
    print_eval({"tiny": result})
    assert "1 of 2 answers reached max_new_tokens (5) before a stop token" in " ".join(capsys.readouterr().out.split())


def test_a_tokenizer_without_chat_template_is_refused_in_one_line(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(SftlabError, match=r"has no chat template to write the prompts with: give --chat-template") as e:
        evaluate(None, bare, [_conv("2+2?", "4", 1)], metrics=["exact_match"], progress=False)
    assert "\n" not in str(e.value)
