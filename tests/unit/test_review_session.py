"""Review session: stable ids, flags from the curate/validate checks, export with provenance,
model suggestions, and the review section of `sftlab data report`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftlab.data.load import load_conversations, save_conversations
from sftlab.data.review.session import ReviewSession, check_label, item_ids, review_dir_for
from sftlab.data.review.suggest import parse_suggestion, run_suggestions, suggestion_prompt
from sftlab.errors import SftlabError

RECORDS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], "task": "math"},
    {"instruction": "Name the capital of France in one word", "output": "Paris"},
    {"instruction": "Name the capital of France in one word!", "output": "Paris"},  # near duplicate of line 2
    {"prompt": "Email me", "completion": "Write to jane.roe@example.org today"},
    {"messages": [{"role": "user", "content": "Help"}, {"role": "assistant", "content": "As an AI language model I cannot"}]},
    {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
     "augmented_from": "seed.jsonl:3", "augmentation": "paraphrase"},
    {"text": "plain text for continued pre-training"},
]


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    return write(tmp_path / "data.jsonl", RECORDS)


def test_ids_follow_content_when_lines_move(tmp_path, data):
    session = ReviewSession(data)
    session.act(session.ids[1], {"action": "accept"})
    write(data, [{"prompt": "new first line", "completion": "ok"}, *RECORDS])  # every line number shifts
    moved = ReviewSession(data)
    assert moved.log.state(moved.ids[2]).status == "accepted" and moved.item(moved.ids[2])["source"].endswith(":3")
    assert moved.progress()["accepted"] == 1
    twins = item_ids(load_conversations(write(tmp_path / "twins.jsonl", [RECORDS[0], RECORDS[0]])))
    assert len(set(twins)) == 2 and twins[1] == twins[0] + "-2"
    assert session.dir == review_dir_for(data) == data.with_name("data.jsonl.review")


def test_flags_come_from_the_curate_and_validate_checks(data, tokenizer):
    session = ReviewSession(data, tokenizer=tokenizer, max_seq_length=41)  # lengths: 40 41 42 45 40 36 8
    kinds = [[f["kind"] for f in flags] for flags in session.flags]
    assert kinds[2] == ["near duplicate", "too long"] and f"of {data}:2" in session.flags[2][0]["detail"]
    assert "PII" in kinds[3] and session.flags[3][kinds[3].index("PII")]["detail"] == "email x1"
    assert kinds[4][0] == "boilerplate refusal"
    assert session.flags[5][0] == {"kind": "augmented", "detail": "from seed.jsonl:3 (paraphrase)"}
    assert kinds[0] == [] and kinds[6] == []
    from sftlab.data.validate import token_lengths

    assert session.tokens == token_lengths(session.convs, tokenizer)
    assert ["too long" in k for k in kinds] == [n > 41 for n in session.tokens] == [0, 0, 1, 1, 0, 0, 0]
    view = session.token_view(session.ids[0])
    assert "".join(text for text, _ in view["pieces"]).count("What is 2+2?") == 1
    assert "".join(text for text, trained in view["pieces"] if trained).startswith("4")
    assert view["tokens"] == session.tokens[0] and view["trained"] == sum(t for _, t in view["pieces"])
    assert session.matching(flag="PII") == [session.ids[3]]


def test_flags_follow_edits(data, tokenizer):
    """Own checks (quality, PII, length) rerun on the edited text; flags that compared the
    original with other records stay, marked "(before edit)"."""
    session = ReviewSession(data, tokenizer=tokenizer, max_seq_length=41)
    ids = session.ids
    session.act(ids[3], {"action": "edit", "message": 1, "content": "Write to us through the contact form"})
    assert [f["kind"] for f in session.flags[3]] == ["PII", "too long"]
    assert session.item(ids[3])["flags"] == [] and session.matching(flag="PII") == []  # both fixed by the edit
    session.act(ids[2], {"action": "edit", "message": 0, "content": "France's capital?"})
    item = session.item(ids[2])
    assert [f["kind"] for f in item["flags"]] == ["near duplicate"]  # and no longer too long
    assert item["flags"][0]["detail"].startswith(f"of {data}:2 (") and item["flags"][0]["detail"].endswith(") (before edit)")
    assert item["tokens"] < session.tokens[2]
    session.act(ids[0], {"action": "edit", "message": 1, "content": "As an AI language model I cannot"})
    assert [f["kind"] for f in session.item(ids[0])["flags"]] == ["boilerplate refusal", "too long"]
    assert session.matching(flag="boilerplate refusal") == [ids[0], ids[4]]
    session.act(ids[0], {"action": "edit", "message": 1, "content": "4"})  # back to the original text
    assert session.item(ids[0])["flags"] == []


def test_filters_and_search_read_the_edited_text(data):
    session = ReviewSession(data)
    a, b = session.ids[0], session.ids[1]
    session.act(a, {"action": "edit", "message": 1, "content": "Four, written out"})
    session.act(a, {"action": "label", "label": "arith"})
    session.act(b, {"action": "reject", "reason": "duplicate"})
    assert session.matching(q="WRITTEN OUT") == [a] and session.matching(q="2+2") == [a]
    assert session.matching(label="arith") == [a] and session.matching(status="rejected") == [b]
    assert len(session.matching(status="pending")) == len(RECORDS) - 1
    assert session.matching(q=f"{data}:2") == [b]


def test_bad_actions_are_refused(data):
    session = ReviewSession(data)
    item = session.ids[0]
    for action, message in [({"action": "edit", "message": 5, "content": "x"}, "index from 0 to 1"),
                            ({"action": "edit", "message": 0}, "needs 'content'"),
                            ({"action": "score", "score": 6}, "from 1 to 5"),
                            ({"action": "label", "label": "  "}, "non-empty"),
                            ({"action": "label", "label": "x" * 65}, "at most 64"),
                            ({"action": "approve"}, "unknown action")]:
        with pytest.raises(SftlabError, match=message):
            session.act(item, action)
    with pytest.raises(SftlabError, match="no example with id 'no-such-id'"):
        session.act("no-such-id", {"action": "accept"})
    assert session.log.seq == 0
    assert check_label(" ok ") == "ok"


def test_export_holds_the_accepted_records_with_edits_provenance_and_labels(tmp_path, data):
    session = ReviewSession(data)
    ids = session.ids
    session.act(ids[0], {"action": "edit", "message": 1, "content": "2 + 2 = 4"})
    session.act(ids[0], {"action": "label", "label": "math"})
    session.act(ids[0], {"action": "score", "score": 5})
    session.act(ids[0], {"action": "accept"})
    session.act(ids[1], {"action": "accept"})
    session.act(ids[2], {"action": "reject", "reason": "near duplicate"})
    session.act(ids[3], {"action": "edit", "message": 1, "content": "edited but never accepted"})
    session.act(ids[6], {"action": "edit", "message": 0, "content": "edited raw text"})
    session.act(ids[6], {"action": "accept"})
    session.act(ids[1], {"action": "reset"})
    for ext in ("jsonl", "parquet"):
        out = tmp_path / f"out.{ext}"
        assert save_conversations(out, session.approved()) == 2
        back = load_conversations(out)
        assert [c.messages for c in back[:1]] == [[{"role": "user", "content": "What is 2+2?"},
                                                   {"role": "assistant", "content": "2 + 2 = 4"}]]
        assert back[1].text == "edited raw text"
        review = back[0].meta["review"]
        assert back[0].meta["task"] == "math"
        assert (review["source"], review["labels"], review["score"], review["edited_messages"], review["id"]) == (
            f"{data}:1", ["math"], 5, [1], ids[0])
        assert back[1].meta["review"]["source"] == f"{data}:7"
    stats = session.stats()
    assert (stats["accepted"], stats["rejected"], stats["pending"], stats["edited"]) == (2, 1, 4, 3)
    assert stats["reject_reasons"] == {"near duplicate": 1} and stats["labels"] == {"math": 1}


def test_suggestions_are_parsed_logged_and_resumed(data):
    session = ReviewSession(data, labels=["math", "geography"])
    assert parse_suggestion("score: 4\nlabel: Geography.", session.labels) == {
        "score": 4, "label": "geography", "raw": "score: 4\nlabel: Geography."}
    assert parse_suggestion("I like it", session.labels)["score"] is None
    assert parse_suggestion("score: 2\nlabel: cooking", session.labels)["label"] is None
    prompt = suggestion_prompt(session.convs[0], session.labels)[0]["content"]
    assert "[user]\nWhat is 2+2?" in prompt and "math, geography" in prompt
    asked = []

    def fake_model(prompts, labels):
        asked.extend(prompts)
        return [parse_suggestion("score: 3\nlabel: math", labels)] * len(prompts)

    run_suggestions(session, fake_model, batch_size=3)
    assert len(asked) == len(RECORDS) and session.suggest_status["state"] == "done"
    assert session.item(session.ids[0])["suggestion"] == {"score": 3, "label": "math", "raw": "score: 3\nlabel: math",
                                                          "by": "model"}
    assert session.item(session.ids[0])["status"] == "pending"  # a suggestion is not a decision
    run_suggestions(ReviewSession(data, labels=["math"]), fake_model)  # a restarted session skips them
    assert len(asked) == len(RECORDS)

    def broken(prompts, labels):
        raise SftlabError("endpoint down")

    session.act(session.ids[0], {"action": "reset"})
    fresh = ReviewSession(write(data.with_name("other.jsonl"), RECORDS[:2]))
    run_suggestions(fresh, broken)
    assert fresh.suggest_status == {"state": "failed", "by": "model", "done": 0, "total": 2, "message": "endpoint down"}


def test_data_report_shows_the_review(tmp_path, data):
    from sftlab.data.report import write_report

    session = ReviewSession(data)
    session.act(session.ids[0], {"action": "accept"})
    session.act(session.ids[0], {"action": "score", "score": 4})
    session.act(session.ids[1], {"action": "reject", "reason": "too easy"})
    summary = write_report(data, tmp_path / "report")
    review = summary["steps"]["review"]
    assert (review["total"], review["reviewed"], review["accepted"], review["rejected"]) == (len(RECORDS), 2, 1, 1)
    assert review["scores"] == {"4": 1} and review["reject_reasons"] == {"too easy": 1}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Review" in md and "| Rejected: too easy | 1 |" in md and "| Accepted | 1 |" in md
    assert (tmp_path / "report" / "plots" / "review.png").is_file()


def test_data_report_finds_a_moved_review_log_and_only_reads_it(tmp_path, data, capsys):
    from sftlab import cli
    from sftlab.data.review.log import ReviewLog
    from sftlab.data.report import write_report

    moved = tmp_path / "decisions"
    session = ReviewSession(data, review_dir=moved)
    session.act(session.ids[0], {"action": "accept"})
    session.act(session.ids[1], {"action": "reject", "reason": "dup"})
    log = moved / "log.jsonl"
    with log.open("ab") as fh:
        fh.write(b'{"id": "cut sh')  # a writer killed mid-line: a reader must leave it as it is
    before = log.read_bytes()
    assert cli.main(["data", "report", str(data), "--out-dir", str(tmp_path / "r"), "--model", "none",
                     "--review-dir", str(moved)]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Review" in md and "| Accepted | 1 |" in md and "| Rejected: dup | 1 |" in md
    assert log.read_bytes() == before and sorted(p.name for p in moved.iterdir()) == ["log.jsonl"]
    assert "review" not in write_report(data, tmp_path / "r2")["steps"]  # not beside the data: none
    assert not review_dir_for(data).exists()  # and nothing made there
    with pytest.raises(SftlabError, match="read-only"):
        ReviewLog(log, read_only=True).append({"id": "x", "action": "accept"})
    assert log.read_bytes() == before
    assert cli.main(["data", "report", str(data), "--out-dir", str(tmp_path / "r3"), "--model", "none",
                     "--review-dir", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: no review log (log.jsonl) there" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_export_refuses_the_dataset_itself_and_the_review_folder(tmp_path, data, capsys):
    from sftlab import cli

    ReviewSession(data).act(item_ids(load_conversations(data))[0], {"action": "accept"})
    before = data.read_bytes()
    for out in (data, review_dir_for(data) / "out.jsonl", tmp_path / "data.jsonl.review"):
        assert cli.main(["data", "review", str(data), "--export", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: --export {out}: ") and ("dataset being reviewed" in err or "review folder" in err)
    assert data.read_bytes() == before and sorted(p.name for p in review_dir_for(data).iterdir()) == ["log.jsonl"]
    assert cli.main(["data", "review", str(data), "--export", str(tmp_path / "ok.jsonl")]) == 0


def test_a_second_review_keeps_the_first_as_history(tmp_path, data):
    first = ReviewSession(data)
    first.act(first.ids[0], {"action": "label", "label": "math"})
    first.act(first.ids[0], {"action": "accept"})
    once = tmp_path / "once.jsonl"
    save_conversations(once, first.approved())
    earlier = load_conversations(once)[0].meta["review"]
    second = ReviewSession(once)
    second.act(second.ids[0], {"action": "score", "score": 2})
    second.act(second.ids[0], {"action": "accept"})
    twice = tmp_path / "twice.jsonl"
    save_conversations(twice, second.approved())
    review = load_conversations(twice)[0].meta["review"]
    assert (review["source"], review["score"], review["labels"]) == (f"{once}:1", 2, [])
    assert review["previous"] == earlier and earlier["source"] == f"{data}:1" and earlier["labels"] == ["math"]
