"""Bad input: strict mode gives one error naming file and line; skip mode counts every reject."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftlab.data.load import RejectLog, iter_records, load_conversations
from sftlab.errors import DataError

DATA = Path(__file__).parents[1] / "fixtures" / "data"
BAD = DATA / "bad_records.jsonl"

# bad_records.jsonl: line -> kind of problem (lines 1 and 13 are good)
BAD_LINES = {
    2: "malformed JSON",
    3: "unknown role",
    4: "no assistant turn",
    5: "empty content",
    6: "non-string content",
    7: "roles out of order",
    8: "roles out of order",
    9: "roles out of order",
    10: "mistyped field",
    11: "unknown schema",
    12: "not an object",
}


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"prompt": "p", "completion": "c"})


@pytest.mark.parametrize("line", sorted(BAD_LINES))
def test_each_bad_case_names_file_and_line(tmp_path, line):
    bad = BAD.read_text().splitlines()[line - 1]
    p = write_lines(tmp_path / "in.jsonl", GOOD, GOOD, bad, GOOD)
    with pytest.raises(DataError) as e:
        load_conversations(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: {BAD_LINES[line]}")
    assert "\n" not in msg


def test_malformed_jsonl_names_line_and_column(tmp_path):
    p = write_lines(tmp_path / "in.jsonl", GOOD, '{"prompt": "x" "completion": "y"}')
    with pytest.raises(DataError, match=r"in\.jsonl:2: malformed JSON: Expecting ',' delimiter \(column 16\)"):
        load_conversations(p)


def test_malformed_json_array_names_line(tmp_path):
    p = tmp_path / "in.json"
    p.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a" "completion": "b"}\n]\n')
    with pytest.raises(DataError, match=r"in\.json:3: malformed JSON: Expecting ',' delimiter \(column 18\)"):
        load_conversations(p)
    p.write_text('[\n  {"prompt": "a", "completion": "b"}\n  {"prompt": "a", "completion": "b"}\n]\n')
    with pytest.raises(DataError, match=r"in\.json:3: malformed JSON: expected ',' or '\]'"):
        load_conversations(p)


def test_bad_record_in_json_array_names_its_line(tmp_path):
    p = tmp_path / "in.json"
    p.write_text('[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "a",\n   "completion": ""}\n]')
    with pytest.raises(DataError, match=r"in\.json:4: empty content"):
        load_conversations(p)


def test_non_utf8_jsonl_names_line():
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8: invalid byte 0xe9 at column 16"):
        load_conversations(DATA / "latin1.jsonl")


def test_non_utf8_json_and_csv_name_line(tmp_path):
    (tmp_path / "x.json").write_bytes(b'[\n {"text": "ok"},\n {"text": "caf\xe9"}\n]')
    with pytest.raises(DataError, match=r"x\.json:3: not UTF-8: invalid byte 0xe9 at column 15"):
        load_conversations(tmp_path / "x.json")
    (tmp_path / "x.csv").write_bytes(b'prompt,completion\nhi,"multi\nline caf\xe9"\nok,fine\n')
    with pytest.raises(DataError, match=r"x\.csv:3: not UTF-8: invalid byte 0xe9"):
        load_conversations(tmp_path / "x.csv")


def test_csv_bad_rows_name_their_start_line(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text('prompt,completion\n"a\nb",c\nonly-one-field\n')
    with pytest.raises(DataError, match=r"x\.csv:4: wrong field count: 1 fields, the header has 2"):
        load_conversations(p)
    p.write_text('prompt,completion\na,b\n"unterminated,c\n')
    with pytest.raises(DataError, match=r"x\.csv:3: malformed CSV"):
        load_conversations(p)


def test_skip_mode_counts_every_record(tmp_path):
    rejects_path = tmp_path / "rejects.jsonl"
    with RejectLog(rejects_path) as rejects:
        convs = load_conversations(BAD, on_error="skip", rejects=rejects)
    lines_in = sum(1 for line in BAD.read_text().splitlines() if line.strip())
    assert [c.source for c in convs] == [f"{BAD}:1", f"{BAD}:13"]
    assert len(convs) + rejects.total == lines_in
    expected = {}
    for kind in BAD_LINES.values():
        expected[kind] = expected.get(kind, 0) + 1
    assert rejects.summary() == expected
    logged = [json.loads(line) for line in rejects_path.read_text().splitlines()]
    assert [r["source"] for r in logged] == [f"{BAD}:{n}" for n in sorted(BAD_LINES)]
    assert [r["kind"] for r in logged] == [BAD_LINES[n] for n in sorted(BAD_LINES)]
    assert logged[0]["raw"] == '{"prompt": "broken", "completion": '
    assert logged[1]["raw"] == {"messages": [{"role": "bot", "content": "x"}]}


def test_skip_mode_non_utf8_and_csv_rows(tmp_path):
    rejects = RejectLog()
    assert len(load_conversations(DATA / "latin1.jsonl", on_error="skip", rejects=rejects)) == 2
    assert rejects.summary() == {"not UTF-8": 1}
    p = tmp_path / "x.csv"
    p.write_bytes(b'prompt,completion\n"a\nb",c\nonly-one\nq,\xff\nq,\n"x","y"\n')
    rejects = RejectLog()
    convs = load_conversations(p, on_error="skip", rejects=rejects)
    assert [c.source for c in convs] == [f"{p}:2", f"{p}:7"]
    # an empty cell is an absent field, so "q," has no completion and matches no schema
    assert rejects.summary() == {"wrong field count": 1, "not UTF-8": 1, "unknown schema": 1}


def test_skip_requires_a_reject_log():
    with pytest.raises(ValueError, match="RejectLog"):
        list(iter_records(BAD, on_error="skip"))
