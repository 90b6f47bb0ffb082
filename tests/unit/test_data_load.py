"""Loaders: every supported input gives the same Conversations, each with its source."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sftlab.data.load import iter_records, load_conversations
from sftlab.errors import SftlabError

DATA = Path(__file__).parents[1] / "fixtures" / "data"
ROWS = [
    {"instruction": "Add 1 and 2.", "output": "3", "label": "math"},
    {"instruction": "Reverse", "input": "abc", "output": "cba", "label": "text"},
]

# Columnar files: every row has every column (a missing value is a null).
FULL_ROWS = [{"input": None, **ROWS[0]}, ROWS[1]]


def expected_messages():
    return [
        [{"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "3"}],
        [{"role": "user", "content": "Reverse\n\nabc"}, {"role": "assistant", "content": "cba"}],
    ]


def test_jsonl_mixed_schemas_and_line_numbers():
    convs = load_conversations(DATA / "mixed.jsonl")
    # line 4 is blank: skipped, later records keep their physical line numbers
    assert [c.source for c in convs] == [f"{DATA / 'mixed.jsonl'}:{n}" for n in (1, 2, 3, 5, 6, 7)]
    assert convs[0].meta == {"label": "positive", "task": "sentiment"}
    assert convs[2].messages[0] == {"role": "user", "content": "2+2?"}
    assert convs[4].text == "Raw pre-training text."
    assert convs[5].meta["rejected"][-1] == {"role": "assistant", "content": "No."}


def test_json_array_sources_are_start_lines():
    convs = load_conversations(DATA / "alpaca.json")
    assert [c.source.rsplit(":", 1)[1] for c in convs] == ["2", "6"]
    assert convs[1].messages[0] == {"role": "system", "content": "You are exact."}


@pytest.mark.parametrize("payload,sources", [
    ({"data": ROWS}, ["data row 1", "data row 2"]),
    ({"version": 2, "count": 2.0, "ok": True, "data": ROWS}, ["data row 1", "data row 2"]),  # numbers beside
    ({"train": ROWS, "test": ROWS[:1]}, ["train row 1", "train row 2"]),
    ({k: [r.get(k) for r in ROWS] for k in ("instruction", "input", "output", "label")}, ["row 1", "row 2"]),
    # pandas' to_json(orient="split") and orient="index" (they were refused as objects of neither form)
    ({"columns": list(FULL_ROWS[0]), "index": [0, 1], "data": [[r.get(k) for k in FULL_ROWS[0]] for r in FULL_ROWS]},
     ["row 1", "row 2"]),
    ({"0": FULL_ROWS[0], "1": FULL_ROWS[1]}, ["row 1", "row 2"]),
])
def test_json_object_forms(tmp_path, payload, sources):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(payload))
    convs = load_conversations(p)
    assert [c.messages for c in convs] == expected_messages()
    assert [c.source for c in convs] == [f"{p}:{s}" for s in sources]
    assert [c.meta["label"] for c in convs] == ["math", "text"]


def test_json_object_split_choice(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"dev": ROWS, "test": ROWS[:1]}))
    assert len(load_conversations(p, split="test")) == 1
    with pytest.raises(SftlabError, match="several splits"):
        load_conversations(p)
    with pytest.raises(SftlabError, match="no split 'valid'"):
        load_conversations(p, split="valid")


def test_json_single_record(tmp_path):
    p = tmp_path / "one.json"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
    assert [c.source for c in load_conversations(p)] == [f"{p}:1"]


def test_csv_embedded_newlines_and_quotes():
    p = DATA / "embedded_newlines.csv"
    convs = load_conversations(p)
    assert [c.source for c in convs] == [f"{p}:2", f"{p}:5", f"{p}:6"]
    assert convs[0].messages == [{"role": "user", "content": "Summarise:\n\nline one\nline two\nline three"},
                                 {"role": "assistant", "content": "one, two, three"}]
    assert convs[1].messages == [{"role": "user", "content": 'Quote "this"'},
                                 {"role": "assistant", "content": 'He said "yes"'}]
    assert [c.meta for c in convs] == [{"label": "a"}, {"label": "b"}, {"label": "c"}]


def test_csv_message_column_holds_json(tmp_path):
    p = tmp_path / "m.csv"
    msgs = [{"role": "user", "content": "q, with comma"}, {"role": "assistant", "content": "a"}]
    import csv

    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages", "id"])
        w.writerow([json.dumps(msgs), "7"])
    [c] = load_conversations(p)
    assert c.messages == msgs and c.meta == {"id": "7"}
    with open(p, "w", newline="") as f:  # pandas writes a column of lists as their Python repr
        csv.writer(f).writerows([["messages"], [repr(msgs)]])
    with pytest.raises(SftlabError, match=r"m.csv:2: malformed JSON: in column 'messages': .* \(single quotes: "
                                          r"a Python repr"):
        load_conversations(p)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(FULL_ROWS), p)
    convs = load_conversations(p)
    assert [c.messages for c in convs] == expected_messages()
    assert [c.source for c in convs] == [f"{p}:row 1", f"{p}:row 2"]
    assert [c.meta for c in convs] == [{"label": "math"}, {"label": "text"}]  # null cells are absent fields


def test_saved_hf_dataset_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(FULL_ROWS).save_to_disk(str(tmp_path / "ds"))
    assert [c.messages for c in load_conversations(tmp_path / "ds")] == expected_messages()
    DatasetDict({"train": Dataset.from_list(FULL_ROWS), "test": Dataset.from_list(FULL_ROWS[1:])}).save_to_disk(str(tmp_path / "dd"))
    test = load_conversations(tmp_path / "dd", split="test")
    assert [c.messages for c in test] == expected_messages()[1:]
    assert test[0].source == f"{tmp_path / 'dd'}[test]:row 1"
    assert len(load_conversations(tmp_path / "dd")) == 2  # train by default


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SftlabError, match="cannot load dataset 'sftlab-test/no-such-dataset'.*network or the local cache"):
        load_conversations("sftlab-test/no-such-dataset")


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(SftlabError, match="file not found"):
        load_conversations(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(SftlabError, match="unsupported file type '.txt'"):
        load_conversations(tmp_path / "x.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(SftlabError, match="neither a saved Hugging Face dataset .* nor a folder of data files"):
        load_conversations(tmp_path / "folder")


def test_bom_file_loads():
    [c] = load_conversations(DATA / "bom.jsonl")
    assert c.messages[0] == {"role": "user", "content": "Hi"}


def test_bom_json_and_csv(tmp_path):
    (tmp_path / "b.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS).encode())
    (tmp_path / "b.csv").write_bytes(b"\xef\xbb\xbfinstruction,output\nHi,Hello\n")
    assert len(load_conversations(tmp_path / "b.json")) == 2
    [c] = load_conversations(tmp_path / "b.csv")
    assert c.messages[0]["content"] == "Hi"


def test_iter_records_streams_jsonl(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(5000)))
    it = iter_records(p)
    assert next(it) == (f"{p}:1", {"text": "t0"})
    assert sum(1 for _ in it) == 4999


def test_csv_text_cells_that_start_with_a_bracket_stay_text(tmp_path):
    """prompt/completion/chosen/rejected cells may be text that starts with '[' (a list as an
    answer, a Llama-style '[INST]' prompt): only a JSON list of message objects is parsed."""
    f = tmp_path / "pc.csv"
    f.write_text('prompt,completion\n"Sort the list [3, 1, 2]","[1, 2, 3]"\n[INST] Say hi,Hi\n'
                 'Say [what],"[{""role"": ""assistant"", ""content"": ""ok""}]"\n')
    convs = load_conversations(f)
    assert [c.messages[-1]["content"] for c in convs] == ["[1, 2, 3]", "Hi", "ok"]
    assert convs[1].messages[0]["content"] == "[INST] Say hi"
    bad = tmp_path / "messages.csv"  # a messages column holds nothing but message lists
    bad.write_text('messages\n"[{""role"": ""user"", ""content"": ""hi""}, {bad json"\n')
    with pytest.raises(SftlabError, match=r"messages.csv:2: malformed JSON: in column 'messages'"):
        load_conversations(bad)


def test_pandas_outputs_load(tmp_path):
    """What pandas writes by default: to_csv()'s unnamed index column, to_json()'s columns of
    {row number: value}, and to_parquet()'s index column; the index goes nowhere."""
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(ROWS, index=[10, 11])
    df.to_csv(tmp_path / "a.csv")
    df.reset_index(drop=True).to_json(tmp_path / "a.json")
    df.to_parquet(tmp_path / "a.parquet")
    for name in ("a.csv", "a.json", "a.parquet"):
        convs = load_conversations(tmp_path / name)
        assert [c.messages for c in convs] == expected_messages(), name
        assert [c.meta for c in convs] == [{"label": "math"}, {"label": "text"}], name
    (tmp_path / "semi.csv").write_text("instruction;output\nAdd;3\n")
    with pytest.raises(SftlabError, match=r"semi.csv:1: the CSV header is one column, 'instruction;output'"):
        load_conversations(tmp_path / "semi.csv")


def test_json_columns_may_hold_objects(tmp_path):
    """An object of equal-length columns where one column holds objects (SQuAD's answers, a
    meta column) is still columns; an object of lists of records only is splits."""
    f = tmp_path / "cols.json"
    f.write_text(json.dumps({"instruction": ["Say hi", "Say bye"], "output": ["Hi", "Bye"],
                             "meta": [{"src": "a"}, {"src": "b"}]}))
    convs = load_conversations(f)
    assert [c.messages[-1]["content"] for c in convs] == ["Hi", "Bye"]
    assert convs[1].meta == {"meta": {"src": "b"}}
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"question": ["Who?"], "context": ["Ann wrote it."],
                                 "answers": [{"text": ["Ann"], "answer_start": [0]}]}))
    assert load_conversations(squad)[0].messages[-1]["content"] == "Ann"


def test_gzipped_jsonl_json_and_csv(tmp_path):
    import gzip

    lines = "".join(json.dumps(r) + "\n" for r in ROWS)
    for name, text in (("a.jsonl.gz", lines), ("a.json.gz", json.dumps(ROWS)),
                       ("a.csv.gz", "instruction,input,output,label\nAdd 1 and 2.,,3,math\nReverse,abc,cba,text\n")):
        (tmp_path / name).write_bytes(gzip.compress(text.encode()))
        convs = load_conversations(tmp_path / name)
        assert [c.messages for c in convs] == expected_messages(), name
    assert load_conversations(tmp_path / "a.jsonl.gz")[1].source == f"{tmp_path / 'a.jsonl.gz'}:2"
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines.encode())[:-12])  # cut short
    with pytest.raises(SftlabError, match=r"b.jsonl.gz: not a readable gzip file"):
        load_conversations(tmp_path / "b.jsonl.gz")
    (tmp_path / "c.jsonl.gz").write_text(lines)  # not gzip at all
    with pytest.raises(SftlabError, match=r"c.jsonl.gz: not a readable gzip file"):
        load_conversations(tmp_path / "c.jsonl.gz")


@pytest.mark.parametrize("suffix, kind", [(".zst", "zstd"), (".xz", "xz"), (".bz2", "bzip2")])
def test_zstd_xz_and_bzip2_data_files(tmp_path, suffix, kind):
    """Large text corpora ship as .jsonl.zst (and some sets as .xz / .bz2): they were an unsupported file type."""
    import bz2
    import lzma

    import zstandard

    compress = {".zst": zstandard.compress, ".xz": lzma.compress, ".bz2": bz2.compress}[suffix]
    lines = "".join(json.dumps(r) + "\n" for r in ROWS)
    path = tmp_path / f"a.jsonl{suffix}"
    path.write_bytes(compress(lines.encode()))
    convs = load_conversations(path)
    assert [c.messages for c in convs] == expected_messages() and convs[1].source == f"{path}:2"
    path.write_bytes(compress(lines.encode())[:-9])  # cut short: zstandard's own reader gave no record and no error
    with pytest.raises(SftlabError, match=rf"a.jsonl{re.escape(suffix)}: not a readable {kind} file"):
        load_conversations(path)
    cut = len(lines) // 2 + 3  # two frames (streams), split inside a record, as concatenating tools write them
    path.write_bytes(compress(lines[:cut].encode()) + compress(lines[cut:].encode()))
    assert [c.messages for c in load_conversations(path)] == expected_messages()


def test_json_and_json_lines_mixed_up_are_named(tmp_path):
    (tmp_path / "array.jsonl").write_text(json.dumps(ROWS, indent=2))
    with pytest.raises(SftlabError, match=r"array.jsonl:1: this is one JSON document over several lines"):
        load_conversations(tmp_path / "array.jsonl")
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(SftlabError, match=r"lines.json:2: this is JSON Lines"):
        load_conversations(tmp_path / "lines.json")


def oasst_rows() -> list[dict]:
    """Two OpenAssistant trees as oasst1 publishes them: one message per row, replies ranked."""
    def row(mid, parent, role, text, rank=None, tree="t1", **extra):
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank, "lang": "en",
                "message_tree_id": tree, "deleted": False, "review_result": True, "synthetic": False, **extra}

    return [
        row("a", None, "prompter", "What is a prime?"),
        row("b", "a", "assistant", "A number.", rank=1),
        row("c", "a", "assistant", "A number with exactly two divisors.", rank=0),
        row("d", "c", "prompter", "Is 1 one?"),
        row("e", "d", "assistant", "No: it has one divisor.", rank=1, deleted=True),
        row("f", "d", "assistant", "No, 1 has a single divisor.", rank=2),
        row("g", "f", "prompter", "Thanks!"),  # the path ends at its last assistant message
        row("h", None, "prompter", "Hi", tree="t2"),
        row("i", "h", "assistant", "Hello", review_result=False, tree="t2"),  # failed review: left out
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_openassistant_rows_become_one_conversation_per_tree(tmp_path, suffix):
    from sftlab.data.load import RejectLog

    path = tmp_path / f"oasst{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in oasst_rows()))
    else:
        import pandas as pd

        pd.DataFrame(oasst_rows()).to_parquet(path)
    rejects = RejectLog()
    (conv,) = load_conversations(path, on_error="skip", rejects=rejects)
    assert [(m["role"], m["content"]) for m in conv.messages] == [
        ("user", "What is a prime?"), ("assistant", "A number with exactly two divisors."),
        ("user", "Is 1 one?"), ("assistant", "No, 1 has a single divisor.")]
    assert conv.meta == {"message_tree_id": "t1", "lang": "en"}
    assert conv.source == (f"{path}:6" if suffix == ".jsonl" else f"{path}:row 6")
    assert rejects.summary() == {"no assistant turn": 1}  # the tree whose only reply failed review
    with pytest.raises(SftlabError, match="no assistant turn"):
        load_conversations(path)
    # with a format given, rows are records of their own: `text` trains each message alone
    assert len(load_conversations(path, format="text")) == len(oasst_rows())


def test_a_text_and_label_file_says_the_label_is_unused_and_how_to_map_it(tmp_path):
    import warnings

    path = tmp_path / "clf.csv"
    path.write_text("text,label\ngreat jacket,positive\nbad zip,negative\n")
    with pytest.warns(UserWarning, match=r"clf.csv: records of 'text' and 'label' are read as raw text .* --columns "
                                         r"prompt=text,response=label"):
        assert [c.text for c in load_conversations(path)] == ["great jacket", "bad zip"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a format given on purpose: nothing to say
        load_conversations(path, format="text")


def test_a_folder_of_data_files_as_the_hub_lays_them_out(tmp_path):
    """A downloaded dataset snapshot (README.md's configs, data/train-*.parquet) or a folder of split
    files was refused as 'not a saved Hugging Face dataset'; now each split's files are read by the
    reader of their type, so a bad record still names its file and line."""
    import pandas as pd

    from sftlab.errors import RecordError

    snap = tmp_path / "snap"
    (snap / "data").mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello"}]}
            for i in range(3)]
    pd.DataFrame(rows[:2]).to_parquet(snap / "data" / "train-00000-of-00002.parquet")
    pd.DataFrame(rows[2:]).to_parquet(snap / "data" / "train-00001-of-00002.parquet")
    pd.DataFrame(rows[:1]).to_parquet(snap / "data" / "test-00000-of-00001.parquet")
    (snap / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: data/train-*\n  - split: test\n    path: data/test-*\n---\n# A set\n")
    convs = load_conversations(snap)
    assert [c.messages[0]["content"] for c in convs] == ["Hi 0", "Hi 1", "Hi 2"]
    assert convs[2].source.endswith("train-00001-of-00002.parquet:row 1")
    assert [c.messages[0]["content"] for c in load_conversations(snap, split="test")] == ["Hi 0"]
    with pytest.raises(SftlabError, match="has no split 'dev'; it has: train, test"):
        load_conversations(snap, split="dev")

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    (plain / "validation.jsonl").write_text('{"prompt": "v", "completion": "w"}\n')
    assert [c.messages[0]["content"] for c in load_conversations(plain, split="validation")] == ["v"]
    with pytest.raises(RecordError) as e:
        load_conversations(plain)
    assert e.value.source == f"{plain / 'train.jsonl'}:2"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SftlabError, match="neither a saved Hugging Face dataset .* nor a folder of data files"):
        load_conversations(tmp_path / "empty")
