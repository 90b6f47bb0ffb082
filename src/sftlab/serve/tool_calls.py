"""Tool calls in generated text, for the OpenAI API: the Hermes / Qwen layout that `chatml` and the
Qwen templates teach (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per
call, after any text), parsed into OpenAI's `tool_calls`. Text in another layout is returned as
the message's content, as generated."""

from __future__ import annotations

import json
import re
import uuid

OPEN = "<tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(the content before the first call, or None when there is none; the calls). Text whose blocks
    are not all calls (unclosed, not JSON, no name, arguments that are not an object) is content, with
    no calls."""
    calls = []
    for block in _BLOCK.finditer(text):
        try:
            call = json.loads(block.group(1))
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = _object(call.get("arguments", call.get("parameters", {})))  # Llama 3.1 writes "parameters"
        if arguments is None:
            return text, []
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
    if not calls or _BLOCK.sub("", text[text.index(OPEN):]).strip():  # text after or between the calls
        return text, []
    return text[: text.index(OPEN)].strip() or None, calls


def _object(arguments) -> dict | None:
    """A call's arguments as an object (given as one or as a JSON string of one), else None."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return arguments if isinstance(arguments, dict) else None
