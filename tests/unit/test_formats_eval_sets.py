"""Evaluation sets in the layouts they are downloaded in: SQuAD's several answers and unanswerable
questions, and the native multiple-choice layouts (MMLU, ARC, HellaSwag, PIQA)."""

from __future__ import annotations

import json

import pytest

from sftlab.data.formats import RecordError, detect_format, to_conversation
from sftlab.data.load import RejectLog, iter_conversations
from sftlab.evaluation.choice import answer_index
from sftlab.evaluation.evaluate import evaluate

SRC = "eval.jsonl:3"
SUPER_BOWL = {"id": "56be4db0", "title": "Super_Bowl_50", "context": "The Denver Broncos defeated the Carolina Panthers.",
              "question": "Which NFL team won Super Bowl 50?",
              "answers": {"text": ["Denver Broncos", "Broncos", "Denver Broncos"], "answer_start": [4, 11, 4]}}


def _plant(monkeypatch, tokenizer, replies: dict[str, str]) -> None:
    """generate_ids answers each prompt (by its question's first line) with the ids of the planted text."""
    def fake(model, tok, prompts, **kwargs):
        return [tokenizer.encode(replies[p[-1]["content"].split("\n")[0]], add_special_tokens=False) for p in prompts]
    monkeypatch.setattr("sftlab.evaluation.generate.generate_ids", fake)


def test_squad_trains_on_the_first_answer_and_keeps_every_distinct_one_as_references():
    c = to_conversation(SUPER_BOWL, SRC)
    assert c.messages[-1] == {"role": "assistant", "content": "Denver Broncos"}
    assert c.meta == {"id": "56be4db0", "title": "Super_Bowl_50", "references": ["Denver Broncos", "Broncos"]}
    one = to_conversation({**SUPER_BOWL, "answers": {"text": ["Denver Broncos"], "answer_start": [4]}}, SRC)
    assert "references" not in one.meta  # the record's own answer is always accepted


def test_squad_second_answer_scores_exact_match(monkeypatch, tokenizer):
    convs = [to_conversation(SUPER_BOWL, "squad.jsonl:1")]
    _plant(monkeypatch, tokenizer, {"Which NFL team won Super Bowl 50?": "Broncos"})
    result = evaluate(None, tokenizer, convs, metrics=["exact_match"], progress=False)
    assert result.records[0]["scores"]["exact_match"] == 1.0


def test_squad2_unanswerable_questions_are_counted_rejects_and_the_rest_is_kept(tmp_path):
    path = tmp_path / "squad2.jsonl"
    unanswerable = {**SUPER_BOWL, "id": "5a8d7bf7", "answers": {"text": [], "answer_start": []}}
    path.write_text("".join(json.dumps(r) + "\n" for r in (unanswerable, SUPER_BOWL)))
    rejects = RejectLog(tmp_path / "rejects.jsonl")
    with rejects:
        kept = list(iter_conversations(path, on_error="skip", rejects=rejects))
    assert [c.meta["id"] for c in kept] == ["56be4db0"]
    assert rejects.summary() == {"empty content": 1}
    line = json.loads((tmp_path / "rejects.jsonl").read_text())
    assert line["source"] == f"{path}:1" and "unanswerable question" in line["reason"]


MMLU = {"question": "What is the capital of France?", "subject": "geography",
        "choices": ["Lyon", "Paris", "Nice", "Lille"], "answer": 1}
ARC = {"id": "Mercury_7175875", "question": "Which gas do plants take in?",
       "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
       "answerKey": "B"}
FRANCE_PROMPT = "What is the capital of France?\n\nA. Lyon\nB. Paris\nC. Nice\nD. Lille"


@pytest.mark.parametrize("record,prompt,answer,index,meta", [
    (MMLU, FRANCE_PROMPT, "Paris", 1, {"subject": "geography"}),
    ({**MMLU, "answer": "B"}, FRANCE_PROMPT, "Paris", 1, {"subject": "geography"}),
    (ARC, "Which gas do plants take in?\n\nA. oxygen\nB. carbon dioxide\nC. helium\nD. neon",
     "carbon dioxide", 1, {"id": "Mercury_7175875"}),
    ({**ARC, "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["1", "2", "3"]}, "answerKey": "3"},
     "Which gas do plants take in?\n\nA. oxygen\nB. carbon dioxide\nC. helium", "helium", 2, {"id": "Mercury_7175875"}),
    ({"ind": 4, "activity_label": "Roof shingle removal", "ctx": "A man is on a roof. He",
      "endings": ["sings.", "pulls up shingles.", "flies away.", "is a roof."], "label": "1"},
     "A man is on a roof. He\n\nA. sings.\nB. pulls up shingles.\nC. flies away.\nD. is a roof.",
     "pulls up shingles.", 1, {"ind": 4, "activity_label": "Roof shingle removal"}),
    ({"goal": "How do I dry wet shoes?", "sol1": "Stuff them with newspaper.", "sol2": "Put them in the oven.",
      "label": 0},
     "How do I dry wet shoes?\n\nA. Stuff them with newspaper.\nB. Put them in the oven.",
     "Stuff them with newspaper.", 0, {}),
], ids=["mmlu", "mmlu-letter", "arc", "arc-digit-labels", "hellaswag", "piqa"])
def test_native_multiple_choice_layouts(record, prompt, answer, index, meta):
    assert detect_format(record) == "multiple_choice"
    c = to_conversation(record, SRC)
    assert c.messages == [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    letter = "ABCD"[index]
    assert c.meta == {**meta, "choices": c.meta["choices"], "answer": index,
                      "references": [answer, letter, f"{letter}. {answer}"]}
    assert c.meta["choices"][index] == answer and answer_index(c) == index
    assert to_conversation(c.to_json(), SRC).meta == c.meta  # `data curate` output reads back the same


def test_multiple_choice_exact_match_accepts_the_text_the_letter_or_both(monkeypatch, tokenizer):
    convs = [to_conversation({**MMLU, "question": f"Q{i}: capital of France?"}, f"mmlu.jsonl:{i}") for i in range(4)]
    _plant(monkeypatch, tokenizer, {"Q0: capital of France?": "Paris", "Q1: capital of France?": "B",
                                    "Q2: capital of France?": "B. Paris", "Q3: capital of France?": "A"})
    result = evaluate(None, tokenizer, convs, metrics=["exact_match"], progress=False)
    assert [r["scores"]["exact_match"] for r in result.records] == [1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("record,kind,detail", [
    ({**MMLU, "answer": 4}, "answer not a choice", "'answer' 4 is not an option's index (0 to 3), letter (A to D)"),
    ({**MMLU, "answer": "E"}, "answer not a choice", "'answer' 'E'"),
    ({**ARC, "answerKey": "E"}, "answer not a choice", "'answerKey' 'E' is not one of the labels A, B, C, D"),
    ({**ARC, "answerKey": "2"}, "answer not a choice", "'answerKey' '2' is not one of the labels"),
    ({"ctx": "He", "endings": ["a.", "b."], "label": ""}, "no answer", "'label' is empty"),
    ({**MMLU, "choices": "Paris"}, "mistyped field", "'choices' must list 2 to 26 option texts"),
    ({**ARC, "choices": {"text": ["a", "b"], "label": ["A"]}}, "mistyped field", "one label per option"),
])
def test_bad_multiple_choice_records_are_named(record, kind, detail):
    with pytest.raises(RecordError, match=rf"^eval\.jsonl:3: {kind}: .*") as e:
        to_conversation(record, SRC)
    assert e.value.kind == kind and detail in str(e.value)
