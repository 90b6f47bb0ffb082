"""report: HTML (self-contained), Markdown and plots render, and their numbers match summary.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sftlab.data.report import write_report

DATA = Path(__file__).parents[1] / "fixtures" / "data"


def test_report_numbers_match_summary(tmp_path, tokenizer):
    validate = {"records_in": 13, "kept": 2, "rejected": 11, "duplicates": 1, "truncated": 0,
                "rejected_by_reason": {"roles out of order": 3, "malformed JSON": 8},
                "duplicate_examples": [{"source": "x:5", "duplicate_of": "x:1"}]}
    curate = {"records_in": 10, "kept": 7, "removed_total": 3, "removed": {"near duplicate": 2, "contaminated": 1},
              "pii_replacements": {"email": 4},
              "examples": {"near duplicate": [{"source": "x:9", "reason": "near duplicate", "duplicate_of": "x:2",
                                               "text": "Hello <b>world</b>"}]}}
    (tmp_path / "v.json").write_text(json.dumps(validate))
    (tmp_path / "c.json").write_text(json.dumps(curate))
    (tmp_path / "split.json").write_text(json.dumps({"sizes": {"train": 8, "test": 2}, "seed": 3, "stratify": "label"}))
    out = tmp_path / "report"
    summary = write_report(DATA / "mixed.jsonl", out, tokenizer=tokenizer,
                           summaries={"validate": tmp_path / "v.json", "curate": tmp_path / "c.json",
                                      "split": tmp_path / "split.json"})
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["conversations"] == 6 and summary["chat"] == 5 and summary["raw_text"] == 1
    assert summary["role_counts"] == {"user": 5, "assistant": 5, "system": 1}
    assert summary["turns_per_conversation"] == {"1": 5}
    assert summary["length_unit"] == "tokens"
    assert summary["response_length"]["count"] == 5 and summary["raw_text_length"]["count"] == 1

    html = (out / "report.html").read_text()
    cells = dict(re.findall(r"data-key='([^']*)'>([^<]*)<", html))
    assert cells["Dataset|Conversations"] == "6"
    assert cells["Validation|Rejected: malformed JSON"] == "8"
    assert cells["Validation|Exact duplicates removed"] == "1"
    assert cells["Curation (duplicates, near-duplicates, filters)|Removed: near duplicate"] == "2"
    assert cells["Curation (duplicates, near-duplicates, filters)|PII replaced: email"] == "4"
    assert cells["Splits|Split: train"] == "8"
    for key, value in summary["prompt_length"].items():
        assert cells[f"Prompt length (tokens)|{key}"] == str(value)
    assert "Hello &lt;b&gt;world&lt;/b&gt;" in html  # examples are escaped
    assert html.count("src='data:image/png;base64,") == len(list((out / "plots").glob("*.png"))) >= 6
    assert "http" not in html.split("<body>", 1)[1]  # self-contained

    md = (out / "report.md").read_text()
    assert "| Conversations | 6 |" in md and "| Removed: contaminated | 1 |" in md and "| Split: test | 2 |" in md
    for png in (out / "plots").glob("*.png"):
        assert f"(plots/{png.name})" in md and png.read_bytes()[:4] == b"\x89PNG"


def test_report_finds_sidecar_summaries_and_counts_words(tmp_path):
    data = tmp_path / "clean.jsonl"
    data.write_text((DATA / "mixed.jsonl").read_text())
    (tmp_path / "clean.curate.json").write_text(json.dumps({"records_in": 6, "kept": 6, "removed_total": 0, "removed": {}}))
    summary = write_report(data, tmp_path / "r")
    assert list(summary["steps"]) == ["curate"] and summary["length_unit"] == "words"
    assert summary["raw_text_length"] == {"count": 1, "min": 3, "median": 3, "mean": 3.0, "p95": 3, "max": 3}


def test_html_in_the_data_is_shown_as_text(tmp_path):
    """The page is built by a jinja2 template with autoescaping: markup in a file name, a record or a
    step summary is shown, never run."""
    data = tmp_path / "<script>x.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "<img src=x onerror=alert(1)>"},
                                             {"role": "assistant", "content": "ok"}]}) + "\n")
    curate = {"records_in": 2, "kept": 1, "removed_total": 1, "removed": {"<b>near</b>": 1},
              "examples": {"near": [{"source": "<i>a</i>:2", "reason": "near duplicate", "duplicate_of": "<u>b</u>",
                                     "text": "<script>alert(2)</script>", "duplicate_of_text": "x'y\"z"}]}}
    (tmp_path / "c.json").write_text(json.dumps(curate))
    out = tmp_path / "report"
    write_report(data, out, summaries={"curate": tmp_path / "c.json"})
    page = (out / "report.html").read_text()
    body = page.split("<body>", 1)[1]
    for markup in ("<script", "<b>", "<i>", "<u>", "<img src=x"):
        assert markup not in body
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in body and "&lt;script&gt;x.jsonl" in body
    assert "x&#39;y&#34;z" in body
    assert not list(out.glob(".*.tmp"))  # written atomically, no temp file left behind
