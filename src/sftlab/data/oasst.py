"""OpenAssistant message trees (oasst1, oasst2 as published: one message per row) -> conversations.

A row is {message_id, parent_id, role: prompter | assistant, text, rank, deleted, review_result,
message_tree_id, lang, ...}. Each tree becomes one conversation, its "top-1" path: from the root
prompt, at each step the best-ranked reply (rank 0 first; unranked replies after the ranked ones,
in file order), ending at the last assistant message on that path. Deleted messages and those
that failed review are left out with everything below them. The conversation is named by the
line of its last message, and keeps the tree's id and language.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

MESSAGE_ROW = frozenset({"message_id", "role", "text"})


def is_message_row(record: Any) -> bool:
    """A message of a tree: its id, role and text, and its parent or tree (a root's null parent_id is
    no cell at all in a Parquet row as sftlab reads it)."""
    return isinstance(record, dict) and MESSAGE_ROW <= record.keys() and bool(
        {"parent_id", "message_tree_id"} & record.keys())


def _kept(row: dict) -> bool:
    return not row.get("deleted") and row.get("review_result") is not False


def _rank(row: dict) -> tuple[bool, float]:
    rank = row.get("rank")
    return rank is None, rank if isinstance(rank, (int, float)) else 0


def conversations_from_trees(rows: Iterable[tuple[str, dict]]) -> Iterator[tuple[str, dict]]:
    """(source, record) of each tree's top-1 conversation, in the order the trees' roots appear."""
    rows_by_id: dict[Any, tuple[str, dict]] = {}
    children: dict[Any, list[Any]] = {}
    roots: list[Any] = []
    for source, row in rows:
        if not _kept(row):
            continue
        rows_by_id[row["message_id"]] = (source, row)
        if row.get("parent_id") is None:
            roots.append(row["message_id"])
        else:
            children.setdefault(row["parent_id"], []).append(row["message_id"])
    for root in roots:
        path = [root]
        while replies := [m for m in children.get(path[-1], ()) if m in rows_by_id]:
            path.append(min(replies, key=lambda m: _rank(rows_by_id[m][1])))
        last = max((k for k, m in enumerate(path) if rows_by_id[m][1]["role"] == "assistant"), default=0)
        messages = [{"role": "user" if rows_by_id[m][1]["role"] == "prompter" else rows_by_id[m][1]["role"],
                     "content": rows_by_id[m][1]["text"]} for m in path[: last + 1]]
        first = rows_by_id[root][1]
        record = {"messages": messages} | {k: first[k] for k in ("message_tree_id", "lang") if k in first}
        yield rows_by_id[path[last]][0], record
