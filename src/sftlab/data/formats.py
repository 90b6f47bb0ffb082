"""Input schemas -> `Conversation`: one small function per schema, chosen by detection or by name.

Supported schemas (the `format` names):
  alpaca             {"instruction", "input"?, "output", "system"?}
  sharegpt           {"conversations" | "messages": [{"from", "value"}]}  (human/gpt/system/... roles)
  messages           {"messages": [{"role", "content"}]}  (OpenAI; content may be a list of text parts)
  prompt_completion  {"prompt","completion"} | {"prompt","response"} | {"question","answer"} | {"input","output"}
                     (prompt/completion may also be message lists, as in TRL's conversational form)
  text               {"text"}  -> raw text (continued pre-training)
  preference         paired: {"prompt"?, "chosen", "rejected"}, {"messages", "rejected"}, or ShareGPT
                     pairs {"conversations", "chosen": {"from", "value"}, "rejected": {...}}; each side
                     is a string (the answer), one message, or a message list (the answer, or the whole
                     conversation with its prompt). The chosen conversation becomes `messages`; the
                     rejected one (full message list, prompt included) goes to `meta["rejected"]`.
                     The prompt must be the same on both sides, and the answers must differ.
                     unpaired (KTO): {"prompt", "completion", "label": true|false} -> `messages`
                     and `meta["label"]` (a bool).
Fields a schema does not use are kept in `meta` (e.g. `label`, `task`, `id`).
Every problem raises `RecordError` (a `DataError`) naming the record's source and a `kind`
(a short category that reject summaries count by).
"""

from __future__ import annotations

from typing import Any, Callable

from sftlab.data.conversation import ROLES, Conversation
from sftlab.errors import DataError, SftlabError


class RecordError(DataError):
    """A bad record. `kind` is a short category ("unknown role", "empty content", ...)."""

    def __init__(self, source: str, kind: str, detail: str = ""):
        self.kind = kind
        super().__init__(source, f"{kind}: {detail}" if detail else kind)


# sharegpt `from` values (lower-cased) -> Conversation roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}

# OpenAI `role` values -> Conversation roles ("developer" is OpenAI's newer name for system).
OPENAI_ROLES = {**{r: r for r in ROLES}, "developer": "system", "function": "tool"}

# (prompt key, answer key) pairs recognised as prompt/completion, in detection order.
PROMPT_PAIRS = (("prompt", "completion"), ("prompt", "response"), ("question", "answer"), ("input", "output"))


def _string(record: dict, key: str, source: str, *, required: bool = True) -> str | None:
    if key not in record or record[key] is None:
        if required:
            raise RecordError(source, "missing field", f"'{key}'")
        return None
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(source, "mistyped field", f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _meta(record: dict, used: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in used}


def _content(value: Any, source: str, index: int) -> str:
    """Message content: a string, or OpenAI-style parts [{"type": "text", "text": ...}]."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        texts = [p.get("text") for p in value]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    if not isinstance(value, str):
        raise RecordError(source, "non-string content", f"message {index + 1} content is {type(value).__name__}")
    return value


def _message_list(value: Any, source: str, role_key: str, content_key: str, role_map: dict[str, str] | None,
                  field: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RecordError(source, "mistyped field", f"'{field}' must be a list of messages, got {type(value).__name__}")
    known = role_map or OPENAI_ROLES
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordError(source, "mistyped field", f"'{field}' message {i + 1} is {type(m).__name__}, expected an object")
        if role_key not in m:
            raise RecordError(source, "missing field", f"'{field}' message {i + 1} has no '{role_key}'")
        if content_key not in m:
            raise RecordError(source, "missing field", f"'{field}' message {i + 1} has no '{content_key}'")
        raw_role = m[role_key]
        role = known.get(raw_role.lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise RecordError(source, "unknown role",
                              f"{raw_role!r} in message {i + 1} (expected one of {', '.join(known)})")
        messages.append({"role": role, "content": _content(m[content_key], source, i)})
    return messages


def _as_messages(value: Any, source: str, default_role: str, field: str) -> list[dict[str, str]]:
    """A string (one message of `default_role`) or a list of {role, content} messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    return _message_list(value, source, "role", "content", None, field)


def check_messages(messages: list[dict[str, str]], source: str) -> None:
    """Roles in a trainable order, non-empty contents, at least one assistant turn.

    Order: an optional system message first, then user/assistant alternating starting
    with user; tool messages may only follow an assistant (or another tool) message and
    must be followed by an assistant message or end the conversation.
    """
    if not messages:
        raise RecordError(source, "no messages")
    prev = None
    for i, m in enumerate(messages):
        role, n = m["role"], i + 1
        if not m["content"].strip():
            raise RecordError(source, "empty content", f"message {n} ({role}) is empty or whitespace")
        if role == "system" and i > 0:
            raise RecordError(source, "roles out of order", f"system message {n} is not first")
        if role == "assistant" and prev in (None, "system"):
            raise RecordError(source, "roles out of order", f"assistant message {n} comes before any user message")
        if role == prev and role in ("user", "assistant"):
            raise RecordError(source, "roles out of order", f"two {role} messages in a row (messages {i} and {n})")
        if role == "tool" and prev not in ("assistant", "tool"):
            raise RecordError(source, "roles out of order", f"tool message {n} does not follow an assistant message")
        if role == "user" and prev == "tool":
            raise RecordError(source, "roles out of order", f"user message {n} follows a tool message")
        prev = role
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(source, "no assistant turn")


def _chat(messages: list[dict[str, str]], source: str, meta: dict[str, Any]) -> Conversation:
    check_messages(messages, source)
    return Conversation(messages=messages, source=source, meta=meta)


def from_alpaca(record: dict, source: str) -> Conversation:
    instruction = _string(record, "instruction", source)
    extra = _string(record, "input", source, required=False)
    output = _string(record, "output", source)
    system = _string(record, "system", source, required=False)
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": output},
    ]
    return _chat(messages, source, _meta(record, ("instruction", "input", "output", "system")))


def from_sharegpt(record: dict, source: str) -> Conversation:
    key = "conversations" if "conversations" in record else "messages"
    if key not in record:
        raise RecordError(source, "missing field", "'conversations'")
    messages = _message_list(record[key], source, "from", "value", SHAREGPT_ROLES, key)
    return _chat(messages, source, _meta(record, (key,)))


def from_messages(record: dict, source: str) -> Conversation:
    if "messages" not in record:
        raise RecordError(source, "missing field", "'messages'")
    messages = _message_list(record["messages"], source, "role", "content", None, "messages")
    return _chat(messages, source, _meta(record, ("messages",)))


def _prompt_pair(record: dict) -> tuple[str, str] | None:
    return next(((p, a) for p, a in PROMPT_PAIRS if p in record and a in record), None)


def from_prompt_completion(record: dict, source: str) -> Conversation:
    pair = _prompt_pair(record)
    if pair is None:
        expected = " | ".join(f"{p}/{a}" for p, a in PROMPT_PAIRS)
        raise RecordError(source, "missing field", f"expected one of {expected}")
    p, a = pair
    messages = _as_messages(record[p], source, "user", p) + _as_messages(record[a], source, "assistant", a)
    return _chat(messages, source, _meta(record, pair))


def from_text(record: dict, source: str) -> Conversation:
    text = _string(record, "text", source)
    if not text.strip():
        raise RecordError(source, "empty content", "'text' is empty or whitespace")
    return Conversation(source=source, text=text, meta=_meta(record, ("text",)))


def _side(value: Any, source: str, field: str) -> list[dict[str, str]]:
    """One side of a pair: an answer string, one message object, or a message list
    ({role, content} or ShareGPT {from, value})."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
        return _message_list(value, source, "from", "value", SHAREGPT_ROLES, field)
    return _as_messages(value, source, "assistant", field)


def _answer_start(messages: list[dict[str, str]]) -> int:
    """Index of the last assistant message (len(messages) when there is none)."""
    return max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))


def _shared_prompt(record: dict, source: str) -> list[dict[str, str]] | None:
    if "prompt" in record:
        return _as_messages(record["prompt"], source, "user", "prompt")
    if "conversations" in record:
        return _message_list(record["conversations"], source, "from", "value", SHAREGPT_ROLES, "conversations")
    return None


def _with_prompt(side: list[dict[str, str]], prompt: list[dict[str, str]] | None, source: str,
                 field: str) -> list[dict[str, str]]:
    """A side that holds only the answer gets the shared prompt in front of it."""
    if not any(m["role"] == "assistant" for m in side):
        raise RecordError(source, "empty side", f"'{field}' holds no assistant answer")
    if any(m["role"] != "assistant" for m in side):  # a whole conversation, prompt included
        return side
    if prompt is None:
        raise RecordError(source, "missing prompt", f"'{field}' is only an answer and the record has no 'prompt'")
    return prompt + side


def from_preference(record: dict, source: str) -> Conversation:
    if "completion" in record and "label" in record and "chosen" not in record:
        return _from_unpaired(record, source)
    chosen_key = "chosen" if "chosen" in record else "messages"
    for key in (chosen_key, "rejected"):
        if key not in record:
            raise RecordError(source, "missing field", f"'{key}'")
    prompt = _shared_prompt(record, source)
    chosen_side = _side(record[chosen_key], source, chosen_key)
    rejected_side = _side(record["rejected"], source, "rejected")
    if prompt is None:  # {"messages", "rejected": answer}: the prompt comes from the whole conversation
        whole = next((s for s in (chosen_side, rejected_side) if any(m["role"] != "assistant" for m in s)), None)
        prompt = whole[:_answer_start(whole)] if whole else None
    chosen = _with_prompt(chosen_side, prompt, source, chosen_key)
    rejected = _with_prompt(rejected_side, prompt, source, "rejected")
    check_messages(chosen, source)
    check_messages(rejected, source)
    for side, key in ((chosen, chosen_key), (rejected, "rejected")):
        if side[-1]["role"] != "assistant":
            raise RecordError(source, "empty side", f"'{key}' does not end with an assistant answer")
    c_cut, r_cut = _answer_start(chosen), _answer_start(rejected)
    if chosen[:c_cut] != rejected[:r_cut]:
        raise RecordError(source, "prompt mismatch", "chosen and rejected continue different prompts")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise RecordError(source, "identical pair", "chosen and rejected answers are the same")
    meta = _meta(record, ("prompt", "conversations", chosen_key, "rejected"))
    meta["rejected"] = rejected
    return Conversation(messages=chosen, source=source, meta=meta)


def _from_unpaired(record: dict, source: str) -> Conversation:
    """KTO's unpaired form: one answer and whether it is desirable."""
    label = record["label"]
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        raise RecordError(source, "mistyped field", f"'label' must be true or false, got {label!r}")
    if "prompt" not in record:
        raise RecordError(source, "missing prompt", "an unpaired record needs a 'prompt'")
    messages = _as_messages(record["prompt"], source, "user", "prompt")
    messages = _with_prompt(_side(record["completion"], source, "completion"), messages, source, "completion")
    conv = _chat(messages, source, _meta(record, ("prompt", "completion", "label")))
    conv.meta["label"] = label
    return conv


Converter = Callable[[dict, str], Conversation]

FORMATS: dict[str, Converter] = {
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "messages": from_messages,
    "prompt_completion": from_prompt_completion,
    "text": from_text,
    "preference": from_preference,
}


def _messages_key_format(record: dict) -> str:
    first = next(iter(record["messages"]), None) if isinstance(record["messages"], list) else None
    return "sharegpt" if isinstance(first, dict) and "from" in first else "messages"


# Detection rules, first match wins: (format, keys that must all be present) or a function.
_DETECT: tuple[tuple[tuple[str, ...], Callable[[dict], str]], ...] = (
    (("chosen", "rejected"), lambda r: "preference"),
    (("prompt", "completion", "label"), lambda r: "preference" if isinstance(r["label"], bool) else "prompt_completion"),
    (("messages", "rejected"), lambda r: "preference"),
    (("conversations",), lambda r: "sharegpt"),
    (("messages",), _messages_key_format),
    (("instruction", "output"), lambda r: "alpaca"),
    *(((p, a), lambda r: "prompt_completion") for p, a in PROMPT_PAIRS),
    (("text",), lambda r: "text"),
)


def detect_format(record: dict, source: str = "<record>") -> str:
    """The schema name of a record, by its keys."""
    for keys, pick in _DETECT:
        if all(k in record for k in keys):
            return pick(record)
    raise RecordError(source, "unknown schema",
                      f"keys {sorted(record)[:8]} match no format ({', '.join(FORMATS)})")


def check_format_name(format: str | None) -> None:
    if format is not None and format not in FORMATS:
        import difflib

        close = difflib.get_close_matches(format, FORMATS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise SftlabError(f"unknown data format '{format}'; known: {', '.join(FORMATS)}.{hint}")


def to_conversation(record: Any, source: str, format: str | None = None) -> Conversation:
    """Convert one raw record; `format` (a key of FORMATS) overrides detection."""
    if not isinstance(record, dict):
        raise RecordError(source, "not an object", f"record is a JSON {type(record).__name__}, expected an object")
    check_format_name(format)
    return FORMATS[format or detect_format(record, source)](record, source)
