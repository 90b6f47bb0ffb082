"""`sftlab data ...` end to end through the CLI: validate -> curate -> split -> augment -> report."""

from __future__ import annotations

import json
from pathlib import Path

from sftlab.cli import main

FIXTURES = Path(__file__).parents[1] / "fixtures"
DATA = FIXTURES / "data"


def test_strict_validate_is_one_line_error(capsys):
    assert main(["data", "validate", str(DATA / "bad_records.jsonl")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {DATA / 'bad_records.jsonl'}:2: malformed JSON: Expecting value (column 36)"


def test_non_utf8_strict_error(capsys):
    assert main(["data", "validate", str(DATA / "latin1.jsonl")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {DATA / 'latin1.jsonl'}:2: not UTF-8")


def test_pipeline(tmp_path, capsys):
    src = tmp_path / "raw.jsonl"
    rows = [{"instruction": f"Describe item number {i} of the catalogue in one short sentence.",
             "output": f"Item {i} is a {['red', 'blue', 'green'][i % 3]} widget made of {['steel', 'wood'][i % 2]}.",
             "label": ["a", "b"][i % 2]} for i in range(40)]
    rows += [rows[0], {"instruction": "Bad", "output": "   "}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    clean = tmp_path / "clean.jsonl"
    assert main(["data", "validate", str(src), "--skip", "--out", str(clean)]) == 0
    v = json.loads((tmp_path / "clean.validate.json").read_text())
    assert (v["records_in"], v["kept"], v["rejected"], v["duplicates"]) == (42, 40, 1, 1)
    assert json.loads((tmp_path / "clean.rejects.jsonl").read_text())["source"] == f"{src}:42"

    cur = tmp_path / "cur.parquet"
    assert main(["data", "curate", str(clean), "--out", str(cur), "--set", "near_dedup=false", "--pii"]) == 0
    c = json.loads((tmp_path / "cur.curate.json").read_text())
    assert c["kept"] == 40 and cur.exists()

    splits = tmp_path / "splits"
    assert main(["data", "split", str(cur), "--out-dir", str(splits), "--ratios", "0.5,0.25,0.25", "--stratify", "label"]) == 0
    sizes = json.loads((splits / "split.json").read_text())["sizes"]
    assert sizes == {"train": 20, "validation": 10, "test": 10}
    assert sum(1 for _ in open(splits / "train.jsonl")) == 20

    aug = tmp_path / "aug.jsonl"
    assert main(["data", "augment", str(splits / "train.jsonl"), "--out", str(aug), "--strategy", "paraphrase",
                 "--strategy", "noise", "--seed", "1"]) == 0
    a = json.loads((tmp_path / "aug.augment.json").read_text())
    lines = [json.loads(x) for x in aug.read_text().splitlines()]
    assert len(lines) == 20 + a["kept_total"] and a["kept_total"] > 0
    assert all("augmented_from" in r for r in lines[20:])

    out = tmp_path / "report"
    assert main(["data", "report", str(cur), "--out-dir", str(out), "--model", "none",
                 "--validate-summary", str(tmp_path / "clean.validate.json"),
                 "--split-summary", str(splits / "split.json")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["steps"]) == {"validate", "curate", "split"} and summary["conversations"] == 40
    assert (out / "report.html").stat().st_size > 10_000


def test_bad_option_names_closest(capsys, tmp_path):
    assert main(["data", "curate", str(DATA / "mixed.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                 "--set", "near_dedup_treshold=0.5"]) == 1
    assert "did you mean 'near_dedup_threshold'" in capsys.readouterr().err


def test_inspect_is_registered(capsys):
    tok = FIXTURES / "smollm2-tokenizer"
    assert main(["data", "inspect", str(DATA / "mixed.jsonl"), "--model", str(tok), "--json", "--limit", "1"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert record["source"] == f"{DATA / 'mixed.jsonl'}:1" and len(record["input_ids"]) == len(record["labels"])


def test_an_empty_file_is_said_to_hold_no_records(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "out"
    for command in (["data", "validate", str(empty)], ["data", "inspect", str(empty)],
                    ["data", "curate", str(empty), "--out", str(out / "c.jsonl")],
                    ["data", "split", str(empty), "--out-dir", str(out)],
                    ["data", "report", str(empty), "--out-dir", str(out / "report")]):
        assert main(command) == 0
        assert f"warning: {empty} holds no records" in capsys.readouterr().err


def test_curate_checks_its_output_name_before_reading_and_keeps_what_it_removed(tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    rows = [{"instruction": "Say hi", "output": "Hi there, friend."}] * 2
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "curate", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.csv")]) == 1
    assert "x.csv: output must end in .jsonl or .parquet" in capsys.readouterr().err  # not "file not found"
    assert main(["data", "curate", str(src), "--out", str(tmp_path / "c.jsonl")]) == 0
    removed = [json.loads(x) for x in (tmp_path / "c.removed.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in removed] == ["exact duplicate"]
    assert removed[0]["record"]["messages"][1]["content"] == "Hi there, friend."  # the record itself, as written


def test_an_output_that_is_the_input_is_refused(tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"instruction": "Say hi", "output": "Hi"}) + "\n")
    for command in (["data", "augment", str(src), "--out", str(src)], ["data", "curate", str(src), "--out", str(src)],
                    ["data", "validate", str(src), "--out", str(src)]):
        assert main(command) == 1
        assert f"--out {src} is the input file" in capsys.readouterr().err
    assert src.read_text().count("\n") == 1
