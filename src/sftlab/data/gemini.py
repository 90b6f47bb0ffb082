"""Google's Gemini tuning layout (Vertex AI supervised tuning JSONL, the Gemini API's `contents`) ->
`Conversation`.

    {"systemInstruction": {"parts": [{"text": "..."}]},
     "contents": [{"role": "user", "parts": [{"text": "..."}]},
                  {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {...}}}]},
                  {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {...}}}]},
                  {"role": "model", "parts": [{"text": "...", "thought": true}, {"text": "..."}]}],
     "tools": [{"functionDeclarations": [{"name": "f", "description": "...", "parameters": {...}}]}]}

Roles are `user` and `model`; a user (or `function`) turn of `functionResponse` parts is one tool
result per part; a model turn's `functionCall` parts are its tool calls, its `thought` parts its
reasoning. The REST API's camelCase keys and the Python SDK's snake_case ones are both read.
Parts that are not text (images, files, code execution) are refused: sftlab trains on text.
"""

from __future__ import annotations

import json
from typing import Any

from sftlab.data.tools import call_list
from sftlab.errors import RecordError

CONTENTS = "contents"
SYSTEM_KEYS = ("systemInstruction", "system_instruction")
_CALL, _RESPONSE = ("functionCall", "function_call"), ("functionResponse", "function_response")
_DECLARATIONS = ("functionDeclarations", "function_declarations")


def gemini_parts(record: dict, source: str) -> tuple[list[dict], dict | None, tuple[str, ...]]:
    """(OpenAI-style messages, the tools in OpenAI's form or None, the record keys used)."""
    turns = record.get(CONTENTS)
    if not isinstance(turns, list):
        raise RecordError(source, "mistyped field", f"'{CONTENTS}' must be a list of turns, got {type(turns).__name__}")
    used = [CONTENTS]
    messages = []
    if key := next((k for k in SYSTEM_KEYS if record.get(k) is not None), None):
        used.append(key)
        system = _texts(_parts(record[key], source, f"'{key}'"), source, f"'{key}'")
        if system.strip():
            messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns, 1):
        where = f"'{CONTENTS}' turn {i}"
        if not isinstance(turn, dict):
            raise RecordError(source, "mistyped field", f"{where} is {type(turn).__name__}, expected an object")
        parts = _parts(turn, source, where)
        role = turn.get("role", "user")
        if role == "model":
            messages.append(_model_turn(parts, source, where))
        elif role in ("user", "function") and any(_get(p, _RESPONSE) is not None for p in parts):
            messages.extend(_responses(parts, source, where))
        elif role == "user":
            messages.append({"role": "user", "content": _texts(parts, source, where)})
        else:
            raise RecordError(source, "unknown role", f"{role!r} in {where} (expected user or model)")
    tools = None
    if record.get("tools") is not None:
        used.append("tools")
        tools = _tools(record["tools"], source)
    return messages, tools, tuple(used)


def _get(part: dict, keys: tuple[str, ...]) -> Any:
    return next((part[k] for k in keys if part.get(k) is not None), None)


def _parts(holder: Any, source: str, where: str) -> list[dict]:
    parts = holder.get("parts") if isinstance(holder, dict) else None
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise RecordError(source, "mistyped field", f"{where} needs 'parts', a list of objects")
    return parts


def _texts(parts: list[dict], source: str, where: str) -> str:
    """The text of parts that must all be text."""
    for k, part in enumerate(parts, 1):
        if not isinstance(part.get("text"), str):
            kind = next(iter(part), "empty")
            raise RecordError(source, "unsupported part", f"{where} part {k} is '{kind}', not text")
    return "".join(p["text"] for p in parts)


def _model_turn(parts: list[dict], source: str, where: str) -> dict:
    """A model turn: its text, its reasoning (`thought` parts) and its calls, in the OpenAI layout."""
    calls = [{"name": c.get("name"), "arguments": c.get("args")} if isinstance(c, dict) else c
             for p in parts if (c := _get(p, _CALL)) is not None]
    rest = [p for p in parts if _get(p, _CALL) is None]
    thoughts = [p for p in rest if p.get("thought") is True]
    message = {"role": "assistant", "content": _texts([p for p in rest if p.get("thought") is not True], source, where)}
    if calls:
        message["tool_calls"] = call_list(calls, source, f"{where}'s calls", f"{where}'s call")
    if thoughts and (reasoning := _texts(thoughts, source, where).strip()):
        message["reasoning_content"] = reasoning
    return message


def _responses(parts: list[dict], source: str, where: str) -> list[dict]:
    """A turn of function results: one tool message each, its content the response as JSON."""
    out = []
    for k, part in enumerate(parts, 1):
        response = _get(part, _RESPONSE)
        if not isinstance(response, dict) or not isinstance(response.get("name"), str):
            raise RecordError(source, "malformed tool call", f"{where} part {k} is not a functionResponse with a name")
        body = response.get("response")
        content = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
        out.append({"role": "tool", "name": response["name"], "content": content})
    return out


def _tools(value: Any, source: str) -> list[dict]:
    """Gemini's tools ([{"functionDeclarations": [...]}]) as the bare functions `tool_list` reads, their
    OpenAPI type names ("STRING", "OBJECT") in JSON Schema's lower case."""
    if not isinstance(value, list):
        raise RecordError(source, "malformed tool call", f"'tools' must be a list, got {type(value).__name__}")
    functions = []
    for k, tool in enumerate(value, 1):
        declarations = _get(tool, _DECLARATIONS) if isinstance(tool, dict) else None
        if not isinstance(declarations, list):
            raise RecordError(source, "malformed tool call", f"'tools' entry {k} has no functionDeclarations list")
        functions.extend(_lower_types(d) for d in declarations)
    return functions


def _lower_types(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v.lower() if k == "type" and isinstance(v, str) else _lower_types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_lower_types(v) for v in value]
    return value
