"""Chatbot Arena battles (two models answer one user, a person votes) -> preference pairs.

Two layouts, as downloaded:
  conversations  lmsys/chatbot_arena_conversations, lmarena-ai/arena-human-preference-100k / -140k:
                 {"model_a", "model_b", "winner", "conversation_a": [{"role", "content"}, ...],
                 "conversation_b": [...], ...}; winner "model_a" | "model_b" | "tie" | "tie (bothbad)"
                 (the 140k's "both_bad"); content a string or text parts; a conversation may be a
                 JSON string (the 100k's Parquet columns).
  kaggle         the Kaggle competition's CSV (lmarena-ai/arena-human-preference-55k):
                 {"id", "model_a", "model_b", "prompt", "response_a", "response_b", "winner_model_a",
                 "winner_model_b", "winner_tie"}; prompt / response_* JSON lists of strings, one per
                 turn (null: the model gave no answer); winner_* 0 or 1 ("0" / "1" in a CSV file).

`arena_pair` rewrites a battle as a plain {"chosen", "rejected"} record for `from_preference`, which
checks it as any other pair. A tie prefers neither side: it is no pair (kind "tie").
"""

from __future__ import annotations

import json
from typing import Any

from sftlab.errors import RecordError

# Keys that make a record a battle, one tuple per layout (conversations, kaggle).
ARENA_KEYS = (("conversation_a", "conversation_b"), ("response_a", "response_b"))
WINNER_COLUMNS = ("winner_model_a", "winner_model_b", "winner_tie")
WINNERS = ("model_a", "model_b")
TIES = ("tie", "tie (bothbad)", "both_bad")
_PAIR_KEYS = frozenset({"chosen", "rejected", "preferred_output"})  # an ordinary pair wins over arena keys


def is_arena(record: dict) -> bool:
    return not _PAIR_KEYS & record.keys() and any(all(k in record for k in keys) for keys in ARENA_KEYS)


def arena_pair(record: dict, source: str) -> dict:
    """The battle as {"chosen", "rejected"} message lists beside its other fields (`winner` "model_a"
    or "model_b" in both layouts)."""
    sides_keys = next(keys for keys in ARENA_KEYS if all(k in record for k in keys))
    if sides_keys == ARENA_KEYS[0]:
        winner, used = _winner(record, source), sides_keys
        sides = [_conversation(record, key, source) for key in sides_keys]
    else:
        winner, used = _voted(record, source), ("prompt", *sides_keys, *WINNER_COLUMNS)
        sides = _kaggle_sides(record, source)
    chosen, rejected = _pair(*sides, winner, sides_keys, source)
    rest = {k: v for k, v in record.items() if k not in used}
    return {**rest, "winner": winner, "chosen": chosen, "rejected": rejected}


def _tie(value: Any, source: str) -> RecordError:
    return RecordError(source, "tie", f"the vote is {value!r}: neither answer is preferred, so the battle is no "
                                      "preference pair (arena files hold many ties: with --skip they are counted "
                                      "as rejects and the pairs kept)")


def _winner(record: dict, source: str) -> str:
    value = record.get("winner")
    if value is None:
        raise RecordError(source, "missing field", "'winner'")
    if value in WINNERS:
        return value
    if value in TIES:
        raise _tie(value, source)
    raise RecordError(source, "unknown winner", f"'winner' is {value!r}; expected one of "
                                                f"{', '.join(WINNERS + TIES)}")


def _flag(value: Any) -> int | None:
    """A 0/1 vote column: an int (Parquet, JSON), a bool, or "0"/"1" (a CSV cell); None for anything else."""
    if isinstance(value, str):
        value = value.strip()
        return int(value) if value in ("0", "1") else None
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return int(value)
    return None


def _voted(record: dict, source: str) -> str:
    """The Kaggle layout's winner: exactly one of its three 0/1 columns is 1."""
    flags = []
    for key in WINNER_COLUMNS:
        if record.get(key) is None:
            raise RecordError(source, "missing field", f"'{key}' (no vote: the competition's test split has none)")
        if (flag := _flag(record[key])) is None:
            raise RecordError(source, "unknown winner", f"'{key}' is {record[key]!r}, not 0 or 1")
        flags.append(flag)
    if flags == [0, 0, 1]:
        raise _tie("winner_tie", source)
    if flags in ([1, 0, 0], [0, 1, 0]):
        return WINNERS[flags.index(1)]
    raise RecordError(source, "unknown winner", f"{', '.join(WINNER_COLUMNS)} are {', '.join(map(str, flags))}: "
                                                "exactly one of them must be 1")


def _parsed(value: Any, key: str, source: str, what: str) -> list:
    """A list, or a JSON string of one (the Kaggle texts, the 100k's conversations)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordError(source, "mistyped field", f"'{key}' is text that is not JSON; expected {what}") from None
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else type(value).__name__
        raise RecordError(source, "mistyped field", f"'{key}' must be {what}, got {got}")
    return value


def _blank(content: Any) -> bool:
    return content is None or content == [] or (isinstance(content, str) and not content.strip())


def _conversation(record: dict, key: str, source: str) -> list[dict]:
    messages = _parsed(record[key], key, source, "a list of {role, content} messages")
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise RecordError(source, "mistyped field", f"'{key}' message {i} is not a {{role, content}} message")
        if _blank(m["content"]):
            model = f" ({key.replace('conversation', 'model')} gave no answer)" if m["role"] == "assistant" else ""
            raise RecordError(source, "empty content", f"'{key}' message {i} ({m['role']}) is empty or null{model}")
    return messages


def _kaggle_sides(record: dict, source: str) -> list[list[dict]]:
    """Both conversations, user and assistant turns alternating, from the per-turn lists."""
    if record.get("prompt") is None:
        raise RecordError(source, "missing field", "'prompt'")
    keys = ("prompt", *ARENA_KEYS[1])
    turns = [_parsed(record[k], k, source, "a JSON list of strings, one per turn") for k in keys]
    if len({len(t) for t in turns}) > 1:
        raise RecordError(source, "turn mismatch", ", ".join(f"'{k}' has {len(t)} turns" for k, t in zip(keys, turns)))
    for key, texts in zip(keys, turns):
        for n, text in enumerate(texts, 1):
            if text is not None and not isinstance(text, str):
                raise RecordError(source, "mistyped field", f"'{key}' turn {n} is {type(text).__name__}, not text")
            if _blank(text):
                who = "the user's message" if key == "prompt" else f"{key.replace('response', 'model')}'s answer"
                raise RecordError(source, "empty content", f"'{key}' turn {n} is {'null' if text is None else 'empty'} "
                                                           f"({who} is missing)")
    return [[m for q, a in zip(turns[0], answers) for m in ({"role": "user", "content": q},
                                                            {"role": "assistant", "content": a})]
            for answers in turns[1:]]


def _text(content: Any) -> Any:
    """Content to compare: a string, or the text of its parts."""
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict)).strip()
    return content.strip() if isinstance(content, str) else content


def _pair(side_a: list[dict], side_b: list[dict], winner: str, keys: tuple[str, str], source: str
          ) -> tuple[list[dict], list[dict]]:
    """(chosen, rejected): both sides have the same user turns and end with the answers voted on. A pair
    shares everything before the answers it compares (DPO and ORPO score two answers to one prompt); in
    a multi-turn battle the models' earlier answers differ too, and the vote judged each whole
    conversation, so it is no pair (kind "multi-turn battle": the loser's last answer put after the
    winner's earlier ones would be an answer to a conversation it never saw)."""
    if len(side_a) != len(side_b):
        raise RecordError(source, "turn mismatch", f"'{keys[0]}' has {len(side_a)} messages, '{keys[1]}' {len(side_b)}")
    for i, (a, b) in enumerate(zip(side_a, side_b), 1):
        if a["role"] != b["role"]:
            raise RecordError(source, "turn mismatch", f"message {i} is {a['role']} in '{keys[0]}', {b['role']} in "
                                                       f"'{keys[1]}'")
        if a["role"] != "assistant" and _text(a["content"]) != _text(b["content"]):
            raise RecordError(source, "prompt mismatch", f"message {i} ({a['role']}) differs between '{keys[0]}' and "
                                                         f"'{keys[1]}': not one battle")
    if side_a[-1]["role"] != "assistant":
        raise RecordError(source, "empty side", f"'{keys[0]}' and '{keys[1]}' end with a {side_a[-1]['role']} "
                                                "message, not the answers voted on")
    earlier = [i for i, (a, b) in enumerate(zip(side_a[:-1], side_b[:-1]), 1)
               if a["role"] == "assistant" and _text(a["content"]) != _text(b["content"])]
    if earlier:
        raise RecordError(source, "multi-turn battle", f"the models' answers already differ at message {earlier[0]} "
                                                       f"of {len(side_a)}: the vote judged two whole conversations, "
                                                       "not two answers to one prompt (with --skip such battles are "
                                                       "counted as rejects and the single-turn ones kept)")
    return (side_a, side_b) if winner == WINNERS[0] else (side_b, side_a)
