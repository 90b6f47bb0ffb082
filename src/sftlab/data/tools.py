"""Tool-calling records: the function list a conversation may call (`tools`) and the calls an
assistant turn makes (`tool_calls`), in the one form chat templates take.

What datasets hold, and what it becomes:
  tools        a list (or a JSON string of one, as Parquet/CSV columns keep it) of
               {"type": "function", "function": {"name", "description"?, "parameters"?}} or of bare
               {"name", "description"?, "parameters"?}       -> [{"type": "function", "function": {...}}]
  tool_calls   OpenAI's [{"id"?, "type": "function", "function": {"name", "arguments"}}] or bare
               [{"name", "arguments"}], `arguments` an object or a JSON string of one; the legacy
               `function_call` {"name", "arguments"}; ShareGPT's `function_call` turns (a JSON object
               or list of them)                              -> [{"type": "function", "function":
                                                                 {"name", "arguments": {...}}}, "id"?]
Arguments are kept as objects: templates write them with `| tojson` (Qwen, Llama 3.1), so a JSON
string would be written as one quoted string.
"""

from __future__ import annotations

import json
from typing import Any

from sftlab.errors import RecordError


def _json(value: Any, source: str, what: str) -> Any:
    """A value that may arrive as a JSON string (a Parquet or CSV column of objects)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise RecordError(source, "malformed tool call", f"{what} is a string that is not JSON ({e.msg})") from None


def _function(value: Any, source: str, what: str) -> dict[str, Any]:
    """{"type": "function", "function": {...}} or the bare function -> the bare function, named."""
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"].strip():
        raise RecordError(source, "malformed tool call", f"{what} has no function name")
    return value


def tool_list(value: Any, source: str) -> list[dict[str, Any]] | None:
    """A record's `tools` column in the form templates take; None when it holds none."""
    value = _json(value, source, "'tools'")
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise RecordError(source, "malformed tool call", f"'tools' must be a list of functions, got {type(value).__name__}")
    out = []
    for k, tool in enumerate(value):
        function = _function(_json(tool, source, f"tool {k + 1}"), source, f"tool {k + 1}")
        out.append({"type": "function", "function": function})
    return out


def _call(value: Any, source: str, what: str) -> dict[str, Any]:
    function = _function(_json(value, source, what), source, what)
    arguments = _json(function.get("arguments", function.get("parameters", {})), source, f"{what}'s arguments")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise RecordError(source, "malformed tool call", f"{what}'s arguments are not a JSON object")
    call: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        call["id"] = value["id"]
    return call


def tool_calls(message: dict, source: str, where: str) -> list[dict[str, Any]] | None:
    """An assistant message's calls (`tool_calls`, or the legacy single `function_call`), normalised."""
    calls = message.get("tool_calls")
    if calls is None and message.get("function_call") is not None:
        calls = [message["function_call"]]
    calls = _json(calls, source, f"{where}'s tool_calls")
    if not calls:
        return None
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list):
        raise RecordError(source, "malformed tool call", f"{where}'s tool_calls must be a list")
    return [_call(c, source, f"{where}'s tool call {k + 1}") for k, c in enumerate(calls)]


def sharegpt_calls(value: Any, source: str, where: str) -> list[dict[str, Any]]:
    """A ShareGPT `function_call` turn's value: one call object or a list of them, as JSON."""
    return tool_calls({"tool_calls": _json(value, source, where)}, source, where) or []


def call_text(calls: list[dict[str, Any]]) -> str:
    """The calls as one canonical line (for duplicate keys and reports)."""
    return json.dumps([c["function"] for c in calls], sort_keys=True, ensure_ascii=False)
