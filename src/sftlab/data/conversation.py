"""The one in-memory form of a training record, and its tokenized form."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Conversation:
    """A chat (`messages`) or, in raw-text mode, a plain `text`.

    `source` is where the record came from (`path:line` / `path:row N`), kept so every
    later error or reject can name it. `meta` carries the record's other fields
    (e.g. `label`, `task`, `id`) untouched.
    """

    messages: list[dict[str, str]] = field(default_factory=list)
    source: str = "<memory>"
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_raw_text(self) -> bool:
        return self.text is not None

    def prompt_messages(self) -> list[dict[str, str]]:
        """Messages before the last assistant turn: what a model is asked at evaluation."""
        last = max((i for i, m in enumerate(self.messages) if m["role"] == "assistant"), default=len(self.messages))
        return self.messages[:last]

    def reference(self) -> str | None:
        """Content of the last assistant turn (the expected answer), if any."""
        for m in reversed(self.messages):
            if m["role"] == "assistant":
                return m["content"]
        return None

    def to_json(self) -> dict[str, Any]:
        """Record form written by `sftlab data ...` commands (OpenAI messages schema)."""
        out: dict[str, Any] = dict(self.meta)
        if self.text is not None:
            out["text"] = self.text
        else:
            out["messages"] = [dict(m) for m in self.messages]
        return out


@dataclass
class Example:
    """A rendered conversation: token ids and labels (-100 where not trained)."""

    input_ids: list[int]
    labels: list[int]
    source: str = "<memory>"
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != -100)
