"""Input schemas -> `Conversation`: one small function per schema, chosen by detection or by name.

Supported schemas (the `format` names):
  alpaca             {"instruction", "input"?, "output", "system"?, "history"?}  (Alpaca, Alpaca-GPT4, CodeAlpaca,
                     ...; LLaMA-Factory's "history": earlier [question, answer] pairs)
  dolly              {"instruction", "context"?, "response"}  (Databricks Dolly-15k; `category` goes to meta)
  squad              {"question", "context", "answers": {"text": [...]}}  (SQuAD-style reading comprehension;
                     trains on the first answer, keeps all as meta "references")
  sharegpt           {"conversations" | "messages" | "conversation": [{"from", "value"}]}  (human/gpt/... roles)
  messages           {"messages" | "conversations" | "conversation": [{"role", "content"}]}  (OpenAI; LMSYS-Chat-1M
                     and WildChat's "conversation"; Capybara's [{"input", "output"}] exchanges; content and
                     a "system" column may be lists of text parts (OpenAI's, Amazon Bedrock's / Nova's); an
                     assistant message's reasoning as "reasoning_content", "reasoning" or "thinking", and
                     OpenAI's "weight": 0 leaves it untrained)
  prompt_completion  {"prompt","completion"} | {"prompt","response"} | {"question","answer"} | {"question","response"}
                     | {"query","response"} | {"problem","solution"} | {"inputs","targets"} | {"input","output"},
                     with an optional "system" or "system_prompt" (OpenOrca); prompt/completion may also
                     be message lists, as in TRL's conversational form
  text               {"text"}  -> raw text (continued pre-training)
  segments           {"segments": [{"label": true|false, "text"}, ...]}  (Axolotl's template-free `input_output`):
                     the texts concatenated as written, no chat template (the text writes any special tokens,
                     e.g. "<|im_start|>", "</s>"); only label-true segments are trained
  (tool calling)     any chat schema above with `tools` and assistant `tool_calls` (see data/tools.py)
  xlam               {"query", "answers", "tools"}  (Salesforce xLAM function calling: the answers are calls)
  gemini             {"contents": [{"role": "user" | "model", "parts": [...]}], "systemInstruction"?, "tools"?}
                     (Vertex AI's Gemini tuning JSONL; function calls and thoughts too: data/gemini.py)
  multiple_choice    benchmarks' native layouts (CHOICE_LAYOUTS): MMLU {"question", "choices": [...], "answer"},
                     ARC {"question", "choices": {"text", "label"}, "answerKey"}, OpenBookQA, HellaSwag
                     {"ctx", "endings", "label"}, PIQA {"goal", "sol1", "sol2", "label"}, WinoGrande
                     {"sentence", "option1", "option2", "answer": "1"|"2"}, Social IQa {"context", "question",
                     "answerA".."answerC", "label": "1".."3"}, MedMCQA {"question", "opa".."opd", "cop"},
                     RACE {"article", "question", "options", "answer": letter}, MMLU-Pro {"question", "options",
                     "answer_index"}, TruthfulQA {"question", "mc1_targets": {"choices", "labels"}}, SciQ
                     {"question", "correct_answer", "distractor1".."3", "support"?}, GPQA's CSV {"Question",
                     "Correct Answer", "Incorrect Answer 1".."3"}, BoolQ {"question", "passage", "answer":
                     true|false} (options yes / no) -> the passage (if any), the question with lettered options,
                     answered by the right option's text; meta "choices" (as shown) and "answer" (index).
                     Where the right option comes first as written (SciQ, GPQA, TruthfulQA) the options are
                     ordered by a hash of the record. An unlabelled row (answer "", -1 or absent) is "no answer"
  preference         paired: {"prompt"?, "chosen", "rejected"} (the prompt also as "question",
                     "instruction" (+ "input"?, "history"?, as Alpaca's) or "input", with an optional
                     "system" or "system_prompt": orca_dpo_pairs),
                     {"messages", "rejected"}, OpenAI's {"input": {"messages", "tools"?},
                     "preferred_output", "non_preferred_output"}, or ShareGPT
                     pairs {"conversations", "chosen": {"from", "value"}, "rejected": {...}}; each side
                     is a string (the answer), one message, or a message list (the answer, or the whole
                     conversation with its prompt). The chosen conversation becomes `messages`; the
                     rejected one (full message list, prompt included) goes to `meta["rejected"]`.
                     The prompt must be the same on both sides, and the answers must differ.
                     HH-RLHF's whole transcripts ("\n\nHuman: ...\n\nAssistant: ..." strings, no
                     prompt) are split into turns.
                     Chatbot Arena battles (data/arena.py): {"model_a", "model_b", "winner": "model_a" |
                     "model_b" | "tie" | "tie (bothbad)", "conversation_a": [{"role", "content"}...],
                     "conversation_b": [...]} (lmsys/chatbot_arena_conversations, arena-human-preference-
                     100k / -140k), and Kaggle's CSV (arena-human-preference-55k): {"prompt", "response_a",
                     "response_b"} (JSON lists of strings, one per turn) + "winner_model_a" / "winner_model_b"
                     / "winner_tie" (0/1). The winner's conversation is chosen, the loser's rejected;
                     a tie, or a multi-turn battle whose earlier answers differ, is no pair (a reject).
                     unpaired (KTO): {"prompt", "completion", "label": true|false} -> `messages`
                     and `meta["label"]` (a bool; "true"/"false" strings, as CSV files hold them, too);
                     any chat record with LLaMA-Factory's "kto_tag" (true/false) too.
Any other layout is read through a column mapping (`Columns`: `data.columns` in a config,
`--columns prompt=question,response=answer` on the data commands), passed where a format name goes.
Fields a schema does not use are kept in `meta` (e.g. `label`, `task`, `id`).
Every problem raises `RecordError` (a `DataError`) naming the record's source and a `kind`
(a short category that reject summaries count by).
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import partial
from typing import Any, Callable, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sftlab.data.arena import ARENA_KEYS, arena_pair, is_arena
from sftlab.data.conversation import ROLES, Conversation, message_text
from sftlab.data.gemini import gemini_parts
from sftlab.data.oasst import is_message_row
from sftlab.data.tools import as_json_schema, call_list, tool_calls, tool_list
from sftlab.errors import RecordError, SftlabError


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

# `role` values (any case) -> Conversation roles ("developer" is OpenAI's newer name for system;
# "prompter" is OpenAssistant's name for the user; "model" Gemma's and Gemini's for the assistant,
# "chatbot" Cohere's, whose fine-tuning files write System / User / Chatbot).
OPENAI_ROLES = {**{r: r for r in ROLES}, "developer": "system", "function": "tool", "prompter": "user",
                "model": "assistant", "chatbot": "assistant"}

# (prompt key, answer key) pairs recognised as prompt/completion, in detection order.
PROMPT_PAIRS = (("prompt", "completion"), ("prompt", "response"), ("question", "answer"), ("question", "response"),
                ("query", "response"), ("problem", "solution"), ("inputs", "targets"), ("input", "output"))
# Keys of an assistant message's reasoning trace: DeepSeek's and Qwen's API, vLLM and most distilled
# sets write `reasoning_content`; OpenRouter and Gemma 4's template `reasoning`; gpt-oss `thinking`.
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
# Optional system-prompt keys of prompt/completion records (OpenOrca writes `system_prompt`).
SYSTEM_KEYS = ("system", "system_prompt")


def _string(record: dict, key: str, source: str, *, required: bool = True) -> str | None:
    if key not in record or record[key] is None:
        if required:
            raise _missing(record, key, source)
        return None
    value = record[key]
    if isinstance(value, list) and value and all(isinstance(p, dict) for p in value):  # Bedrock's system: [{"text"}]
        return _text_parts(value, source, f"'{key}'")
    if not isinstance(value, str):
        raise RecordError(source, "mistyped field", f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _missing(record: dict, key: str, source: str) -> RecordError:
    """A missing field, naming the fields the record has where it lacks the key (a mistyped mapping)."""
    has = f" (the record has: {', '.join(map(str, record))})" if key not in record else ""
    return RecordError(source, "missing field", f"'{key}'{has}")


def _meta(record: dict, used: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in used}


def _content(value: Any, source: str, index: int) -> str:
    """Message content: a string, or text parts: OpenAI's [{"type": "text", "text": ...}] or Amazon
    Bedrock's / Nova's [{"text": ...}]. Any other part (an image, a document) is a bad record naming it."""
    if isinstance(value, list):
        return _text_parts(value, source, f"message {index + 1} content")
    if not isinstance(value, str):
        raise RecordError(source, "non-string content", f"message {index + 1} content is {type(value).__name__}")
    return value


def _text_parts(parts: list, source: str, where: str) -> str:
    for k, part in enumerate(parts, 1):
        kind = part.get("type", next(iter(part), "empty")) \
            if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RecordError(source, "non-string content", f"{where} part {k} is {kind!r}: only text parts are read")
    return "".join(part["text"] for part in parts)


def _listed(value: Any) -> Any:
    """A message list kept as a JSON string (a Parquet or Arrow column of strings) as the list."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _message_list(value: Any, source: str, role_key: str, content_key: str, role_map: dict[str, str] | None,
                  field: str) -> list[dict[str, str]]:
    value = _listed(value)
    if not isinstance(value, list):
        raise RecordError(source, "mistyped field", f"'{field}' must be a list of messages, got {type(value).__name__}")
    known = role_map or OPENAI_ROLES
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordError(source, "mistyped field", f"'{field}' message {i + 1} is {type(m).__name__}, expected an object")
        if role_key not in m:
            raise RecordError(source, "missing field", f"'{field}' message {i + 1} has no '{role_key}'")
        raw_role = m[role_key]
        where = f"'{field}' message {i + 1}"
        if role_key == "from" and raw_role == "function_call":  # ShareGPT's tool-call turn
            _add_calls(messages, call_list(m.get(content_key), source, where))
            continue
        calls = tool_calls(m, source, where)
        if content_key not in m and not calls:
            raise RecordError(source, "missing field", f"{where} has no '{content_key}'")
        if m[content_key] is None and not calls:
            raise RecordError(source, "empty content", f"{where} has no content and no tool calls")
        role = known.get(raw_role.lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise RecordError(source, "unknown role",
                              f"{raw_role!r} in message {i + 1} (expected one of {', '.join(known)})")
        if calls and role != "assistant":
            raise RecordError(source, "malformed tool call", f"{where} is a {role} message with tool calls")
        content = m.get(content_key)
        message = {"role": role, "content": "" if content is None and calls else _content(content, source, i)}
        if role == "tool":  # which call a result answers, where the data says (some templates write it)
            message |= {k: m[k] for k in ("name", "tool_call_id") if isinstance(m.get(k), str)}
        if calls:
            message["tool_calls"] = calls
        if role == "assistant" and (reasoning := _reasoning(m, source, where)):
            message["reasoning_content"] = reasoning
        if _weight(m.get("weight"), source, where, role) == 0 and role == "assistant":
            message["weight"] = 0
        messages.append(message)
    return messages


def _weight(value: Any, source: str, where: str, role: str) -> int | None:
    """A message's fine-tuning `weight` (OpenAI's, also in ShareGPT sets such as OpenHermes 2.5): 0
    leaves an assistant turn untrained (context only), 1 trains it; null is no weight. Other turns
    are never trained: 0 says so, 1 asks what sftlab does not do."""
    if value is None:
        return None
    if isinstance(value, bool) or value not in (0, 1):
        raise RecordError(source, "mistyped field", f"{where}'s 'weight' is {value!r}; it is 0 (not trained) or 1")
    if role != "assistant" and value == 1:
        raise RecordError(source, "mistyped field", f"{where} is a {role} message with 'weight' 1: only assistant "
                                                    "turns are trained (0 or no weight on the others)")
    return int(value)


def _reasoning(message: dict, source: str, where: str) -> str | None:
    """An assistant message's reasoning trace, under whichever of REASONING_KEYS it has."""
    key = next((k for k in REASONING_KEYS if message.get(k) is not None), None)
    if key is None:
        return None
    if not isinstance(message[key], str):
        raise RecordError(source, "mistyped field", f"{where}'s '{key}' must be text, got {type(message[key]).__name__}")
    return message[key].strip() or None


def _add_calls(messages: list[dict], calls: list[dict]) -> None:
    """A ShareGPT function_call turn: the calls of the assistant turn it continues, or a turn of its own."""
    if messages and messages[-1]["role"] == "assistant" and "tool_calls" not in messages[-1]:
        messages[-1]["tool_calls"] = calls
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": calls})


class _Shape(NamedTuple):
    role_key: str
    content_key: str
    roles: dict[str, str]


SHAREGPT = _Shape("from", "value", SHAREGPT_ROLES)
OPENAI = _Shape("role", "content", OPENAI_ROLES)
OASST = _Shape("role", "text", OPENAI_ROLES)  # OpenAssistant exports: {"role": "prompter", "text": ...}


def _shape(value: Any) -> _Shape:
    """The message layout of a list, judged by its first message."""
    value = _listed(value)
    first = next(iter(value), None) if isinstance(value, list) else None
    if isinstance(first, dict) and "from" in first:
        return SHAREGPT
    if isinstance(first, dict) and "text" in first and "content" not in first:
        return OASST
    return OPENAI


def _messages_in(record: dict, key: str, source: str, shape: _Shape | None = None) -> list[dict[str, str]]:
    value = _listed(record[key])
    if _is_exchanges(value):
        value, shape = _exchange_messages(value, source, key), OPENAI
    shape = shape or _shape(value)
    return _message_list(value, source, shape.role_key, shape.content_key, shape.roles, key)


def _is_exchanges(value: Any) -> bool:
    """Turns written as {"input", "output"} exchanges (Capybara, Pure-Dove), not as messages."""
    first = next(iter(value), None) if isinstance(value, list) else None
    return isinstance(first, dict) and {"input", "output"} <= first.keys() and not {"role", "from"} & first.keys()


def _exchange_messages(value: list, source: str, key: str) -> list[dict[str, Any]]:
    messages = []
    for k, turn in enumerate(value, 1):
        if not (isinstance(turn, dict) and {"input", "output"} <= turn.keys()):
            raise RecordError(source, "mistyped field", f"'{key}' turn {k} is not an {{input, output}} exchange")
        messages += [{"role": "user", "content": turn["input"]}, {"role": "assistant", "content": turn["output"]}]
    return messages


def _as_messages(value: Any, source: str, default_role: str, field: str) -> list[dict[str, str]]:
    """A string (one message of `default_role`) or a list of {role, content} messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list):
        raise RecordError(source, "mistyped field", f"'{field}' must be a string or a list of messages, got {type(value).__name__}")
    return _message_list(value, source, "role", "content", None, field)


def _optional_text(record: dict, key: str | None, source: str) -> str | None:
    """An optional string field; absent, null, empty or whitespace-only all mean "not given"."""
    value = _string(record, key, source, required=False) if key else None
    return value if value and value.strip() else None


def _answers(value: Any, source: str, key: str) -> list[str]:
    """A response column's distinct answers: a string, or a list of them or {"text": [...]} (SQuAD)."""
    if isinstance(value, dict) and "text" in value:
        value = value["text"]
    if isinstance(value, list) and not value:
        raise RecordError(source, "empty content", f"'{key}' holds no answer (an unanswerable question, as "
                                                   "SQuAD 2.0 has: nothing to train on or score against)")
    answers = value if isinstance(value, list) else [value]
    bad = next((a for a in answers if not isinstance(a, str)), None)
    if bad is not None:
        raise RecordError(source, "mistyped field", f"'{key}' must be a string, got {type(bad).__name__}")
    return list(dict.fromkeys(answers))


def _check_encodable(text: str, source: str, where: str) -> None:
    """Python strings may hold lone UTF-16 surrogates (e.g. from a JSON `\\ud800` escape), which no
    tokenizer, hash or UTF-8 file accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordError(source, "invalid unicode",
                          f"{where} holds a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start + 1}") from None


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
        if not m["content"].strip() and "tool_calls" not in m:  # a turn that only calls tools has no text
            raise RecordError(source, "empty content", f"message {n} ({role}) is empty or whitespace")
        _check_encodable(message_text(m), source, f"message {n} ({role})")
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
    if "label" not in meta and (label := kto_label(meta.get("kto_tag"))) is not None:
        meta = {**{k: v for k, v in meta.items() if k != "kto_tag"}, "label": label}  # LLaMA-Factory's KTO layout
    return Conversation(messages=messages, source=source, meta=_with_tools(meta, source))


def _with_tools(meta: dict[str, Any], source: str) -> dict[str, Any]:
    """`meta` with its `tools` column (the functions the conversation may call) in the form templates
    take, or without it when it holds none."""
    if "tools" in meta:
        tools = tool_list(meta.pop("tools"), source)
        if tools:
            meta["tools"] = tools
    return meta


def from_instruction(record: dict, source: str, *, prompt: str, response: str, input: str | None = None,
                     system: str | None = None, history: str | None = None) -> Conversation:
    """One exchange from named columns: system? -> (history) -> user: prompt (+ blank line + input) ->
    assistant: response. An empty input or system column counts as absent. A response listing several
    answers trains on the first; all of them go to `meta["references"]`, the answers evaluation accepts.
    `history`: earlier turns as [question, answer] pairs (LLaMA-Factory's Alpaca layout)."""
    asked = _instruction_prompt(record, source, prompt, input, history)
    if response not in record or record[response] is None:
        raise RecordError(source, "missing field", f"'{response}'")
    answers = _answers(record[response], source, response)
    system_text = _optional_text(record, system, source)
    messages = ([{"role": "system", "content": system_text}] if system_text else []) + asked + [
        {"role": "assistant", "content": answers[0]}]
    conv = _chat(messages, source, _meta(record, (prompt, response, input, system, history)))
    if len(answers) > 1:
        conv.meta["references"] = answers
    return conv


def _instruction_prompt(record: dict, source: str, prompt: str, input: str | None, history: str | None
                        ) -> list[dict[str, str]]:
    """The history's turns, then the user's: the prompt column, and a blank line and the input where it has one."""
    question = _string(record, prompt, source)
    extra = _optional_text(record, input, source)
    asked = f"{question}\n\n{extra}" if extra else question
    return _history(record, history, source) + [{"role": "user", "content": asked}]


def _history(record: dict, key: str | None, source: str) -> list[dict[str, str]]:
    """Earlier turns given as [question, answer] pairs (a JSON string of them, as a CSV column holds it, too)."""
    value = _listed(record.get(key)) if key else None
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecordError(source, "mistyped field", f"'{key}' must be a list of [question, answer] pairs")
    turns = []
    for k, pair in enumerate(value, 1):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise RecordError(source, "mistyped field", f"'{key}' entry {k} is not a [question, answer] pair of strings")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns


from_alpaca = partial(from_instruction, prompt="instruction", input="input", response="output", system="system",
                      history="history")
from_dolly = partial(from_instruction, prompt="instruction", input="context", response="response", system="system")
from_squad = partial(from_instruction, prompt="question", input="context", response="answers")


def _with_system(messages: list[dict], record: dict, source: str, key: str | None = "system"
                 ) -> tuple[list[dict], tuple[str, ...]]:
    """A system column beside the messages (LLaMA-Factory's ShareGPT layout, a mapped `system`) as the
    system message, unless the messages start with one; and the keys it used."""
    system = _optional_text(record, key if key in record else None, source)
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *messages], (key,)
    return messages, ()


def _system_key(record: dict) -> str | None:
    """The record's system-prompt column among SYSTEM_KEYS, if it has one."""
    return next((k for k in SYSTEM_KEYS if k in record), None)


# Keys that hold a conversation's message list, in the order they are looked for: ShareGPT's, OpenAI's,
# and LMSYS-Chat-1M's and WildChat's `conversation`. Whichever it is, the messages' own keys tell
# their layout ({from, value} or {role, content}).
CHAT_KEYS = ("conversations", "messages", "conversation")


def _chat_key(record: dict) -> str | None:
    return next((k for k in CHAT_KEYS if k in record), None)


def from_sharegpt(record: dict, source: str) -> Conversation:
    return _from_chat_key(record, source, SHAREGPT)


def from_messages(record: dict, source: str) -> Conversation:
    return _from_chat_key(record, source, OPENAI)


def _from_chat_key(record: dict, source: str, shape: _Shape) -> Conversation:
    key = _chat_key(record)
    if key is None:
        raise RecordError(source, "missing field", "'conversations'" if shape is SHAREGPT else "'messages'")
    if shape is OPENAI and _shape(record[key]) is OASST:
        shape = OASST
    messages, used = _with_system(_messages_in(record, key, source, shape), record, source)
    return _chat(messages, source, _meta(record, (key, *used)))


def from_gemini(record: dict, source: str) -> Conversation:
    messages, tools, used = gemini_parts(record, source)
    return _chat(messages, source, _meta(record, used) | ({"tools": tools} if tools else {}))


def _prompt_pair(record: dict) -> tuple[str, str] | None:
    return next(((p, a) for p, a in PROMPT_PAIRS if p in record and a in record), None)


def from_prompt_completion(record: dict, source: str) -> Conversation:
    pair = _prompt_pair(record)
    if pair is None:
        expected = " | ".join(f"{p}/{a}" for p, a in PROMPT_PAIRS)
        raise RecordError(source, "missing field", f"expected one of {expected}")
    p, a = pair
    system_key = _system_key(record)
    system = _optional_text(record, system_key, source)
    messages = ([{"role": "system", "content": system}] if system else []) + \
        _as_messages(record[p], source, "user", p) + _as_messages(record[a], source, "assistant", a)
    return _chat(messages, source, _meta(record, (*pair, system_key)))


class _ChoiceLayout(NamedTuple):
    """Where a benchmark's native record keeps the question, the options and the right option."""
    question: str
    choices: tuple[str, ...]  # one column listing the options (or ARC's {"text", "label"}), or one per option
    answer: str | None  # None: the first option column is the right one (SciQ), or its 1 label (TruthfulQA)
    context: str | None = None  # a passage shown before the question (RACE's article)
    base: int = 0  # the number that names the first option (1: WinoGrande's "1" / "2")
    shuffle: bool = False  # the right option comes first as written: reorder (`_hash_order`)
    options: tuple[str, ...] = ()  # fixed options of a record that lists none (BoolQ): true is the first
    detect: tuple[str, ...] = ()  # the keys that pick the layout, where not all of `keys` (an answer may be absent)
    fits: Callable[[dict], bool] | None = None  # a further test of the record, for detection only

    @property
    def keys(self) -> tuple[str, ...]:
        """The columns read (the rest go to meta)."""
        return tuple(k for k in (self.question, *self.choices, self.answer, self.context) if k is not None)

    @property
    def required(self) -> tuple[str, ...]:
        return self.detect or self.keys

    def pick(self, record: dict) -> str | None:
        """Detection: multiple_choice, or None to let later rules look (BoolQ's answer is not a truth value)."""
        return "multiple_choice" if self.fits is None or self.fits(record) else None


YES_NO = ("yes", "no")
_TRUTH = {"true": 0, "yes": 0, "false": 1, "no": 1}  # an answer's text -> its index in YES_NO


def _truth(value: Any) -> int | None:
    """The YES_NO index a BoolQ answer names: a bool, "True" / "False" as a CSV writes it, or yes / no."""
    if isinstance(value, bool):
        return 0 if value else 1
    return _TRUTH.get(value.strip().lower()) if isinstance(value, str) else None


def _boolq(record: dict) -> bool:
    """A question + passage + answer record is BoolQ's only when the answer is a truth value (or unlabelled):
    with a text answer it stays prompt/completion."""
    return _truth(record["answer"]) is not None or record["answer"] in (None, "")


_GPQA = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
_SCIQ = ("correct_answer", "distractor1", "distractor2", "distractor3")
_SIQA = ("answerA", "answerB", "answerC")
_MEDMCQA = ("opa", "opb", "opc", "opd")
# First match wins, in detection too: keep each layout's `required` keys from capturing another's records.
CHOICE_LAYOUTS = (
    _ChoiceLayout("question", ("choices",), "answer"),         # MMLU (cais/mmlu): answer 0-3
    _ChoiceLayout("question", ("choices",), "answerKey"),      # ARC, CommonsenseQA: {"text", "label"}
    _ChoiceLayout("question_stem", ("choices",), "answerKey"),  # OpenBookQA
    _ChoiceLayout("ctx", ("endings",), "label"),               # HellaSwag: label "0"-"3"
    _ChoiceLayout("goal", ("sol1", "sol2"), "label"),          # PIQA
    _ChoiceLayout("sentence", ("option1", "option2"), "answer", base=1,  # WinoGrande: "1" / "2"
                  detect=("sentence", "option1", "option2")),
    _ChoiceLayout("question", _SIQA, "label", context="context", base=1,  # Social IQa: "1"-"3"
                  detect=("context", "question", *_SIQA)),
    _ChoiceLayout("question", _MEDMCQA, "cop", detect=("question", *_MEDMCQA)),  # MedMCQA: cop 0-3
    _ChoiceLayout("question", ("options",), "answer", context="article",  # RACE: "A"-"D"
                  detect=("article", "question", "options")),
    _ChoiceLayout("question", ("options",), "answer_index",  # MMLU-Pro (its "answer" letter says the same)
                  detect=("question", "options", "answer_index")),
    _ChoiceLayout("question", ("mc1_targets",), None, shuffle=True,  # TruthfulQA: {"choices", "labels"}
                  detect=("question", "mc1_targets")),
    _ChoiceLayout("question", _SCIQ, None, context="support", shuffle=True,  # SciQ
                  detect=("question", *_SCIQ[1:])),
    _ChoiceLayout("Question", _GPQA, None, shuffle=True, detect=("Question", *_GPQA[1:])),  # GPQA (CSV)
    _ChoiceLayout("question", (), "answer", context="passage", options=YES_NO,  # BoolQ: true / false
                  detect=("question", "passage", "answer"), fits=_boolq),
)
MAX_CHOICES = 26  # lettered A to Z


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _choices(record: dict, keys: tuple[str, ...], source: str) -> tuple[list[str], list | None]:
    """The options' texts (stripped: each is shown on its own lettered line), and their labels where the
    record names them (ARC's {"text", "label"}, TruthfulQA's {"choices", "labels"})."""
    if len(keys) > 1:
        return [_string(record, k, source).strip() for k in keys], None
    value, labels = record[keys[0]], None
    if isinstance(value, dict):
        value, labels = value.get("text", value.get("choices")), value.get("label", value.get("labels"))
    if not (isinstance(value, list) and 2 <= len(value) <= MAX_CHOICES and all(isinstance(c, str) for c in value)):
        raise RecordError(source, "mistyped field", f"'{keys[0]}' must list 2 to {MAX_CHOICES} option texts")
    if labels is not None and not (isinstance(labels, list) and len(labels) == len(value)):
        raise RecordError(source, "mistyped field", f"'{keys[0]}' must have one label per option")
    return [c.strip() for c in value], labels


def _unlabelled(record: dict, key: str, source: str) -> None:
    """An answer that is absent, empty or -1 (an unlabelled test split: WinoGrande's "", MedMCQA's -1)."""
    value = record.get(key)
    if key in record and not (value is None or value == "" or value in (-1, "-1")):
        return
    what = "missing" if key not in record else "empty" if value in (None, "") else repr(value)
    raise RecordError(source, "no answer", f"'{key}' is {what} (an unlabelled test split?)")


def _flagged(labels: list, key: str, source: str) -> int:
    """The one option that TruthfulQA's mc1 labels mark right (1; the others 0)."""
    if not all(flag in (0, 1) for flag in labels):
        raise RecordError(source, "mistyped field", f"'{key}' labels must be 1 (right) or 0, got {labels}")
    right = [i for i, flag in enumerate(labels) if flag == 1]
    if len(right) != 1:
        raise RecordError(source, "several answers" if right else "no answer",
                          f"'{key}' labels {len(right)} options 1 (right); exactly one must be")
    return right[0]


def _choice_index(value: Any, key: str, choices: list[str], labels: list | None, source: str, base: int = 0) -> int:
    """The right option's index: its label's position where the record names labels (ARC's answerKey);
    else an index (an int, or its digits: HellaSwag's label; from `base`), a letter (A is 0) or the option's text."""
    if labels is not None:
        if value not in labels:
            raise RecordError(source, "answer not a choice",
                              f"'{key}' {value!r} is not one of the labels {', '.join(map(str, labels))}")
        return labels.index(value)
    index = _named_index(value, choices, base)
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(choices):
        return index
    last = len(choices) - 1
    raise RecordError(source, "answer not a choice", f"'{key}' {value!r} is not an option's index ({base} to "
                                                     f"{last + base}), letter (A to {_letters(last + 1)[-1]}) or text")


def _named_index(value: Any, choices: list[str], base: int = 0) -> Any:
    """The index an answer names: a number counted from `base`, its digits, a letter, or the option's text;
    any other answer as it is."""
    if not isinstance(value, str):
        return value - base if isinstance(value, int) and not isinstance(value, bool) else value
    text, letters = value.strip(), _letters(len(choices))
    if text.isdecimal():
        return int(text) - base
    if text in letters:
        return letters.index(text)
    return choices.index(text) if text in choices else None


def _options(record: dict, layout: _ChoiceLayout, source: str) -> tuple[list[str], int]:
    """The options' texts and the right one's index, as `layout` writes them."""
    if layout.options:  # BoolQ: a truth value names yes or no
        _unlabelled(record, layout.answer, source)
        index = _truth(record[layout.answer])
        if index is None:
            raise RecordError(source, "answer not a choice",
                              f"'{layout.answer}' {record[layout.answer]!r} is not true / false or yes / no")
        return list(layout.options), index
    _unlabelled(record, layout.answer or layout.choices[0], source)
    choices, labels = _choices(record, layout.choices, source)
    if layout.answer is None:  # the right option listed first (SciQ, GPQA) or labelled 1 (TruthfulQA)
        return choices, 0 if labels is None else _flagged(labels, layout.choices[0], source)
    return choices, _choice_index(record[layout.answer], layout.answer, choices, labels, source, layout.base)


def _hash_order(question: str, choices: list[str], index: int) -> tuple[list[str], int]:
    """The options ordered by the SHA-256 of question and option: where the right option is always listed
    first (SciQ, GPQA, TruthfulQA), it would otherwise always be "A", which a fine-tuned model learns.
    The order comes from the record alone, so it is the same on every run and Python version (unlike hash())."""
    order = sorted(range(len(choices)), key=lambda i: hashlib.sha256(f"{question}\n{choices[i]}".encode()).digest())
    return [choices[i] for i in order], order.index(index)


def from_multiple_choice(record: dict, source: str) -> Conversation:
    """A multiple-choice item in its benchmark's native layout (CHOICE_LAYOUTS): its passage (if any), the
    question and its lettered options, answered by the right option's text (the form `choice` scoring gives
    each option). `meta` gets `choices` (in the order shown) and `answer` (the index), and as `references`
    the option's letter, alone and with its text, so exact match accepts an answer that names the option
    as the prompt shows it."""
    layout = next((lay for lay in CHOICE_LAYOUTS if all(k in record for k in lay.required)), None)
    if layout is None:
        raise RecordError(source, "missing field",
                          f"expected one of {' | '.join(' + '.join(lay.required) for lay in CHOICE_LAYOUTS)}")
    question = _string(record, layout.question, source).strip()
    context = (_string(record, layout.context, source, required=False) or "").strip() if layout.context else ""
    choices, index = _options(record, layout, source)
    if layout.shuffle:
        choices, index = _hash_order(question, choices, index)
    letters = _letters(len(choices))
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, choices))
    messages = [{"role": "user", "content": "\n\n".join(part for part in (context, question, options) if part)},
                {"role": "assistant", "content": choices[index]}]
    conv = _chat(messages, source, _meta(record, layout.keys))
    conv.meta |= {"choices": choices, "answer": index,
                  "references": [choices[index], letters[index], f"{letters[index]}. {choices[index]}"]}
    return conv


def from_xlam(record: dict, source: str) -> Conversation:
    """Function-calling requests answered by calls (Salesforce xLAM: `query`, `answers` and `tools`,
    the last two JSON strings): the request, and one assistant turn making the calls."""
    query = _string(record, "query", source)
    calls = call_list(record.get("answers"), source, "'answers'")
    if not calls:
        raise RecordError(source, "empty content", "'answers' holds no call")
    messages = [{"role": "user", "content": query}, {"role": "assistant", "content": "", "tool_calls": calls}]
    conv = _chat(messages, source, _meta(record, ("query", "answers")))
    as_json_schema(conv.tools or [])
    return conv


def from_text(record: dict, source: str, key: str = "text") -> Conversation:
    text = _string(record, key, source)
    if not text.strip():
        raise RecordError(source, "empty content", f"'{key}' is empty or whitespace")
    _check_encodable(text, source, f"'{key}'")
    return Conversation(source=source, text=text, meta=_meta(record, (key,)))


def from_segments(record: dict, source: str) -> Conversation:
    """Axolotl's template-free `input_output` record: [{"label": bool, "text": str}, ...], kept as
    (text, trained) pairs. A segment's text may be empty; at least one label-true segment has text."""
    value = _listed(record.get("segments"))
    if not isinstance(value, list):
        raise RecordError(source, "mistyped field", f"'segments' must be a list of {{label, text}} objects, "
                                                    f"got {type(value).__name__}")
    if not value:
        raise RecordError(source, "empty content", "'segments' is an empty list")
    segments = []
    for k, seg in enumerate(value, 1):
        where = f"segment {k}"
        if not isinstance(seg, dict):
            raise RecordError(source, "mistyped field", f"{where} is {type(seg).__name__}, expected a {{label, text}} object")
        if seg.get("text") is None:
            raise RecordError(source, "missing field", f"{where} has no 'text'")
        if not isinstance(seg["text"], str):
            raise RecordError(source, "mistyped field", f"{where}'s 'text' must be a string, got {type(seg['text']).__name__}")
        if "label" not in seg:
            raise RecordError(source, "missing field", f"{where} has no 'label' (true: trained, false: context only)")
        if not isinstance(seg["label"], bool):
            raise RecordError(source, "mistyped field", f"{where}'s 'label' must be true or false, got {seg['label']!r}")
        if other := [key for key in seg if key not in ("label", "text")]:
            raise RecordError(source, "unknown field", f"{where} has {', '.join(map(repr, other))}: a segment holds "
                                                       "only 'label' and 'text'")
        _check_encodable(seg["text"], source, where)
        segments.append((seg["text"], seg["label"]))
    if not any(trained for _, trained in segments):
        raise RecordError(source, "nothing to train", "no segment has label true: nothing would be trained")
    if not any(trained and text for text, trained in segments):
        raise RecordError(source, "nothing to train", "every segment with label true has empty text")
    return Conversation(source=source, segments=segments, meta=_meta(record, ("segments",)))


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


# TRL / UltraFeedback, orca_dpo_pairs, Argilla's sets, LLaMA-Factory's Alpaca pairs, Argilla's orca pairs
PAIR_PROMPT_KEYS = ("prompt", "question", "instruction", "input")
# the two sides' keys: TRL's, TRL's with the chosen conversation as messages, OpenAI's
PAIR_SIDES = (("chosen", "rejected"), ("messages", "rejected"), ("preferred_output", "non_preferred_output"))


def _shared_prompt(record: dict, source: str) -> list[dict[str, str]] | None:
    key = next((k for k in PAIR_PROMPT_KEYS if k in record), None)
    if key == "instruction" and isinstance(record[key], str):  # as an Alpaca record's prompt
        return _instruction_prompt(record, source, "instruction", "input", "history")
    if key:
        return _as_messages(record[key], source, "user", key)
    if "conversations" in record:
        return _message_list(record["conversations"], source, "from", "value", SHAREGPT_ROLES, "conversations")
    return None


def _with_prompt(side: list[dict[str, str]], prompt: list[dict[str, str]] | None, source: str,
                 field: str) -> list[dict[str, str]]:
    """A side that holds only the answer gets the shared prompt in front of it."""
    if not any(m["role"] == "assistant" for m in side):
        raise RecordError(source, "empty side", f"'{field}' holds no assistant answer")
    if any(m["role"] != "assistant" for m in side):  # a whole conversation, prompt included
        if prompt is not None and not _continues(side[:_answer_start(side)], prompt):
            raise RecordError(source, "prompt mismatch", f"'{field}' continues another prompt than the record's")
        return side
    if prompt is None:
        raise RecordError(source, "missing prompt", f"'{field}' is only an answer and the record has no prompt "
                                                    f"({' | '.join(PAIR_PROMPT_KEYS)})")
    return prompt + side


def _continues(conversation: list[dict[str, str]], prompt: list[dict[str, str]]) -> bool:
    """Whether a conversation's prompt ends with `prompt` (a system message of its own aside)."""
    def key(messages):
        return [(m["role"], m["content"].strip()) for m in messages]
    return len(prompt) <= len(conversation) and key(conversation[len(conversation) - len(prompt):]) == key(prompt)


# HH-RLHF's pairs are whole transcripts: "\n\nHuman: ...\n\nAssistant: ..." (turns in that order)
_TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant):")
_TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}


def _is_transcript(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("Human:") and "\n\nAssistant:" in value


def _transcript(text: str, source: str, field: str) -> list[dict[str, str]]:
    """An HH-RLHF transcript string -> messages (each turn's text stripped)."""
    parts = _TRANSCRIPT_TURN.split("\n\n" + text.lstrip())
    if parts[0].strip():
        raise RecordError(source, "malformed transcript", f"'{field}' has text before its first 'Human:' turn")
    return [{"role": _TRANSCRIPT_ROLES[role], "content": body.strip()} for role, body in zip(parts[1::2], parts[2::2])]


def from_preference(record: dict, source: str) -> Conversation:
    if is_arena(record):  # Chatbot Arena battles, as a chosen/rejected record (data/arena.py)
        record = arena_pair(record, source)
    if "completion" in record and "label" in record and "chosen" not in record:
        return _from_unpaired(record, source)
    if isinstance(record.get("input"), dict):
        record = _openai_pair(record)
    chosen_key, rejected_key = next((pair for pair in PAIR_SIDES if pair[0] in record), PAIR_SIDES[0])
    for key in (chosen_key, rejected_key):
        if key not in record:
            raise RecordError(source, "missing field", f"'{key}'")
    prompt = _shared_prompt(record, source)
    chosen_side = _side(record[chosen_key], source, chosen_key)
    rejected_side = _side(record[rejected_key], source, rejected_key)
    transcripts = [k for k in (chosen_key, rejected_key) if _is_transcript(record[k])]
    if len(transcripts) == 2:
        chosen_side = _transcript(record[chosen_key], source, chosen_key)
        rejected_side = _transcript(record[rejected_key], source, rejected_key)
    elif transcripts:
        other = rejected_key if transcripts[0] == chosen_key else chosen_key
        raise RecordError(source, "malformed transcript", f"'{transcripts[0]}' is a Human:/Assistant: transcript "
                                                          f"and '{other}' is not")
    if prompt is None:  # {"messages", "rejected": answer}: the prompt comes from the whole conversation
        whole = next((s for s in (chosen_side, rejected_side) if any(m["role"] != "assistant" for m in s)), None)
        prompt = whole[:_answer_start(whole)] if whole else None
    chosen = _with_prompt(chosen_side, prompt, source, chosen_key)
    rejected = _with_prompt(rejected_side, prompt, source, rejected_key)
    system_key = _system_key(record)  # orca_dpo_pairs, TRL with a system column
    chosen, _ = _with_system(chosen, record, source, system_key)
    rejected, _ = _with_system(rejected, record, source, system_key)
    for side, key in ((chosen, chosen_key), (rejected, rejected_key)):
        try:
            check_messages(side, source)
        except RecordError as e:  # say which side
            raise RecordError(source, e.kind, f"'{key}': {e.reason.removeprefix(e.kind + ': ')}") from None
        if side[-1]["role"] != "assistant":
            raise RecordError(source, "empty side", f"'{key}' does not end with an assistant answer")
    c_cut, r_cut = _answer_start(chosen), _answer_start(rejected)
    if chosen[:c_cut] != rejected[:r_cut]:
        raise RecordError(source, "prompt mismatch", "chosen and rejected continue different prompts")
    if message_text(chosen[-1]).strip() == message_text(rejected[-1]).strip():
        raise RecordError(source, "identical pair", "chosen and rejected answers are the same")
    meta = _with_tools(_meta(record, (*PAIR_PROMPT_KEYS, "history", "conversations", chosen_key, rejected_key,
                                      system_key)), source)
    meta["rejected"] = rejected
    return Conversation(messages=chosen, source=source, meta=meta)


def _openai_pair(record: dict) -> dict:
    """OpenAI's preference fine-tuning layout (Together's too): {"input": {"messages", "tools"?, ...},
    "preferred_output": [...], "non_preferred_output": [...]}, with the prompt's messages as `input`
    and the input's other keys (tools) beside them."""
    given = record["input"]
    return {**{k: v for k, v in record.items() if k != "input"},
            **{k: v for k, v in given.items() if k != "messages"}, "input": given.get("messages")}


def kto_label(value: Any) -> bool | None:
    """An unpaired (KTO) record's label: true/false, or the strings a CSV file holds for them
    ("True"/"False" as pandas writes them, any case); None for anything else."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value if isinstance(value, bool) else None


def _from_unpaired(record: dict, source: str) -> Conversation:
    """KTO's unpaired form: one answer and whether it is desirable."""
    label = kto_label(record["label"])
    if label is None:
        raise RecordError(source, "mistyped field", f"'label' must be true or false, got {record['label']!r}")
    if "prompt" not in record:
        raise RecordError(source, "missing prompt", "an unpaired record needs a 'prompt'")
    messages = _as_messages(record["prompt"], source, "user", "prompt")
    messages = _with_prompt(_side(record["completion"], source, "completion"), messages, source, "completion")
    system_key = _system_key(record)
    messages, _ = _with_system(messages, record, source, system_key)
    conv = _chat(messages, source, _meta(record, ("prompt", "completion", "label", system_key)))
    conv.meta["label"] = label
    return conv


Converter = Callable[[dict, str], Conversation]

FORMATS: dict[str, Converter] = {
    "alpaca": from_alpaca,
    "dolly": from_dolly,
    "squad": from_squad,
    "sharegpt": from_sharegpt,
    "messages": from_messages,
    "prompt_completion": from_prompt_completion,
    "text": from_text,
    "segments": from_segments,
    "preference": from_preference,
    "xlam": from_xlam,
    "gemini": from_gemini,
    "multiple_choice": from_multiple_choice,
}


def _chat_format(record: dict) -> str:
    return "sharegpt" if _shape(record[_chat_key(record)]) is SHAREGPT else "messages"


# Detection rules, first match wins: (format, keys that must all be present) or a function
# (which may return None: the record is not of that format after all, and later rules look).
_DETECT: tuple[tuple[tuple[str, ...], Callable[[dict], str | None]], ...] = (
    (("chosen", "rejected"), lambda r: "preference"),
    (("prompt", "completion", "label"), lambda r: "preference" if kto_label(r["label"]) is not None else "prompt_completion"),
    (("messages", "rejected"), lambda r: "preference"),
    (("preferred_output", "non_preferred_output"), lambda r: "preference"),
    *((keys, lambda r: "preference") for keys in ARENA_KEYS),  # Chatbot Arena battles
    (("segments",), lambda r: "segments"),
    *(((key,), _chat_format) for key in CHAT_KEYS),
    (("instruction", "output"), lambda r: "alpaca"),
    (("instruction", "response"), lambda r: "dolly"),
    (("question", "context", "answers"), lambda r: "squad"),
    *((layout.required, layout.pick) for layout in CHOICE_LAYOUTS),  # before question + answer (RACE, BoolQ)
    (("query", "answers"), lambda r: "xlam"),
    (("contents",), lambda r: "gemini"),
    *(((p, a), lambda r: "prompt_completion") for p, a in PROMPT_PAIRS),
    (("text",), lambda r: "text"),
)


def detect_format(record: dict, source: str = "<record>") -> str:
    """The schema name of a record, by its keys."""
    if is_message_row(record):
        raise RecordError(source, "message rows", "one message of an OpenAssistant tree (message_id, parent_id, "
                                                  "role) among records of another kind: a file of such rows alone "
                                                  "is read as one conversation per tree (--format text trains each "
                                                  "message as raw text)")
    for keys, pick in _DETECT:
        if all(k in record for k in keys) and (name := pick(record)) is not None:  # None: not this one after all
            return name
    # the schema with most of its keys present, the fewest missing among those
    present, keys = max(((sum(k in record for k in keys), keys) for keys, _ in _DETECT),
                        key=lambda x: (x[0], -len(x[1])))
    closest = f"; closest: {' + '.join(keys)}, without {', '.join(repr(k) for k in keys if k not in record)}" \
        if present else ""
    raise RecordError(source, "unknown schema",
                      f"keys {sorted(record)[:8]} match no format ({', '.join(FORMATS)}){closest}")


def check_format_name(format: str | Columns | None) -> None:
    if isinstance(format, str) and format not in FORMATS:
        import difflib

        close = difflib.get_close_matches(format, FORMATS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise SftlabError(f"unknown data format '{format}'; known: {', '.join(FORMATS)}.{hint}")


def to_conversation(record: Any, source: str, format: str | Columns | None = None) -> Conversation:
    """Convert one raw record; `format` (a key of FORMATS, or a `Columns` mapping) overrides detection."""
    if not isinstance(record, dict):
        raise RecordError(source, "not an object", f"record is a JSON {type(record).__name__}, expected an object")
    if isinstance(format, Columns):
        return format.convert(record, source)
    check_format_name(format)
    return FORMATS[format or detect_format(record, source)](record, source)


class Columns(BaseModel):
    """Which column is which, for datasets in no detected schema (`data.columns` in a config,
    `--columns prompt=question,response=answer` on the data commands). Give `prompt` and
    `response` (with `input`, `system` if present), or `messages` (with `system`), or `text`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | None = Field(None, description="The user's request (instruction, question).")
    input: str | None = Field(None, description="Optional extra input appended to the prompt after a blank line (context, passage).")
    response: str | None = Field(None, description="The answer trained on (a string, or the first of a list / {text: [...]}).")
    system: str | None = Field(None, description="Optional system prompt.")
    messages: str | None = Field(None, description="A message list (role/content, from/value or role/text).")
    text: str | None = Field(None, description="Raw text (continued pre-training).")

    @model_validator(mode="after")
    def _one_layout(self) -> Columns:
        pair = self.prompt is not None or self.response is not None
        if pair and (self.prompt is None or self.response is None):
            raise ValueError("give both 'prompt' and 'response'")
        if sum((pair, self.messages is not None, self.text is not None)) != 1:
            raise ValueError("map 'prompt' + 'response', or 'messages', or 'text' (exactly one of these)")
        if self.input is not None and not pair:
            raise ValueError("'input' goes with 'prompt' and 'response'")
        if self.system is not None and self.text is not None:
            raise ValueError("'system' does not go with 'text'")
        return self

    @classmethod
    def parse(cls, value: str) -> Columns:
        """`prompt=question,response=answer` -> Columns (for --columns)."""
        pairs = [item.partition("=") for item in value.split(",") if item.strip()]
        bad = [k for k, sep, v in pairs if not sep or not k.strip() or not v.strip()]
        if bad or not pairs:
            raise SftlabError(f"--columns '{value}': expected ROLE=COLUMN pairs, e.g. prompt=question,response=answer")
        return cls.build({k.strip(): v.strip() for k, _, v in pairs}, "--columns")

    def to_arg(self) -> str:
        """The `--columns` form of this mapping (the inverse of `parse`), for child commands."""
        return ",".join(f"{role}={column}" for role, column in self.model_dump(exclude_none=True).items())

    @classmethod
    def build(cls, mapping: dict, origin: str) -> Columns:
        try:
            return cls.model_validate(mapping)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            hint = f" (roles: {', '.join(cls.model_fields)})" if err["type"] == "extra_forbidden" else ""
            raise SftlabError(f"{origin}: {where + ': ' if where else ''}{err['msg'].removeprefix('Value error, ')}{hint}") from None

    def convert(self, record: dict, source: str) -> Conversation:
        if self.text is not None:
            return from_text(record, source, self.text)
        if self.messages is not None:
            if self.messages not in record:
                raise _missing(record, self.messages, source)
            messages, _ = _with_system(_messages_in(record, self.messages, source), record, source, self.system)
            return _chat(messages, source, _meta(record, (self.messages, self.system)))
        return from_instruction(record, source, prompt=self.prompt, response=self.response, input=self.input,
                                system=self.system)


def schema(format: str | None, columns: Columns | None) -> str | Columns | None:
    """What the loaders take as `format`: the column mapping, the format name, or None (detect)."""
    if format is not None and columns is not None:
        raise SftlabError(f"give a data format ('{format}') or a column mapping, not both: the mapping names the schema")
    check_format_name(format)
    return columns if columns is not None else format
