"""The review log: an append-only JSONL file, one line per action, with its time.

Nothing is ever rewritten: the review state of every example is the fold of the log's
lines in order (`ItemState.apply`). An action is appended in one `write` under an
exclusive `flock`, after folding whatever other writers (another tab's server, another
process) appended since this reader last looked, so two writers never lose each other's
actions, and a killed server loses at most the action it was writing (a line cut short is
closed with a newline on the next open and skipped when read).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from sftlab.errors import SftlabError

ACTIONS = ("accept", "reject", "reset", "edit", "label", "unlabel", "score", "suggest")
STATUSES = ("pending", "accepted", "rejected")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class ItemState:
    """One example's review state: the fold of its log lines."""

    status: str = "pending"
    reason: str | None = None
    labels: list[str] = field(default_factory=list)
    score: int | None = None
    edits: dict[int, str] = field(default_factory=dict)  # message index -> text
    suggestion: dict[str, Any] | None = None
    reviewed_at: str | None = None  # time of the last accept/reject

    def apply(self, entry: dict[str, Any]) -> None:
        action = entry["action"]
        if action == "suggest":
            self.suggestion = entry.get("suggestion")
        elif action in ("accept", "reject"):
            self.reviewed_at = entry["time"]
            self.status = "accepted" if action == "accept" else "rejected"
            self.reason = entry.get("reason") if action == "reject" else None
        elif action == "reset":
            self.status, self.reason, self.reviewed_at = "pending", None, None
        elif action == "edit":
            self.edits[int(entry["message"])] = entry["content"]
        elif action == "label":
            if entry["label"] not in self.labels:
                self.labels.append(entry["label"])
        elif action == "unlabel":
            if entry["label"] in self.labels:
                self.labels.remove(entry["label"])
        elif action == "score":
            self.score = entry.get("score")

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "labels": list(self.labels), "score": self.score,
                "edits": {str(k): v for k, v in self.edits.items()}, "suggestion": self.suggestion,
                "reviewed_at": self.reviewed_at}


class ReviewLog:
    """Review state of a dataset's examples, kept in `path` (JSONL, append-only).

    `states` maps example id -> ItemState; `seq` counts the lines folded so far, and
    `changed_since(seq)` names the ids touched after a given point (for the page's polling).
    """

    def __init__(self, path: str | Path, *, read_only: bool = False):
        """`read_only`: only read (as `sftlab data report` does): no folder or file is made, no
        unfinished line closed, and `append` refuses."""
        self.path = Path(path)
        self.read_only = read_only
        self.states: dict[str, ItemState] = {}
        self.seq = 0
        self.skipped: list[int] = []  # line numbers that could not be read (a write cut short)
        self._ids: list[str] = []  # id of each folded line, in order
        self._offset = 0
        self._lock = threading.Lock()
        if read_only:
            self.refresh()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(fcntl.LOCK_EX) as fh:
            size = fh.seek(0, os.SEEK_END)
            if size:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")  # close a line a killed writer left unfinished
            self._read_new(fh)

    @contextmanager
    def _locked(self, mode: int) -> Iterator[BinaryIO]:
        """The log file, held under this process's lock and a `flock` (shared or exclusive)."""
        with self._lock, open(self.path, "rb" if self.read_only else "a+b") as fh:
            fcntl.flock(fh, mode)
            try:
                yield fh
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read_new(self, fh) -> None:
        fh.seek(self._offset)
        data = fh.read()
        end = data.rfind(b"\n") + 1  # only whole lines; a partial one is read once it is finished
        for raw in data[:end].splitlines():
            self.seq += 1
            try:
                entry = json.loads(raw)
                if entry.get("action") not in ACTIONS or not isinstance(entry.get("id"), str):
                    raise ValueError("not a review action")
                self.states.setdefault(entry["id"], ItemState()).apply(entry)
            except (ValueError, KeyError, TypeError, AttributeError):  # cut short, or edited by hand
                self.skipped.append(self.seq)
                self._ids.append("")
                continue
            self._ids.append(entry["id"])
        self._offset += end

    def refresh(self) -> None:
        """Fold lines other writers appended."""
        with self._locked(fcntl.LOCK_SH) as fh:
            self._read_new(fh)

    def append(self, entry: dict[str, Any], check: Callable[[ItemState], None] | None = None) -> ItemState:
        """Append one action (time added) and return the example's new state.

        `check(state)` runs on the up-to-date state under the lock, before writing; it may raise
        to refuse the action (e.g. an edit based on text another tab has changed since).
        """
        if self.read_only:
            raise SftlabError(f"{self.path} is open read-only")
        if entry.get("action") not in ACTIONS:
            raise SftlabError(f"unknown review action {entry.get('action')!r}; known: {', '.join(ACTIONS)}")
        entry = {"time": now(), **entry}
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        with self._locked(fcntl.LOCK_EX) as fh:
            self._read_new(fh)
            state = self.states.get(entry["id"], ItemState())
            if check is not None:
                check(state)
            fh.seek(0, os.SEEK_END)
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
            self._read_new(fh)
        return self.states[entry["id"]]

    def state(self, item_id: str) -> ItemState:
        return self.states.get(item_id) or ItemState()

    def changed_since(self, seq: int) -> set[str]:
        return {i for i in self._ids[max(seq, 0):] if i}
