"""Chatbot Arena human-preference sets as downloaded -> preference pairs: the conversations layout
(lmsys/chatbot_arena_conversations, arena-human-preference-100k / -140k) and Kaggle's 55k CSV."""

from __future__ import annotations

import csv
import json

import pytest

from sftlab.cli import main
from sftlab.data.formats import RecordError, detect_format, to_conversation
from sftlab.data.load import RejectLog, load_conversations

SRC = "arena.jsonl:7"


def _msgs(*turns: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def _battle(winner: str, a: list[dict], b: list[dict], **extra) -> dict:
    """A row as lmsys/chatbot_arena_conversations writes it."""
    return {"question_id": "58210e39b3fd4441a2bd4a518bb44c2d", "model_a": "chatglm-6b", "model_b": "koala-13b",
            "winner": winner, "judge": "arena_user_973", "conversation_a": a, "conversation_b": b,
            "turn": sum(m["role"] == "user" for m in a), "anony": True, "language": "English",
            "tstamp": 1682351591.1322, "openai_moderation": {"categories": {"hate": False}, "flagged": False},
            "toxic_chat_tag": {"roberta-large": {"flagged": False, "probability": 0.008}}, **extra}


META = {"question_id": "58210e39b3fd4441a2bd4a518bb44c2d", "model_a": "chatglm-6b", "model_b": "koala-13b",
        "judge": "arena_user_973", "anony": True, "language": "English", "tstamp": 1682351591.1322,
        "openai_moderation": {"categories": {"hate": False}, "flagged": False},
        "toxic_chat_tag": {"roberta-large": {"flagged": False, "probability": 0.008}}}
A_WINS = _battle("model_a", _msgs("What is 2+2?", "4"), _msgs("What is 2+2?", "5"))
B_WINS = _battle("model_b", _msgs("Capital of Peru?", "Quito."), _msgs("Capital of Peru?", "Lima."))
MULTI = _battle("model_b", _msgs("Name a fruit.", "Apple.", "Another?", "Apple again."),
                _msgs("Name a fruit.", "Banana.", "Another?", "Cherry."))
# a second turn after the same first answer: one conversation, two answers to its last prompt
MULTI_SHARED = _battle("model_b", _msgs("Name a fruit.", "Apple.", "Another?", "Apple again."),
                       _msgs("Name a fruit.", "Apple.", "Another?", "Cherry."))
TIE = _battle("tie", _msgs("Hi", "Hello!"), _msgs("Hi", "Hey there."))
BOTH_BAD = _battle("tie (bothbad)", _msgs("Hi", "Go away."), _msgs("Hi", "No."))


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_conversations_layout_winner_is_chosen_and_ties_and_multi_turn_battles_are_counted_rejects(tmp_path):
    path = tmp_path / "arena.jsonl"
    _write_jsonl(path, [A_WINS, TIE, B_WINS, BOTH_BAD, MULTI, MULTI_SHARED])
    rejects = RejectLog(tmp_path / "rejects.jsonl")
    with rejects:
        a, b, multi = load_conversations(path, on_error="skip", rejects=rejects)
    assert rejects.summary() == {"tie": 2, "multi-turn battle": 1}
    lines = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [x["source"] for x in lines] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert "answers already differ at message 2 of 4" in lines[2]["reason"]
    assert a.messages == _msgs("What is 2+2?", "4") and a.meta["rejected"] == _msgs("What is 2+2?", "5")
    assert b.messages == _msgs("Capital of Peru?", "Lima.") and b.meta["rejected"] == _msgs("Capital of Peru?", "Quito.")
    assert a.meta == {**META, "winner": "model_a", "turn": 1, "rejected": a.meta["rejected"]}
    assert b.meta["winner"] == "model_b" and b.source == f"{path}:3"
    # multi-turn with the same earlier answers: the two last answers are the pair
    assert multi.messages == _msgs("Name a fruit.", "Apple.", "Another?", "Cherry.")
    assert multi.meta["rejected"] == _msgs("Name a fruit.", "Apple.", "Another?", "Apple again.")
    assert multi.meta["turn"] == 2


def test_a_tie_stops_strict_reading_and_a_file_of_ties_says_so(tmp_path):
    path = tmp_path / "ties.jsonl"
    _write_jsonl(path, [TIE, BOTH_BAD, _battle("both_bad", _msgs("Hi", "x"), _msgs("Hi", "y"))])
    with pytest.raises(RecordError, match=rf"^{path}:1: tie: the vote is 'tie': neither answer is preferred") as e:
        load_conversations(path)
    assert e.value.kind == "tie" and "--skip" in str(e.value)
    rejects = RejectLog()
    assert load_conversations(path, on_error="skip", rejects=rejects) == []
    assert rejects.summary() == {"tie": 3}


def test_later_releases_text_parts_and_json_string_conversations():
    parts = [{"role": r, "content": [{"type": "text", "text": t, "image": None, "mimeType": None}]}
             for r, t in (("user", "Why is the sky blue?"), ("assistant", "Rayleigh scattering."))]
    other = [parts[0], {"role": "assistant", "content": [{"type": "text", "text": "Because.", "image": None,
                                                           "mimeType": None}]}]
    record = {"id": "e1", "model_a": "m1", "model_b": "m2", "winner": "model_a", "evaluation_order": 1,
              "conversation_a": parts, "conversation_b": other, "language": "en"}
    c = to_conversation(record, SRC)
    assert c.messages == _msgs("Why is the sky blue?", "Rayleigh scattering.")
    assert c.meta["rejected"] == _msgs("Why is the sky blue?", "Because.")
    assert c.meta == {"id": "e1", "model_a": "m1", "model_b": "m2", "winner": "model_a", "evaluation_order": 1,
                      "language": "en", "rejected": c.meta["rejected"]}
    as_strings = {**record, "winner": "model_b", "conversation_a": json.dumps(parts), "conversation_b": json.dumps(other)}
    s = to_conversation(as_strings, SRC)  # the 100k's Parquet columns hold JSON strings
    assert s.messages == _msgs("Why is the sky blue?", "Because.")
    assert s.meta["rejected"] == _msgs("Why is the sky blue?", "Rayleigh scattering.")


KAGGLE_HEADER = ["id", "model_a", "model_b", "prompt", "response_a", "response_b", "winner_model_a",
                 "winner_model_b", "winner_tie"]


def _kaggle(id, prompt, a, b, votes) -> list:
    """A row of the Kaggle train.csv: the texts as JSON lists, the vote as 0/1 columns."""
    return [id, "gpt-4-1106-preview", "gpt-4-0613", json.dumps(prompt), json.dumps(a), json.dumps(b), *votes]


def test_kaggle_csv_with_json_in_quoted_cells(tmp_path):
    path = tmp_path / "train.csv"
    quoted = 'Say "hi", then stop.\nThanks'
    rows = [_kaggle(30192, ["What is 2+2?"], ["4"], ["5"], (1, 0, 0)),
            _kaggle(53567, [quoted], ['"hi"'], ["hi, and\nbye"], (0, 1, 0)),
            _kaggle(65089, ["Hi"], ["Hello"], ["Hey"], (0, 0, 1)),
            _kaggle(96401, ["Q1?", "Q2?"], ["a1", "a2"], ["a1", "b2"], (1, 0, 0)),
            _kaggle(198779, ["Q?"], [None], ["b"], (0, 1, 0)),
            _kaggle(211333, ["Q1?", "Q2?"], ["a1", "a2"], ["b1", "b2"], (0, 1, 0))]
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([KAGGLE_HEADER, *rows])
    assert '"[""What is 2+2?""]"' in path.read_text()  # JSON inside a quoted CSV cell, as the download has it
    rejects = RejectLog(tmp_path / "rejects.jsonl")
    with rejects:
        plain, quoting, multi = load_conversations(path, on_error="skip", rejects=rejects)
    assert rejects.summary() == {"tie": 1, "empty content": 1, "multi-turn battle": 1}
    lines = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [x["source"] for x in lines] == [f"{path}:4", f"{path}:6", f"{path}:7"]
    assert "'response_a' turn 1 is null (model_a's answer is missing)" in lines[1]["reason"]
    assert plain.messages == _msgs("What is 2+2?", "4") and plain.meta["rejected"] == _msgs("What is 2+2?", "5")
    assert plain.meta == {"id": "30192", "model_a": "gpt-4-1106-preview", "model_b": "gpt-4-0613",
                          "winner": "model_a", "rejected": plain.meta["rejected"]}
    assert quoting.messages == _msgs(quoted, "hi, and\nbye") and quoting.meta["rejected"] == _msgs(quoted, '"hi"')
    assert quoting.source == f"{path}:3" and multi.source == f"{path}:5"
    assert multi.messages == _msgs("Q1?", "a1", "Q2?", "a2") and multi.meta["rejected"] == _msgs("Q1?", "a1", "Q2?", "b2")


def test_parquet_files_of_both_layouts(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    battles = tmp_path / "battles.parquet"
    pd.DataFrame([A_WINS, TIE, MULTI, MULTI_SHARED]).to_parquet(battles)
    rejects = RejectLog()
    a, multi = load_conversations(battles, on_error="skip", rejects=rejects)
    assert rejects.summary() == {"tie": 1, "multi-turn battle": 1} and a.source == f"{battles}:row 1"
    assert a.messages == _msgs("What is 2+2?", "4") and a.meta["rejected"] == _msgs("What is 2+2?", "5")
    assert multi.meta["rejected"] == _msgs("Name a fruit.", "Apple.", "Another?", "Apple again.")
    kaggle = tmp_path / "kaggle.parquet"
    pd.DataFrame([_kaggle(1, ["Q?"], ["a"], ["b"], (0, 1, 0))], columns=KAGGLE_HEADER).to_parquet(kaggle)
    (c,) = load_conversations(kaggle)  # the vote columns as int64
    assert c.messages == _msgs("Q?", "b") and c.meta["rejected"] == _msgs("Q?", "a") and c.meta["winner"] == "model_b"


KAGGLE = dict(zip(KAGGLE_HEADER, _kaggle(7, ["Q1?", "Q2?"], ["a1", "a2"], ["b1", "b2"], ("1", "0", "0"))))


@pytest.mark.parametrize("record,kind,detail", [
    (_battle("model_a", _msgs("Hi", "a"), _msgs("Hello", "b")), "prompt mismatch",
     "message 1 (user) differs between 'conversation_a' and 'conversation_b'"),
    (_battle("model_a", _msgs("Hi", "a", "More?", "c"), _msgs("Hi", "b")), "turn mismatch",
     "'conversation_a' has 4 messages, 'conversation_b' 2"),
    (_battle("model_a", _msgs("Hi", "a"), [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]),
     "empty content", "'conversation_b' message 2 (assistant) is empty or null (model_b gave no answer)"),
    (_battle("model_c", _msgs("Hi", "a"), _msgs("Hi", "b")), "unknown winner", "'winner' is 'model_c'"),
    (_battle("model_a", _msgs("Hi", "a", "Bye"), _msgs("Hi", "b", "Bye")), "empty side", "end with a user message"),
    (_battle("model_a", _msgs("Hi", "same"), _msgs("Hi", "same")), "identical pair", "answers are the same"),
    ({k: v for k, v in A_WINS.items() if k != "winner"}, "missing field", "'winner'"),
    ({**KAGGLE, "response_b": json.dumps(["b1"])}, "turn mismatch",
     "'prompt' has 2 turns, 'response_a' has 2 turns, 'response_b' has 1 turns"),
    ({**KAGGLE, "response_b": json.dumps(["b1", None])}, "empty content",
     "'response_b' turn 2 is null (model_b's answer is missing)"),
    ({**KAGGLE, "response_a": json.dumps(["a1", ""])}, "empty content", "'response_a' turn 2 is empty"),
    ({**KAGGLE, "winner_model_b": "1"}, "unknown winner",
     "winner_model_a, winner_model_b, winner_tie are 1, 1, 0: exactly one of them must be 1"),
    ({**KAGGLE, "winner_model_a": "yes"}, "unknown winner", "'winner_model_a' is 'yes', not 0 or 1"),
    ({k: v for k, v in KAGGLE.items() if not k.startswith("winner")}, "missing field", "'winner_model_a'"),
    ({**KAGGLE, "prompt": "What?"}, "mistyped field", "'prompt' is text that is not JSON"),
], ids=["user-turn-differs", "turn-count", "null-answer", "unknown-winner", "ends-with-user", "identical",
        "no-winner", "kaggle-turn-count", "kaggle-null-answer", "kaggle-empty-answer", "kaggle-two-winners",
        "kaggle-bad-vote", "kaggle-test-split", "kaggle-prompt-not-json"])
def test_bad_battles_are_named(record, kind, detail):
    assert detect_format(record) == "preference"
    with pytest.raises(RecordError, match=rf"^arena\.jsonl:7: {kind}: ") as e:
        to_conversation(record, SRC)
    assert e.value.kind == kind and detail in str(e.value)


def test_kaggle_tie_is_a_tie():
    with pytest.raises(RecordError) as e:
        to_conversation({**KAGGLE, "winner_model_a": 0, "winner_tie": 1}, SRC)
    assert e.value.kind == "tie"


def test_detection_leaves_ordinary_pairs_alone():
    pair = {"prompt": "Q?", "chosen": "a", "rejected": "b", "conversation_a": "x", "conversation_b": "y"}
    assert detect_format(pair) == "preference"
    c = to_conversation(pair, SRC)
    assert c.messages == _msgs("Q?", "a") and c.meta["conversation_a"] == "x"
    assert detect_format({"prompt": "Q?", "response": "A"}) == "prompt_completion"


def test_data_inspect_shows_arena_battles_as_pairs(tmp_path, capsys, monkeypatch):
    from conftest import TOKENIZER_DIR

    path = tmp_path / "arena.jsonl"
    _write_jsonl(path, [A_WINS, MULTI_SHARED])
    assert main(["data", "inspect", str(path), "--model", str(TOKENIZER_DIR), "--json"]) == 0
    records = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["source"] for r in records] == [f"{path}:1", f"{path}:2"]
    assert all(len(r["rejected"]["input_ids"]) == len(r["rejected"]["labels"]) > 0 for r in records)
    monkeypatch.setenv("COLUMNS", "200")  # rich shortens the rule titles to the terminal's width
    assert main(["data", "inspect", str(path), "--model", str(TOKENIZER_DIR)]) == 0
    out = capsys.readouterr().out
    assert out.count("(chosen)") == 2 and out.count("(rejected: its last answer is scored)") == 2
    assert "Cherry." in out and "Apple again." in out
