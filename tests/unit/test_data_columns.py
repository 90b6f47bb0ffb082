"""Native schemas people download (Dolly, SQuAD, OpenOrca, OpenAssistant, ...) and column mappings."""

from __future__ import annotations

import json

import pytest

from sftlab.config import load_config
from sftlab.data.formats import Columns, RecordError, detect_format, schema, to_conversation
from sftlab.data.load import load_conversations
from sftlab.errors import SftlabError

SRC = "data.jsonl:3"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


@pytest.mark.parametrize("record,name,messages,meta", [
    ({"instruction": "Who wrote it?", "context": "Hamlet was written by Shakespeare.", "response": "Shakespeare.",
      "category": "closed_qa"}, "dolly",
     msgs(("user", "Who wrote it?\n\nHamlet was written by Shakespeare."), ("assistant", "Shakespeare.")),
     {"category": "closed_qa"}),
    ({"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"}, "dolly",
     msgs(("user", "Name a colour."), ("assistant", "Blue.")), {"category": "open_qa"}),
    ({"id": "5733be", "title": "Notre Dame", "context": "The school was founded in 1842.",
      "question": "When was it founded?", "answers": {"text": ["1842", "in 1842"], "answer_start": [26, 23]}}, "squad",
     msgs(("user", "When was it founded?\n\nThe school was founded in 1842."), ("assistant", "1842")),
     {"id": "5733be", "title": "Notre Dame", "references": ["1842", "in 1842"]}),
    ({"id": "niv.1", "system_prompt": "You are a helpful assistant.", "question": "2+2?", "response": "4"},
     "prompt_completion", msgs(("system", "You are a helpful assistant."), ("user", "2+2?"), ("assistant", "4")),
     {"id": "niv.1"}),
    ({"system_prompt": "", "question": "2+3?", "response": "5"}, "prompt_completion",
     msgs(("user", "2+3?"), ("assistant", "5")), {}),
    ({"query": "What is 3*3?", "response": "9", "type": "GSM_Rephrased"}, "prompt_completion",
     msgs(("user", "What is 3*3?"), ("assistant", "9")), {"type": "GSM_Rephrased"}),
    ({"problem": "Solve x+1=2.", "solution": "x=1", "level": "Level 1"}, "prompt_completion",
     msgs(("user", "Solve x+1=2."), ("assistant", "x=1")), {"level": "Level 1"}),
    ({"inputs": "Translate: chat", "targets": "cat", "task_source": "flan"}, "prompt_completion",
     msgs(("user", "Translate: chat"), ("assistant", "cat")), {"task_source": "flan"}),
    ({"messages": [{"role": "prompter", "text": "Hi"}, {"role": "assistant", "text": "Hello!"}], "lang": "en"},
     "messages", msgs(("user", "Hi"), ("assistant", "Hello!")), {"lang": "en"}),
])
def test_native_schemas_are_detected_and_converted(record, name, messages, meta):
    assert detect_format(record) == name
    c = to_conversation(record, SRC)
    assert (c.messages, c.meta, c.source) == (messages, meta, SRC)


def test_alpaca_still_wins_over_dolly_and_an_empty_system_is_absent():
    rec = {"instruction": "Reverse", "input": "", "output": "cba", "system": " "}
    assert detect_format(rec) == "alpaca"
    assert to_conversation(rec, SRC).messages == msgs(("user", "Reverse"), ("assistant", "cba"))


def test_squad_without_an_answer_is_a_record_error():
    rec = {"question": "Q?", "context": "C.", "answers": {"text": [], "answer_start": []}}
    with pytest.raises(RecordError, match=r"data.jsonl:3: empty content: 'answers' holds no answer"):
        to_conversation(rec, SRC)


def test_a_column_mapping_reads_any_layout():
    cols = Columns(prompt="question", input="passage", response="answer", system="sys")
    rec = {"question": "Q?", "passage": "P.", "answer": "A.", "sys": "Be brief.", "id": 7}
    c = to_conversation(rec, SRC, cols)
    assert c.messages == msgs(("system", "Be brief."), ("user", "Q?\n\nP."), ("assistant", "A."))
    assert c.meta == {"id": 7}
    with pytest.raises(RecordError, match=r"data.jsonl:3: missing field: 'answer'"):
        to_conversation({"question": "Q?"}, SRC, cols)


def test_column_mapping_for_message_lists_and_raw_text():
    dialog = {"dialog": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}], "persona": "Kind."}
    c = to_conversation(dialog, SRC, Columns(messages="dialog", system="persona"))
    assert c.messages == msgs(("system", "Kind."), ("user", "Hi"), ("assistant", "Hey"))
    t = to_conversation({"body": "Some text.", "url": "u"}, SRC, Columns(text="body"))
    assert (t.text, t.meta) == ("Some text.", {"url": "u"})


@pytest.mark.parametrize("value,error", [
    ("prompt=question", "give both 'prompt' and 'response'"),
    ("prompt=q,response=a,text=t", "exactly one of these"),
    ("input=x,text=t", "'input' goes with 'prompt' and 'response'"),
    ("prompt=q,answer=a", r"answer: Extra inputs are not permitted \(roles: prompt, input, response"),
    ("prompt:q", "expected ROLE=COLUMN pairs"),
])
def test_bad_column_mappings_are_one_line_errors(value, error):
    with pytest.raises(SftlabError, match=error):
        Columns.parse(value)


@pytest.mark.parametrize("cols", [Columns(prompt="question", input="passage", response="answer", system="sys"),
                                  Columns(messages="dialog"), Columns(text="body")])
def test_a_mapping_passes_to_a_child_command_unchanged(cols):
    """`sftlab sweep` hands data.columns to `sftlab eval --columns` in this form."""
    assert Columns.parse(cols.to_arg()) == cols


def test_eval_and_compare_take_columns():
    from sftlab.commands import compare, eval

    for command in (eval.run_eval, compare.compare):
        assert "columns" in command.__code__.co_varnames[:command.__code__.co_argcount]


def test_format_and_columns_are_exclusive():
    assert schema(None, None) is None and schema("alpaca", None) == "alpaca"
    cols = Columns.parse("prompt=q,response=a")
    assert schema(None, cols) is cols
    with pytest.raises(SftlabError, match="not both"):
        schema("alpaca", cols)


def test_columns_from_a_config_and_a_csv(tmp_path):
    data = tmp_path / "qa.csv"
    data.write_text("question,passage,answer\nWho?,It was Ann.,Ann\nWhen?,,Monday\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  train: {data}\n  columns: {{prompt: question, input: passage, response: answer}}\n")
    config = load_config(cfg)
    convs = load_conversations(data, format=schema(config.data.format, config.data.columns))
    assert [c.messages for c in convs] == [msgs(("user", "Who?\n\nIt was Ann."), ("assistant", "Ann")),
                                           msgs(("user", "When?"), ("assistant", "Monday"))]
    assert [c.source for c in convs] == [f"{data}:2", f"{data}:3"]
    with pytest.raises(SftlabError, match=r"unknown key 'data.columns.answr'"):
        load_config(cfg, ["data.columns.answr=x"])


def test_the_data_commands_take_columns(tmp_path, tokenizer, capsys):
    from sftlab.cli import main

    from tests.conftest import TOKENIZER_DIR

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"Question {i}?", "a": f"Answer {i}."}) + "\n" for i in range(5)))
    assert main(["data", "validate", str(data)]) == 1  # no schema detected
    assert "unknown schema" in capsys.readouterr().err
    assert main(["data", "validate", str(data), "--columns", "prompt=q,response=a"]) == 0
    assert "kept 5" in capsys.readouterr().out
    out_dir = tmp_path / "split"
    assert main(["data", "split", str(data), "--columns", "prompt=q,response=a", "--out-dir", str(out_dir)]) == 0
    assert sum(1 for f in out_dir.glob("*.jsonl") for _ in f.open()) == 5
    capsys.readouterr()
    assert main(["data", "inspect", str(data), "--columns", "prompt=q,response=a", "--model", str(TOKENIZER_DIR),
                 "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 5, "inspect --json prints every example"
    trained = [t for t, lab in zip(rows[4]["input_ids"], rows[4]["labels"]) if lab != -100]
    assert tokenizer.decode(trained) == "Answer 4.<|im_end|>"
    assert main(["data", "inspect", str(data), "--columns", "prompt=q,response=a", "--model", str(TOKENIZER_DIR),
                 "--json", "--limit", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["data", "inspect", str(data), "--columns", "prompt=q,response=a", "--model", str(TOKENIZER_DIR)]) == 0
    out = capsys.readouterr().out
    assert out.count("trained (highlighted green)") == 3 and "first 3 examples shown" in out
    cols = ["--columns", "prompt=q,response=a"]
    assert main(["data", "curate", str(data), *cols, "--out", str(tmp_path / "c.jsonl")]) == 0
    assert main(["data", "augment", str(data), *cols, "--out", str(tmp_path / "a.jsonl"), "--strategy", "system"]) == 0
    assert main(["data", "review", str(data), *cols, "--export", str(tmp_path / "r.jsonl")]) == 0
    assert main(["data", "report", str(data), *cols, "--out-dir", str(tmp_path / "report"), "--model", "none"]) == 0
    capsys.readouterr()
    for name, n in (("c.curate.json", 5), ("a.augment.json", 5), ("r.review.json", 5), ("report/summary.json", 5)):
        assert json.loads((tmp_path / name).read_text())["reading"]["kept"] == n, name
    first = json.loads((tmp_path / "c.jsonl").open().readline())["messages"]
    assert first == msgs(("user", "Question 0?"), ("assistant", "Answer 0."))


def test_pairs_takes_columns(tmp_path, tiny_model_dir, capsys):
    from sftlab.cli import main

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"Question {i}?", "a": f"Answer {i}."}) + "\n" for i in range(3)))
    argv = ["data", "pairs", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "p.jsonl"),
            "--max-new-tokens", "2"]
    assert main(argv) == 1
    assert "unknown schema" in capsys.readouterr().err
    assert main([*argv, "--columns", "prompt=q,response=a"]) == 0
    stats = json.loads((tmp_path / "p.pairs.json").read_text())
    assert stats["examples"] == 3 and stats["reading"]["kept"] == 3
