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
string would be written as one quoted string. A template that writes them as text instead (DeepSeek V3 and
R1: `'```json\n' + tool['function']['arguments']`) gets them as JSON text (`as_template_takes`), as a
template that writes an answer's reasoning from a thinking block of its content gets it so.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any, Callable

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


def _present(value: Any) -> Any:
    """`value` without null-valued keys, at any depth: a Parquet column of structs holds every key any
    row has, null where a row has none, and a tool's schema or a call's arguments must not grow them."""
    if isinstance(value, dict):
        return {k: _present(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_present(v) for v in value]
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
        function = _function(_present(_json(tool, source, f"tool {k + 1}")), source, f"tool {k + 1}")
        out.append({"type": "function", "function": function})
    return out


def _call(value: Any, source: str, what: str) -> dict[str, Any]:
    function = _function(_json(value, source, what), source, what)
    arguments = _json(function.get("arguments", function.get("parameters")), source, f"{what}'s arguments")
    arguments = {} if arguments is None else _present(arguments)
    if not isinstance(arguments, dict):
        raise RecordError(source, "malformed tool call", f"{what}'s arguments are not a JSON object")
    call: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        call["id"] = value["id"]
    return call


def call_list(value: Any, source: str, where: str, each: str | None = None) -> list[dict[str, Any]]:
    """Calls given as a list of call objects (or one), possibly as a JSON string, normalised.
    Errors name the list `where` ("'answers'") and a call `each` N ("'answers' call 2")."""
    calls = _json(value, source, where)
    if isinstance(calls, dict):
        calls = [calls]
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise RecordError(source, "malformed tool call", f"{where} must be a list of calls")
    return [_call(c, source, f"{each or where + ' call'} {k + 1}") for k, c in enumerate(calls)]


def tool_calls(message: dict, source: str, where: str) -> list[dict[str, Any]] | None:
    """An assistant message's calls (`tool_calls`, or the legacy single `function_call`), normalised;
    None when it makes none."""
    if message.get("tool_calls") is not None and message.get("function_call") is not None:
        raise RecordError(source, "malformed tool call", f"{where} has both tool_calls and function_call")
    if message.get("function_call") is not None:
        return call_list(message["function_call"], source, f"{where}'s function_call", f"{where}'s function_call") or None
    return call_list(message.get("tool_calls"), source, f"{where}'s tool_calls", f"{where}'s tool call") or None


_SCHEMA_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "list": "array",
                 "dict": "object", "any": "string"}


def as_json_schema(tools: list[dict[str, Any]]) -> None:
    """Rewrite, in place, tools whose `parameters` map each name to {type: "str" | "int, optional" |
    "List[str]" ..., description, default?} (xLAM) with the JSON Schema object the server's clients send."""
    for tool in tools:
        params = tool["function"].get("parameters")
        if not isinstance(params, dict) or params.get("type") == "object":
            continue  # already JSON Schema
        properties, required = {}, []
        for name, spec in params.items():
            spec = spec if isinstance(spec, dict) else {}
            written = str(spec.get("type", "str"))
            base = written.split(",")[0].split("[")[0].strip().lower()
            properties[name] = {"type": _SCHEMA_TYPES.get(base, "string")} | (
                {"description": spec["description"]} if "description" in spec else {})
            if "optional" not in written and "default" not in spec:
                required.append(name)
        tool["function"]["parameters"] = {"type": "object", "properties": properties, "required": required}


PROBE_CALL_ID = "a1b2c3d4e"  # Mistral's templates refuse call ids that are not 9 characters


def probe_call(name: str, arguments: dict | str, call_id: str | None = PROBE_CALL_ID) -> tuple[list[dict], list[dict]]:
    """The tools and conversation the chat-template probes render to learn how a template writes a call:
    a user turn, an assistant turn calling NAME with ARGUMENTS, the tool's result (callers take as many
    messages as they need); CALL_ID None gives the call and its result no id. The tool declares no
    parameters, so ARGUMENTS' keys show in a rendering only where the call itself writes them."""
    tools = [{"type": "function", "function": {"name": name, "description": "A probe.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    result = {"role": "tool", "name": name, "content": "ok"}
    if call_id is not None:
        call["id"] = result["tool_call_id"] = call_id
    return tools, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}, result]


def _renders(tokenizer, messages: list[dict], tools: list[dict]) -> str:
    """The template's text of MESSAGES, '' where it fails on them."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    except Exception:  # a template without tool calls, or one that refuses this form
        return ""


def per_tokenizer(probe: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """PROBE(tokenizer), found once per chat template and tokenizer: kept on the tokenizer object, and on what
    the answer depends on (the template; the tokenizer's class, name, size and added tokens), so that a copy of
    the tokenizer or the same one loaded again is not probed again. A template set anew is probed anew."""
    answers: dict[tuple, Any] = {}

    @functools.lru_cache(maxsize=8)
    def on_object(tokenizer, template: str | None):
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        key = (template, type(tokenizer).__name__, getattr(tokenizer, "name_or_path", None), len(tokenizer),
               tuple((i, t.content, t.special) for i, t in sorted(added.items())))
        if key not in answers:
            answers[key] = probe(tokenizer)
        return answers[key]

    @functools.wraps(probe)
    def cached(tokenizer):
        template = getattr(tokenizer, "chat_template", None)
        return on_object(tokenizer, template if isinstance(template, str) else None)

    def cache_clear() -> None:
        on_object.cache_clear()
        answers.clear()

    cached.cache_clear = cache_clear
    return cached


def takes_arguments_as_text(tokenizer) -> bool:
    """Whether the chat template writes a call's arguments as the JSON text it is given, not as an object:
    given an object, it fails (string concatenation) or writes the object's Python repr (no `tojson`), while
    JSON text comes out as JSON. Probed once per template."""
    return isinstance(getattr(tokenizer, "chat_template", None), str) and _takes_arguments_as_text(tokenizer)


@per_tokenizer
def _takes_arguments_as_text(tokenizer) -> bool:
    def rendered(arguments) -> str:
        tools, messages = probe_call("sftlab_probe", arguments)
        return _renders(tokenizer, messages[:2], tools)

    as_object = rendered({"sftlab_key": "v"})  # Gemma 4 writes it in a notation of its own: it takes objects
    return '"sftlab_key"' in rendered('{"sftlab_key": "v"}') and (not as_object or "{'sftlab_key': 'v'}" in as_object)


def call_ids_needed(tokenizer) -> str:
    """The call ids the chat template needs: "nine" where it refuses a short one (`call_1`) and takes 9
    alphanumeric characters (Mistral's: "Tool call IDs should be alphanumeric strings with length 9!", or
    ">= 9"); "any" where it fails on a call without one (Apriel 1.5 concatenates it into a call a result
    follows); "" where it needs none. Probed once per template."""
    return _call_ids_needed(tokenizer) if isinstance(getattr(tokenizer, "chat_template", None), str) else ""


@per_tokenizer
def _call_ids_needed(tokenizer) -> str:
    def renders(call_id: str | None) -> bool:
        tools, messages = probe_call("sftlab_probe", {}, call_id)
        return bool(_renders(tokenizer, messages, tools))

    if not renders(PROBE_CALL_ID):  # no calls, or calls in a form the probe does not meet: nothing to give
        return ""
    return "nine" if not renders("call_1") else "any" if not renders(None) else ""


_ALPHANUMERIC = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _nine_characters(key: str) -> str:
    """A 9-character alphanumeric id for KEY, the same in every run (the data cache and serving agree)."""
    number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "".join(_ALPHANUMERIC[number // 62 ** k % 62] for k in range(9))


def _with_call_ids(messages: list[dict], nine: bool) -> list[dict]:
    """MESSAGES with an id on every call and on the tool result that answers it. A call without one gets a
    9-character alphanumeric id for its place in the conversation; with NINE, so does every id that is not
    9 alphanumeric characters (an id given twice, in a call and in its result, gets the same replacement).
    A result without `tool_call_id` answers the call in its place among the calls of the turn before."""
    given: dict[str, str] = {}

    def new_id(old: str | None, place: int) -> str:
        if isinstance(old, str) and (not nine or (len(old) == 9 and old.isascii() and old.isalnum())):
            return old
        key = old if isinstance(old, str) else f"\x00call {place}"
        return given.setdefault(key, _nine_characters(key))

    out, unanswered, place = [], [], 0
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                calls.append(call | {"id": new_id(call.get("id"), place)})
                place += 1
            unanswered = [c["id"] for c in calls]
            m = m | {"tool_calls": calls}
        elif m.get("role") == "tool":
            answered = m.get("tool_call_id")
            answered = new_id(answered, -1) if isinstance(answered, str) else unanswered[0] if unanswered else None
            if answered in unanswered:
                unanswered.remove(answered)
            if answered is not None:
                m = m | {"tool_call_id": answered}
        out.append(m)
    return out


def _text_arguments(call: dict) -> dict:
    arguments = call["function"].get("arguments")
    if not isinstance(arguments, dict):
        return call
    return call | {"function": call["function"] | {"arguments": json.dumps(arguments, ensure_ascii=False)}}


def takes_reasoning_as_block(tokenizer) -> bool:
    """Whether the chat template writes an answer's reasoning only from a `{"type": "thinking"}` block of its
    content, not from `reasoning_content` (Mistral's reasoning templates, Magistral's and Ministral 3's:
    `[THINK]...[/THINK]` then the answer). Probed once per template."""
    return isinstance(getattr(tokenizer, "chat_template", None), str) and _takes_reasoning_as_block(tokenizer)


REASONING_PROBE = "\ue000sftlab-reasoning\ue001"  # reasoning no template writes itself (private-use characters)


@per_tokenizer
def _takes_reasoning_as_block(tokenizer) -> bool:
    def rendered(answer: dict) -> str:
        return _renders(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant"} | answer], None)

    if REASONING_PROBE in rendered({"content": "Hello.", "reasoning_content": REASONING_PROBE}):
        return False
    # not a template that writes a content list as it is, as its Python repr or JSON (LFM2's `content | tojson`)
    text = rendered(_reasoning_block({"content": "Hello.", "reasoning_content": REASONING_PROBE}))
    return "Hello." in text.partition(REASONING_PROBE)[2] and "'type'" not in text and '"type"' not in text


def _reasoning_block(message: dict) -> dict:
    """MESSAGE with its reasoning as a thinking block before its content's text."""
    content = message.get("content")
    blocks = [{"type": "thinking", "thinking": message["reasoning_content"]}]
    blocks += [{"type": "text", "text": content}] if content else []
    return {k: v for k, v in message.items() if k != "reasoning_content"} | {"content": blocks}


def as_template_takes(tokenizer, messages: list[dict]) -> list[dict]:
    """`messages` in the form the chat template takes them: an answer's reasoning as a thinking block where it
    takes it so (`takes_reasoning_as_block`); calls' arguments as JSON text where it takes them so
    (`takes_arguments_as_text`), call ids where it needs them (`call_ids_needed`)."""
    if any(m.get("reasoning_content") for m in messages) and takes_reasoning_as_block(tokenizer):
        messages = [_reasoning_block(m) if m.get("reasoning_content") else m for m in messages]
    if not any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
        return messages
    if needed := call_ids_needed(tokenizer):
        messages = _with_call_ids(messages, nine=needed == "nine")
    if takes_arguments_as_text(tokenizer):
        messages = [m | {"tool_calls": [_text_arguments(c) for c in m["tool_calls"]]} if m.get("tool_calls") else m
                    for m in messages]
    return messages


def call_text(calls: list[dict[str, Any]]) -> str:
    """The calls as one canonical line (for duplicate keys and reports)."""
    return json.dumps([c["function"] for c in calls], sort_keys=True, ensure_ascii=False)
