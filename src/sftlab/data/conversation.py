"""The one in-memory form of a training record, and its tokenized form."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sftlab.data.tools import call_text

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Conversation:
    """A chat (`messages`), in raw-text mode a plain `text`, or template-free `segments`.

    `segments` (Axolotl's `input_output` records) are texts written out in full, special tokens
    and all, each with whether it is trained: `[(text, trained), ...]`, rendered by concatenating
    them as written (no chat template). At most one of `text` and `segments` is set; a chat has neither.

    `source` is where the record came from (`path:line` / `path:row N`), kept so every
    later error or reject can name it. `meta` carries the record's other fields
    (e.g. `label`, `task`, `id`) untouched.
    """

    messages: list[dict[str, str]] = field(default_factory=list)
    source: str = "<memory>"
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    segments: list[tuple[str, bool]] | None = None

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        """The functions the conversation may call (a `tools` column), passed to the chat template."""
        return self.meta.get("tools")

    @property
    def is_raw_text(self) -> bool:
        return self.text is not None

    @property
    def is_segments(self) -> bool:
        """Template-free segments: trained where labelled, never split into blocks as raw text is."""
        return self.segments is not None

    @property
    def is_chat(self) -> bool:
        """Messages to render with a chat template (neither raw text nor segments)."""
        return self.text is None and self.segments is None

    @property
    def written_text(self) -> str | None:
        """The text as the record writes it, where it is not a chat: the raw text, or the segments
        concatenated (what dedup, reports and reviews read); None for a chat."""
        if self.segments is not None:
            return "".join(text for text, _ in self.segments)
        return self.text

    def prompt_messages(self) -> list[dict[str, str]]:
        """Messages before the last assistant turn: what a model is asked at evaluation."""
        last = max((i for i, m in enumerate(self.messages) if m["role"] == "assistant"), default=len(self.messages))
        return self.messages[:last]

    def reference(self) -> str | None:
        """The last assistant turn (the expected answer), if any: its content, and its tool calls."""
        for m in reversed(self.messages):
            if m["role"] == "assistant":
                return message_text(m)
        return None

    def to_json(self) -> dict[str, Any]:
        """Record form written by `sftlab data ...` commands (OpenAI messages schema; raw text as
        `text`, segments as `segments`, so that they read back as they were)."""
        out: dict[str, Any] = dict(self.meta)
        if self.segments is not None:
            out["segments"] = [{"label": trained, "text": text} for text, trained in self.segments]
        elif self.text is not None:
            out["text"] = self.text
        else:
            out["messages"] = [dict(m) for m in self.messages]
        return out


def message_text(message: dict[str, Any]) -> str:
    """A message's content, followed by its tool calls as one JSON line when it makes any: the text
    that tells two messages apart (duplicates, identical pairs)."""
    calls = message.get("tool_calls")
    if not calls:
        return message["content"]
    return f"{message['content']}\n{call_text(calls)}" if message["content"] else call_text(calls)


def jsonable(value: Any) -> Any:
    """`json.dumps(default=...)` for the values Parquet/Arrow columns hold and JSON lacks (a
    timestamp, a decimal, bytes), kept in a conversation's `meta` when it is written as JSONL."""
    import base64
    import datetime
    import decimal

    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (decimal.Decimal, datetime.timedelta)):
        return str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


class Example:
    """A rendered conversation: token ids and labels (-100 where not trained).

    Held as two int32 arrays (`ids`, `label_ids`) so that tens of thousands of examples cost
    no per-token Python objects: render fills them, and the render cache hands out views of
    its memory-mapped files. `input_ids` and `labels` read them as lists.
    """

    __slots__ = ("ids", "label_ids", "source", "truncated")

    def __init__(self, input_ids: Sequence[int], labels: Sequence[int], source: str = "<memory>",
                 truncated: bool = False):
        self.ids = np.asarray(input_ids, dtype=np.int32)
        self.label_ids = np.asarray(labels, dtype=np.int32)
        if self.ids.shape != self.label_ids.shape or self.ids.ndim != 1:
            raise ValueError(f"{source}: input_ids and labels must be equal-length sequences")
        self.source = source
        self.truncated = truncated

    @property
    def input_ids(self) -> list[int]:
        return self.ids.tolist()

    @property
    def labels(self) -> list[int]:
        return self.label_ids.tolist()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_trained(self) -> int:
        return int(np.count_nonzero(self.label_ids != -100))

    def __repr__(self) -> str:
        return f"Example({len(self)} tokens, {self.num_trained} trained, source={self.source!r})"
