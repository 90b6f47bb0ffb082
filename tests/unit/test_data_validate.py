"""validate: records in = kept + rejected + duplicates, every bad case counted by kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftlab.data.load import load_conversations
from sftlab.data.validate import ValidateOptions, validate
from sftlab.errors import DataError

DATA = Path(__file__).parents[1] / "fixtures" / "data"
SKIP = ValidateOptions(on_error="skip")


def corpus(tmp_path: Path) -> Path:
    """Every bad case, every schema, exact duplicates (one only after normalisation), blank lines."""
    lines = (DATA / "bad_records.jsonl").read_text().splitlines() + [""] + (DATA / "mixed.jsonl").read_text().splitlines()
    lines += [json.dumps({"prompt": "ok 1", "completion": "fine"}),  # duplicate of line 1
              json.dumps({"prompt": "OK  1", "completion": "Fine"}),  # same after normalisation
              json.dumps({"messages": [{"role": "user", "content": "ok 1"}, {"role": "assistant", "content": "fine"}]})]
    p = tmp_path / "corpus.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_counting_invariant(tmp_path):
    src = corpus(tmp_path)
    records_in = sum(1 for line in src.read_text().splitlines() if line.strip())
    out, rejects = tmp_path / "clean.jsonl", tmp_path / "rejects.jsonl"
    report = validate(src, SKIP, out=out, rejects_path=rejects)
    assert report.records_in == records_in == 22
    assert report.kept + report.rejected_total + report.duplicates == records_in
    # kept: the 2 good lines of bad_records.jsonl and the 6 records of mixed.jsonl; duplicates: the
    # 3 tail records repeat line 1 (verbatim, after normalisation, and in another schema)
    assert (report.kept, report.rejected_total, report.duplicates) == (8, 11, 3)
    assert report.rejected == {"roles out of order": 3, "malformed JSON": 1, "unknown role": 1, "no assistant turn": 1,
                               "empty content": 1, "non-string content": 1, "mistyped field": 1, "unknown schema": 1,
                               "not an object": 1}
    assert len(load_conversations(out)) == report.kept
    assert len(rejects.read_text().splitlines()) == report.rejected_total
    assert report.duplicate_examples[0] == {"source": f"{src}:22", "duplicate_of": f"{src}:1"}


def test_strict_mode_stops_at_first_error_and_leaves_no_output(tmp_path):
    src = corpus(tmp_path)
    out = tmp_path / "clean.jsonl"
    with pytest.raises(DataError, match=rf"^{src}:2: malformed JSON"):
        validate(src, ValidateOptions(), out=out)
    assert not out.exists() and not list(tmp_path.glob(".clean*"))


@pytest.mark.parametrize("name,kept,rejected", [
    ("embedded_newlines.csv", 3, {}),
    ("bom.jsonl", 1, {}),
    ("latin1.jsonl", 2, {"not UTF-8": 1}),
    ("alpaca.json", 2, {}),
])
def test_file_kinds(name, kept, rejected):
    report = validate(DATA / name, SKIP)
    assert (report.kept, dict(report.rejected)) == (kept, rejected)


def test_forced_format_rejects_other_schemas(tmp_path):
    out = tmp_path / "pc.jsonl"
    report = validate(DATA / "mixed.jsonl", ValidateOptions(on_error="skip", format="prompt_completion"), out=out)
    # kept: the prompt/completion record, and the alpaca record through its input/output pair
    assert [c.messages[0]["content"] for c in load_conversations(out)] == ["I loved it.", "Capital of France?"]
    assert report.records_in == 6 and dict(report.rejected) == {"missing field": 4}


def test_length_policy(tokenizer, tmp_path):
    src = tmp_path / "in.jsonl"
    long_chat = {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                              {"role": "user", "content": "Tell me more. " * 40}, {"role": "assistant", "content": "More. " * 40}]}
    src.write_text("\n".join(json.dumps(r) for r in [{"prompt": "Hi", "completion": "Hello"}, long_chat]) + "\n")
    drop = validate(src, ValidateOptions(on_error="skip", max_seq_length=64), tokenizer=tokenizer)
    assert (drop.kept, dict(drop.rejected), drop.truncated) == (1, {"too long": 1}, 0)
    trunc = validate(src, ValidateOptions(on_error="skip", max_seq_length=64, length_policy="truncate"), tokenizer=tokenizer)
    assert (trunc.kept, trunc.rejected_total, trunc.truncated) == (2, 0, 1)
    with pytest.raises(DataError, match=rf"{src}:2: too long: \d+ tokens > max_seq_length 64"):
        validate(src, ValidateOptions(max_seq_length=64), tokenizer=tokenizer)


def test_a_tokenizer_alone_renders_every_record_and_rejects_what_the_template_cannot_write(tokenizer, tmp_path):
    """With a tokenizer and no token limit, records are still rendered as training renders them: a
    record the chat template raises on is a counted reject (or, strict, an error naming its line)."""
    import copy

    strict = copy.deepcopy(tokenizer)  # a template without a system role, as Gemma's
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                            "{% endif %}" + tokenizer.chat_template)
    src = tmp_path / "in.jsonl"
    rows = [{"prompt": "Hi", "completion": "Hello"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = validate(src, ValidateOptions(on_error="skip"), tokenizer=strict)
    assert (report.kept, report.rejected_total) == (1, 1)
    with pytest.raises(DataError, match=rf"{src}:2: .*System role not supported"):
        validate(src, ValidateOptions(), tokenizer=strict)
    assert validate(src, ValidateOptions(on_error="skip")).kept == 2  # no tokenizer: the records alone


def test_the_summary_names_a_rejects_file_only_when_one_was_written(tmp_path):
    rejects = tmp_path / "r.jsonl"
    report = validate(DATA / "mixed.jsonl", SKIP, rejects_path=rejects)
    assert report.rejected_total == 0 and report.rejects_file is None and not rejects.exists()
    report = validate(corpus(tmp_path), SKIP, rejects_path=rejects)
    assert report.rejects_file == str(rejects) and rejects.exists()
