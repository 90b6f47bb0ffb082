"""Evaluation sets in the layouts they are downloaded in: SQuAD's several answers and unanswerable
questions, and the native multiple-choice layouts (MMLU, ARC, HellaSwag, PIQA, WinoGrande, BoolQ,
TruthfulQA, MMLU-Pro, Social IQa, MedMCQA, RACE, SciQ, GPQA)."""

from __future__ import annotations

import csv
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
    letter = chr(ord("A") + index)
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


# More benchmarks as their Hugging Face datasets write them (GPQA as its CSV reads).
WINOGRANDE = {"sentence": "Ian volunteered to eat Dennis's menudo after already having a bowl because _ despised eating "
                          "intestine.", "option1": "Ian", "option2": "Dennis", "answer": "2"}
BOOLQ = {"question": "do iran and afghanistan speak the same language", "answer": True,
         "passage": "Persian language -- Persian, also known by its endonym Farsi, is one of the Western Iranian languages."}
_SMALLEST = "the smallest country in the world that is at least one square mile in area"
TRUTHFULQA = {"question": "What is the smallest country in the world that is at least one square mile in area?",
              "mc1_targets": {"choices": [f"Nauru is {_SMALLEST}.", f"{_SMALLEST.capitalize()} is Vatican City.",
                                          f"{_SMALLEST.capitalize()} is Monaco.",
                                          f"{_SMALLEST.capitalize()} is the United States."],
                              "labels": [1, 0, 0, 0]},
              "mc2_targets": {"choices": [f"Nauru is {_SMALLEST}.", f"{_SMALLEST.capitalize()} is Vatican City."],
                              "labels": [1, 0]}}
MMLU_PRO = {"question_id": 70, "question": "Which gas makes up most of Earth's atmosphere?",
            "options": ["Oxygen", "Argon", "Carbon dioxide", "Helium", "Neon", "Hydrogen", "Methane", "Ozone",
                        "Nitrogen", "Water vapour"],
            "answer": "I", "answer_index": 8, "cot_content": "", "category": "chemistry", "src": "ori_mmlu-chemistry"}
SIQA = {"context": "Tracy didn't go home that evening and resisted Riley's attacks.",
        "question": "What does Tracy need to do before this?", "answerA": "make a new plan",
        "answerB": "Go home and see Riley", "answerC": "Find somewhere to go", "label": "3"}
MEDMCQA = {"id": "e9ad821a-c438-4965-9f77-760819dfa155",
           "question": "Chronic urethral obstruction due to benign prismatic hyperplasia can lead to the following "
                       "change in kidney parenchyma",
           "opa": "Hyperplasia", "opb": "Hyperophy", "opc": "Atrophy", "opd": "Dyplasia", "cop": 2,
           "choice_type": "single", "exp": "Chronic urethral obstruction leads to atrophy.", "subject_name": "Anatomy",
           "topic_name": "Urinary tract"}
RACE = {"example_id": "high19432.txt", "article": "Last week I talked with an old friend.\nHe had moved to a new city.",
        "answer": "C", "question": "Where had the friend moved?",
        "options": ["to an old city", "to his old home", "to a new city", "nowhere"]}
SCIQ = {"question": "What type of organism is commonly used in preparation of foods such as cheese and yogurt?",
        "distractor3": "viruses", "distractor1": "protozoa", "distractor2": "gymnosperms",
        "correct_answer": "mesophilic organisms",
        "support": "Mesophiles grow best in moderate temperature, typically between 25°C and 40°C."}
GPQA = {"Pre-Revision Question": "Two quantum states ...", "Question": "Two quantum states with energies E1 and E2 have "
        "a lifetime of 10^-9 sec and 10^-8 sec, respectively. We want to clearly distinguish these two energy levels. "
        "Which one of the following options could be their energy difference so that they can be clearly resolved?\n",
        "Correct Answer": "10^-4 eV", "Incorrect Answer 1": "10^-11 eV", "Incorrect Answer 2": "10^-8 eV\n",
        "Incorrect Answer 3": "10^-9 eV", "Explanation": "By the uncertainty principle ...", "Subdomain": "Physics (general)",
        "Record ID": "recZ8D9Jg6hGrzMiK"}


@pytest.mark.parametrize("record,prompt,answer,index,meta", [
    (WINOGRANDE, f"{WINOGRANDE['sentence']}\n\nA. Ian\nB. Dennis", "Dennis", 1, {}),
    (BOOLQ, f"{BOOLQ['passage']}\n\n{BOOLQ['question']}\n\nA. yes\nB. no", "yes", 0, {}),
    ({**BOOLQ, "answer": "False"}, f"{BOOLQ['passage']}\n\n{BOOLQ['question']}\n\nA. yes\nB. no", "no", 1, {}),  # CSV
    (TRUTHFULQA, f"{TRUTHFULQA['question']}\n\nA. {_SMALLEST.capitalize()} is Vatican City.\nB. {_SMALLEST.capitalize()} "
                 f"is Monaco.\nC. {_SMALLEST.capitalize()} is the United States.\nD. Nauru is {_SMALLEST}.",
     f"Nauru is {_SMALLEST}.", 3, {"mc2_targets": TRUTHFULQA["mc2_targets"]}),  # mc1's right option comes first
    (MMLU_PRO, f"{MMLU_PRO['question']}\n\nA. Oxygen\nB. Argon\nC. Carbon dioxide\nD. Helium\nE. Neon\nF. Hydrogen\n"
               "G. Methane\nH. Ozone\nI. Nitrogen\nJ. Water vapour", "Nitrogen", 8,
     {"question_id": 70, "cot_content": "", "category": "chemistry", "src": "ori_mmlu-chemistry"}),
    (SIQA, f"{SIQA['context']}\n\n{SIQA['question']}\n\nA. make a new plan\nB. Go home and see Riley\n"
           "C. Find somewhere to go", "Find somewhere to go", 2, {}),
    (MEDMCQA, f"{MEDMCQA['question']}\n\nA. Hyperplasia\nB. Hyperophy\nC. Atrophy\nD. Dyplasia", "Atrophy", 2,
     {"id": MEDMCQA["id"], "choice_type": "single", "exp": MEDMCQA["exp"], "subject_name": "Anatomy",
      "topic_name": "Urinary tract"}),
    (RACE, f"{RACE['article']}\n\nWhere had the friend moved?\n\nA. to an old city\nB. to his old home\nC. to a new city\n"
           "D. nowhere", "to a new city", 2, {"example_id": "high19432.txt"}),
    (SCIQ, f"{SCIQ['support']}\n\n{SCIQ['question']}\n\nA. mesophilic organisms\nB. viruses\nC. gymnosperms\nD. protozoa",
     "mesophilic organisms", 0, {}),
    ({**SCIQ, "support": ""}, f"{SCIQ['question']}\n\nA. mesophilic organisms\nB. viruses\nC. gymnosperms\nD. protozoa",
     "mesophilic organisms", 0, {}),
    (GPQA, f"{GPQA['Question'].strip()}\n\nA. 10^-11 eV\nB. 10^-8 eV\nC. 10^-9 eV\nD. 10^-4 eV", "10^-4 eV", 3,
     {k: GPQA[k] for k in ("Pre-Revision Question", "Explanation", "Subdomain", "Record ID")}),
], ids=["winogrande", "boolq", "boolq-csv", "truthfulqa-mc1", "mmlu-pro", "social-iqa", "medmcqa", "race", "sciq",
        "sciq-no-support", "gpqa"])
def test_more_multiple_choice_layouts(record, prompt, answer, index, meta):
    """Each layout is detected, its passage comes before the question, the right option is found however the
    set writes it (1-based, a letter, a truth value, a 1 label, a column of its own), and its index is meta."""
    test_native_multiple_choice_layouts(record, prompt, answer, index, meta)


@pytest.mark.parametrize("record,kind,detail", [
    ({**WINOGRANDE, "answer": ""}, "no answer", "'answer' is empty (an unlabelled test split?)"),  # the test split
    ({k: v for k, v in WINOGRANDE.items() if k != "answer"}, "no answer", "'answer' is missing"),  # CSV: a blank cell
    ({**WINOGRANDE, "answer": "0"}, "answer not a choice", "'answer' '0' is not an option's index (1 to 2)"),
    ({**WINOGRANDE, "answer": "3"}, "answer not a choice", "(1 to 2)"),
    ({**SIQA, "label": "4"}, "answer not a choice", "'label' '4' is not an option's index (1 to 3)"),
    ({**MEDMCQA, "cop": -1}, "no answer", "'cop' is -1"),  # MedMCQA's test split
    ({**MMLU_PRO, "answer_index": 10}, "answer not a choice", "(0 to 9), letter (A to J)"),
    ({**RACE, "answer": "E"}, "answer not a choice", "'answer' 'E'"),
    ({**BOOLQ, "answer": None}, "no answer", "'answer' is empty"),
    ({**TRUTHFULQA, "mc1_targets": {"choices": ["a", "b"], "labels": [0, 0]}}, "no answer", "labels 0 options 1"),
    ({**TRUTHFULQA, "mc1_targets": {"choices": ["a", "b"], "labels": [1, 1]}}, "several answers", "labels 2 options 1"),
    ({**TRUTHFULQA, "mc1_targets": {"choices": ["a", "b"], "labels": ["A", "B"]}}, "mistyped field", "1 (right) or 0"),
    ({k: v for k, v in SCIQ.items() if k != "correct_answer"}, "no answer", "'correct_answer' is missing"),
    ({**GPQA, "Correct Answer": ""}, "no answer", "'Correct Answer' is empty"),
    ({**SCIQ, "distractor2": 7}, "mistyped field", "'distractor2' must be a string"),
], ids=["winogrande-test", "winogrande-csv-test", "winogrande-0", "winogrande-3", "siqa-4", "medmcqa-test",
        "mmlu-pro-10", "race-E", "boolq-null", "truthfulqa-none", "truthfulqa-two", "truthfulqa-letters",
        "sciq-no-correct", "gpqa-blank", "sciq-number"])
def test_more_bad_multiple_choice_records_are_named(record, kind, detail):
    assert detect_format(record) == "multiple_choice"
    test_bad_multiple_choice_records_are_named(record, kind, detail)


def test_a_text_answer_beside_a_passage_is_no_boolq():
    """BoolQ is told from a question + answer record (prompt/completion) by its true / false answer; forced,
    another answer is named."""
    rec = {**BOOLQ, "answer": "Persian"}
    assert detect_format(rec) == "prompt_completion"
    with pytest.raises(RecordError, match="answer not a choice: 'answer' 'Persian' is not true / false or yes / no"):
        to_conversation(rec, SRC, "multiple_choice")


@pytest.mark.parametrize("record,fmt", [
    ({"question": "Q?", "answer": "A."}, "prompt_completion"),
    ({"question": "Q?", "answer": "B", "options": ["a", "b"]}, "prompt_completion"),  # neither RACE nor MMLU-Pro
    ({"question": "Q?", "answer": "A.", "passage": "P."}, "prompt_completion"),
    ({"question": "Q?", "response": "A.", "passage": "P."}, "prompt_completion"),
    ({"question": "Q?", "context": "C.", "answers": {"text": ["A"]}}, "squad"),
    ({"sentence": "S.", "text": "T."}, "text"),
    ({"question": "Q?", "choices": ["a", "b"], "answer": 0, "passage": "P."}, "multiple_choice"),  # MMLU first
])
def test_new_layouts_leave_other_detection_alone(record, fmt):
    assert detect_format(record) == fmt


def test_unlabelled_rows_are_counted_rejects(tmp_path):
    """WinoGrande's test split (answer "") and GPQA's CSV with a blank right answer: rejects, not drops."""
    wino = tmp_path / "winogrande.jsonl"
    wino.write_text("".join(json.dumps(r) + "\n" for r in ({**WINOGRANDE, "answer": ""}, WINOGRANDE,
                                                             {**WINOGRANDE, "answer": ""})))
    header = list(GPQA)
    gpqa = tmp_path / "gpqa_main.csv"
    with gpqa.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([header, [GPQA[k] for k in header], [GPQA[k] if k != "Correct Answer" else "" for k in header]])
    for path, kept_answer in ((wino, "Dennis"), (gpqa, "10^-4 eV")):
        rejects = RejectLog(tmp_path / f"{path.stem}.rejects.jsonl")
        with rejects:
            kept = list(iter_conversations(path, on_error="skip", rejects=rejects))
        assert [c.messages[-1]["content"] for c in kept] == [kept_answer]
        assert rejects.summary() == {"no answer": len(kept) + (path is wino)}


PINNED_SCIQ_PLACES = [1, 2, 2, 0, 1, 2, 2, 1]  # where _right_first(0..7) shows the right option


def _right_first(i: int) -> dict:
    return {**SCIQ, "question": f"Question {i}: which organism makes yogurt?", "support": ""}


def test_options_given_apart_are_ordered_by_the_record_not_always_first():
    """SciQ and GPQA list the right option apart: shown first it would always be "A". The order comes from
    a hash of the record: the right option lands in every place, the same each time (pinned here, so a
    salted hash() or a random order fails), and meta says where."""
    for make in (_right_first, lambda i: {**GPQA, "Question": f"Question {i}: which energy difference?"}):
        convs = [to_conversation(make(i), f"set.jsonl:{i}") for i in range(40)]
        places = [c.meta["answer"] for c in convs]
        assert set(places) == {0, 1, 2, 3} and max(map(places.count, range(4))) <= 20
        for c in convs:
            assert c.meta["choices"][c.meta["answer"]] == c.messages[-1]["content"] and answer_index(c) == c.meta["answer"]
            assert to_conversation(c.to_json(), SRC).meta == c.meta
    assert [to_conversation(_right_first(i), SRC).meta["answer"] for i in range(8)] == PINNED_SCIQ_PLACES


def test_reordered_options_score_the_right_letter(monkeypatch, tokenizer):
    """Exact match on a GPQA set: the letter the prompt shows for the right option scores, "A" does not."""
    convs = [to_conversation({**GPQA, "Question": f"Q{i}: which energy difference?"}, f"gpqa.csv:{i}") for i in range(6)]
    moved = [c for c in convs if c.meta["answer"] != 0]
    assert len(moved) >= 2
    first, second = moved[:2]
    right = "ABCD"[first.meta["answer"]]
    assert f"{right}. 10^-4 eV" in first.messages[0]["content"].split("\n")
    _plant(monkeypatch, tokenizer, {first.messages[0]["content"].split("\n")[0]: right,
                                    second.messages[0]["content"].split("\n")[0]: "A"})
    result = evaluate(None, tokenizer, [first, second], metrics=["exact_match"], progress=False)
    assert [r["scores"]["exact_match"] for r in result.records] == [1.0, 0.0]
