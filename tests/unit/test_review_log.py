"""The review log: append-only JSONL whose fold is the review state; nothing lost across
writers, kills mid-write or reopening."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from sftlab.data.review.log import ItemState, ReviewLog
from sftlab.data.review.session import Conflict
from sftlab.errors import SftlabError


def _actions(log: ReviewLog, item: str = "a") -> None:
    for entry in ({"action": "accept"}, {"action": "reject", "reason": "wrong answer"},
                  {"action": "edit", "message": 1, "content": "fixed"}, {"action": "label", "label": "math"},
                  {"action": "label", "label": "easy"}, {"action": "unlabel", "label": "math"},
                  {"action": "score", "score": 4}, {"action": "suggest", "suggestion": {"score": 2, "by": "m"}}):
        log.append({"id": item, **entry})


def test_fold_of_every_action_survives_reopening(tmp_path):
    log = ReviewLog(tmp_path / "log.jsonl")
    _actions(log)
    expected = {"status": "rejected", "reason": "wrong answer", "labels": ["easy"], "score": 4,
                "edits": {"1": "fixed"}, "suggestion": {"score": 2, "by": "m"}}
    state = log.state("a").to_json()
    assert {k: state[k] for k in expected} == expected and state["reviewed_at"]
    again = ReviewLog(tmp_path / "log.jsonl")
    assert again.state("a").to_json() == state and again.seq == 8
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["action"] for x in lines] == ["accept", "reject", "edit", "label", "label", "unlabel", "score", "suggest"]
    assert all(x["time"].endswith("Z") for x in lines)
    log.append({"id": "a", "action": "reset"})
    assert log.state("a").status == "pending" and log.state("a").reason is None
    assert log.state("never-seen") == ItemState()


def test_unknown_action_is_refused(tmp_path):
    log = ReviewLog(tmp_path / "log.jsonl")
    with pytest.raises(SftlabError, match="unknown review action 'approve'"):
        log.append({"id": "a", "action": "approve"})
    assert (tmp_path / "log.jsonl").read_text() == ""


def test_a_line_cut_short_by_a_kill_is_closed_and_skipped(tmp_path):
    path = tmp_path / "log.jsonl"
    log = ReviewLog(path)
    log.append({"id": "a", "action": "accept"})
    with open(path, "ab") as f:  # a hand-edited line, then a write cut short by a kill
        f.write(b'{"id": "a", "action": "edit", "message": 1}\n{"time": "2026-01-01T00:00:00Z", "id": "b", "act')
    reopened = ReviewLog(path)
    assert reopened.state("a").status == "accepted" and reopened.skipped == [2, 3]
    reopened.append({"id": "b", "action": "reject", "reason": "r"})
    final = ReviewLog(path)
    assert final.state("b").status == "rejected" and final.state("a").status == "accepted"
    assert final.skipped == [2, 3] and final.seq == 4 and final.state("a").edits == {}


def test_two_writers_on_one_log_see_each_other(tmp_path):
    """Two servers (or tabs of two servers) on the same dataset: neither loses the other's decisions."""
    one, two = ReviewLog(tmp_path / "log.jsonl"), ReviewLog(tmp_path / "log.jsonl")
    one.append({"id": "a", "action": "label", "label": "x"})
    two.append({"id": "a", "action": "label", "label": "y"})  # folds one's line before writing
    assert two.state("a").labels == ["x", "y"]
    assert one.changed_since(1) == set()
    one.refresh()
    assert one.state("a").labels == ["x", "y"] and one.changed_since(1) == {"a"} and one.seq == 2


def test_a_check_sees_the_other_writers_latest_state(tmp_path):
    """An edit based on stale text is refused even when the change came from another writer."""
    one, two = ReviewLog(tmp_path / "log.jsonl"), ReviewLog(tmp_path / "log.jsonl")
    one.append({"id": "a", "action": "edit", "message": 0, "content": "theirs"})

    def based_on_original(state: ItemState) -> None:
        if state.edits.get(0, "original") != "original":
            raise Conflict(state.edits[0])

    with pytest.raises(Conflict) as e:
        two.append({"id": "a", "action": "edit", "message": 0, "content": "mine"}, check=based_on_original)
    assert e.value.current == "theirs"
    assert ReviewLog(tmp_path / "log.jsonl").state("a").edits == {0: "theirs"}


def _write_many(path: str, who: str, n: int) -> None:
    log = ReviewLog(path)
    for k in range(n):
        log.append({"id": f"{who}{k % 7}", "action": "label", "label": f"{who}-{k}" + "x" * 3000})


def test_concurrent_processes_and_threads_lose_nothing(tmp_path):
    path = str(tmp_path / "log.jsonl")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(path, who, 60)) for who in "pq"]
    for p in procs:
        p.start()
    _write_many(path, "r", 60)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    log = ReviewLog(path)
    assert log.seq == 180 and not log.skipped
    for who in "pqr":
        labels = sorted(label for k in range(7) for label in log.state(f"{who}{k}").labels)
        assert labels == sorted(f"{who}-{k}" + "x" * 3000 for k in range(60))
