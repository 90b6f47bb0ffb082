"""Tool calls in generated text, parsed into OpenAI's `tool_calls`, in the layout the model's own chat
template writes them: the layout a model trained on that template generates.

The layout is read off the template, not written out per model family. A probe conversation whose
assistant turn calls a probe function is rendered as training renders it, and its trained tokens are
decoded as the server decodes generated ones (special tokens skipped, a string quote aside). In that
text the probe's name, call id and arguments become slots; rendered with two calls, the text that
repeats per call. One reading covers the Hermes / Qwen `<tool_call>` blocks (`chatml`, Qwen 2.5
and 3), Llama 3.1's bare JSON with `"parameters"`, gpt-oss's `to=functions.NAME ... json{...}`,
Mistral's `[{...}, {...}]`.

Templates that write each argument on its own (Qwen 3.5 and later, Nemotron 3 and Qwen3-Coder's
`<parameter=KEY>VALUE</parameter>`, GLM's `<arg_key>`/`<arg_value>`, other XML parameters) are read
the same way: rendered with one and with two arguments, the text that repeats per argument is
the argument's layout, with slots for its key and value. Such templates write a string value as
it is and other values as JSON (or Python's True/False/None), so a value is read by the type the
request's tool declares for that parameter, as JSON where it declares none. A template that writes
the calls as a Python list of calls (LFM2's `[f(city='Lima', n=2)]`) is read with Python's own parser.
A template that writes a string between two special tokens (Gemma 4's `call:f{city:<|"|>Lima<|"|>,n:2}`)
has that token kept in decoded replies (serve/generation.py `string_quote`), and the arguments
object read in its own notation (`_quoted`). Templates whose calls are none of these have no layout
here: replies to such a model are returned as text.

Two kinds of template cannot write the probe as it first comes, and are probed as training takes their calls
(`_probe_text`): one that writes no tools list (DeepSeek V3 and R1) without one, as training refuses a list the
prompt would not show; one that writes a call's id where its name belongs (Kimi K2, whose models write ids
`functions.NAME:0`) with the probe's id in that form, which training asks of such data. Where a template's call
markers are special tokens, the layout is read without them, as the server decodes a reply (Kimi K2's
`functions.NAME:0{...}`).
"""

from __future__ import annotations

import ast
import itertools
import json
import re
import uuid
from dataclasses import dataclass

from sftlab.serve.generation import per_tokenizer, string_quote, trained_reply

NAME, ARGS, ID = "\x02", "\x01", "\x03"  # slots in a layout: control characters no template writes
KEY, VALUE = "\x04", "\x05"  # slots in an argument's layout
_SLOTS = re.compile(f"([{NAME}{ARGS}{ID}{KEY}{VALUE}])")
_PROBE_NAME, _PROBE_ID, _PROBE_TEXT = "sftlab_probe_fn", "sftlab0id", "sftlab_probe_text"  # Mistral wants 9-character ids
_NAMED_ID = f"functions.{_PROBE_NAME}:{_PROBE_ID}"  # Kimi K2's id form; the number a model writes: the id slot
_PROBE_ARGS = {"sftlab_key_a": "sftlab_value_a"}
_PROBE_ARGS_2 = {"sftlab_key_a": "sftlab_value_a", "sftlab_key_b": "sftlab_value_b"}
_PROBE_TOOL = {"type": "function", "function": {
    "name": _PROBE_NAME, "description": "A probe.",
    "parameters": {"type": "object", "properties": {k: {"type": "string"} for k in _PROBE_ARGS_2}}}}
_WORD = r"\w[\w.:\-]*"  # a function name or a call id, as generated (not the end of a sentence before it)
MAX_CALLS = 32


@dataclass(frozen=True)
class CallLayout:
    """How one chat template writes an assistant turn's calls: `first` with one call (slots for its
    name, id and arguments), `repeat` inserted at `at` for each further call ('' when the template
    writes one call per turn). `argument`: where the arguments slot holds arguments written one by
    one, the layout of one (slots for its key and value); '' where it holds a JSON object, or with
    `quote` (the special token the template writes strings between) an object in its notation."""

    first: str
    repeat: str = ""
    at: int = 0
    argument: str = ""
    quote: str = ""

    def for_calls(self, n: int) -> str:
        return self.first[:self.at] + self.repeat * (n - 1) + self.first[self.at:]

    @property
    def opener(self) -> str:
        """The text a reply's calls begin with (up to its first whitespace or slot), '' when they begin
        with a slot: a streamed reply is held back from there."""
        head = _SLOTS.split(self.first, 1)[0]
        return head.split()[0] if head.split() else ""

    def parse(self, text: str, tools: list[dict] | None = None) -> tuple[str | None, list[dict]]:
        """(the content before the calls, or None when there is none; the calls). Text that is not, from
        where the first call begins to its end, calls in this layout (unclosed, not JSON, arguments not an
        object, text after or between them) is content, with no calls. `tools` (the request's) give
        the types of arguments written one by one."""
        head = _SLOTS.split(self.first, 1)[0].strip()
        found = re.search(_literal(head), text) if head else re.match(r"\s*", text)
        if found:
            start, types = found.start() if head else found.end(), _parameter_types(tools)
            for n in range(1, (MAX_CALLS if self.repeat else 1) + 1):
                calls = _match(self.for_calls(n), text, start, self.argument, types, self.quote)
                if calls is not None:
                    return text[:start].strip() or None, calls
        return text, []


def _literal(text: str) -> str:
    """A regex for template text, whitespace-tolerant: a run of whitespace (or none) where it has one."""
    if not text.strip():
        return r"\s*"
    core = r"\s*".join(re.escape(piece) for piece in text.split())
    return (r"\s*" if text[0].isspace() else "") + core + (r"\s*" if text[-1].isspace() else "")


def _match(layout: str, text: str, pos: int, argument: str = "", types: dict | None = None,
           quote: str = "") -> list[dict] | None:
    """The calls when `text[pos:]` is exactly `layout` (trailing whitespace aside), else None.
    `argument`, `types`: as `_arguments` reads them; `quote`: as `_value_at` reads arguments."""
    parts = _SLOTS.split(layout)
    names_per_call = layout.count(NAME) // layout.count(ARGS)  # gpt-oss-like headers may repeat the name
    names, arguments = [], []
    for k, part in enumerate(parts):
        if part == ARGS and argument:
            value, pos = _arguments(text, pos, argument, parts[k + 1] if k + 1 < len(parts) else "",
                                    (types or {}).get(names[-1] if names else None, {}))
            arguments.append(value)
        elif part == ARGS:
            try:
                value, pos = _value_at(text, pos, quote)
            except ValueError:
                return None
            value = _object(value)
            if value is None:
                return None
            arguments.append(value)
        elif part in (NAME, ID):  # up to the template text after it (gpt-oss: "NAMEcommentary")
            after = parts[k + 1] if k + 1 < len(parts) else ""
            word = f"({_WORD}?)(?={_literal(after)})" if after.strip() else f"({_WORD})"
            m = re.compile(word).match(text, pos)
            if m is None:
                return None
            if part == NAME:  # a call id is matched, not kept: the reply's calls get ids of their own
                names.append(m.group(1))
            pos = m.end()
        elif part:
            m = re.compile(_literal(part)).match(text, pos)
            if m is None:
                return None
            pos = m.end()
    if text[pos:].strip() or not arguments:
        return None
    per_call = names[::names_per_call]
    if any(name != per_call[i // names_per_call] for i, name in enumerate(names)):
        return None  # each call's copies of its name agree
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
            for name, args in zip(per_call, arguments)]


def _value_at(text: str, pos: int, quote: str = "") -> tuple[object, int]:
    """The value written from `pos` (whitespace before it aside) and where it ends: JSON, or with `quote`
    the template's own notation (`_quoted`). ValueError where there is none."""
    pos = _SPACE.match(text, pos).end()
    return _quoted(text, pos, quote) if quote else json.JSONDecoder().raw_decode(text, pos)


_SPACE = re.compile(r"\s*")
_KEY = re.compile(r"\s*([^:,{}\[\]]+?)\s*:")
_SCALAR = re.compile(r"[^,{}\[\]\s]+")
_WORDS = {"true": True, "false": False, "None": None}  # as the template writes booleans, as Jinja prints None


def _quoted(text: str, pos: int, quote: str) -> tuple[object, int]:
    """The value at `pos` in the notation of a template that writes strings between `quote` tokens, and
    where it ends; ValueError where there is none. The inverse of Gemma 4's: `{key:value,...}` with bare
    keys, `[value,...]`, a string as it is between quotes, true/false, numbers and None as Jinja prints them."""
    pos = _SPACE.match(text, pos).end()
    if text.startswith(quote, pos):
        end = text.find(quote, pos + len(quote))
        if end < 0:
            raise ValueError("an unclosed string")
        return text[pos + len(quote):end], end + len(quote)
    if text.startswith(("{", "["), pos):
        keyed, close = text[pos] == "{", "}" if text[pos] == "{" else "]"
        items, pos = [], _SPACE.match(text, pos + 1).end()
        more = not text.startswith(close, pos)  # not an empty {} or []
        while more:
            key = _KEY.match(text, pos) if keyed else None
            if keyed and key is None:
                raise ValueError("an entry without a key")
            value, pos = _quoted(text, key.end() if key else pos, quote)
            items.append((key and key.group(1), value))
            pos = _SPACE.match(text, pos).end()
            more = text.startswith(",", pos)
            pos += more
        if not text.startswith(close, pos):
            raise ValueError(f"no closing {close}")
        return (dict(items) if keyed else [value for _, value in items]), pos + 1
    word = _SCALAR.match(text, pos)
    if word is None:
        raise ValueError("no value")
    value = _WORDS[word.group()] if word.group() in _WORDS else json.loads(word.group())
    if isinstance(value, str):
        raise ValueError(f"a string outside quotes: {word.group()}")
    return value, word.end()


def _arguments(text: str, pos: int, argument: str, after: str, types: dict[str, str]) -> tuple[dict, int]:
    """The arguments written one by one in `argument`'s layout from `pos` (none is no arguments), and
    where they end. A value runs to the first end of its layout that is followed by another
    argument or by `after`, the layout's text after the arguments (so it may hold the layout's own
    closing tags); it is read as `types` (parameter -> JSON type) declares it."""
    head, _, mid, _, tail = _SLOTS.split(argument)
    ahead = "|".join([_literal(head), _literal(after) if after.strip() else r"\s*\Z"])
    one = re.compile(f"{_literal(head)}([^\\n]+?){_literal(mid)}(?s:(.*?)){_literal(tail)}(?={ahead})")
    arguments = {}
    while m := one.match(text, pos):
        arguments[m.group(1)] = _value(m.group(2), types.get(m.group(1)))
        pos = m.end()
    return arguments, pos


def _value(text: str, declared: str | list | None):
    """A value written as text: as it is where the tool declares a string; otherwise JSON where it parses
    (Python's True/False/None too, as a template's `| string` writes them), else the text."""
    kinds = declared if isinstance(declared, list) else [declared]
    if "string" in kinds:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"True": True, "False": False, "None": None}.get(text.strip(), text)


def _parameter_types(tools: list[dict] | None) -> dict[str, dict]:
    """{function name: {parameter: its declared JSON type}} from a request's tools."""
    out = {}
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            properties = (function.get("parameters") or {}).get("properties") or {}
            out[function["name"]] = {k: v.get("type") for k, v in properties.items() if isinstance(v, dict)}
    return out


def _object(arguments) -> dict | None:
    """A call's arguments as an object (generated as one or as a JSON string of one), else None."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return arguments if isinstance(arguments, dict) else None


@dataclass(frozen=True)
class PythonCalls:
    """Calls written as a Python list of calls, `[get_weather(city='Lima'), f(n=2)]`, read with Python's
    parser: keyword arguments only, values Python literals (JSON's true/false/null too, as templates
    write nested objects with `tojson`). `first`: the probe's text, its name a slot."""

    first: str
    opener = "["

    def parse(self, text: str, tools: list[dict] | None = None) -> tuple[str | None, list[dict]]:
        """(content before the calls or None; the calls): the calls are the text from a '[' to its end."""
        for m in re.finditer(r"\[", text):
            calls = _python_calls(text[m.start():])
            if calls:
                return text[:m.start()].strip() or None, calls
        return text, []


_JSON_NAMES = {"true": True, "false": False, "null": None}


def _python_calls(text: str) -> list[dict] | None:
    """The calls when `text` is exactly a Python list of calls with keyword arguments, else None. Line
    breaks may be raw inside a string (LFM2's template quotes strings without escaping them)."""
    for source in (text.strip(), text.strip().replace("\n", "\\n")):
        try:
            tree = ast.parse(source, mode="eval").body
            break
        except (SyntaxError, ValueError):
            continue
    else:
        return None
    if not isinstance(tree, ast.List):
        return None
    calls = []
    for node in tree.elts:
        name = _dotted(node.func) if isinstance(node, ast.Call) and not node.args else None
        if name is None or any(k.arg is None for k in node.keywords):
            return None
        try:
            arguments = {k.arg: _python_value(k.value) for k in node.keywords}
        except ValueError:
            return None
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return calls


def _dotted(node) -> str | None:
    """`f` or `convert.currency` from a call's function expression, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def _python_value(node):
    """A literal's value (ValueError for anything else), JSON's true/false/null included."""
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_python_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** in a dict")
        return {_python_value(k): _python_value(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


@dataclass(frozen=True)
class CallParser:
    """Every layout a template writes calls in: with content before them, and without (gpt-oss writes
    the content as a message of its own, so its calls alone begin otherwise)."""

    layouts: tuple[CallLayout | PythonCalls, ...]

    @property
    def openers(self) -> list[str]:
        return [o for o in dict.fromkeys(layout.opener for layout in self.layouts) if o]

    def parse(self, text: str, tools: list[dict] | None = None) -> tuple[str | None, list[dict]]:
        """(content before the calls or None; the calls) in the first layout that reads any, else (text, []).
        `tools`: the request's, for the types of arguments written one by one."""
        for layout in self.layouts:
            content, calls = layout.parse(text, tools)
            if calls:
                return content, calls
        return text, []


@per_tokenizer
def call_parser(tokenizer) -> CallParser | None:
    """The reader of the calls the tokenizer's chat template writes, or None when it writes no calls, or
    writes their arguments in a way this module cannot read (module docstring)."""
    # a call turn as the last message and followed by its result: Apriel 1.5 writes a call's id only in the
    # latter, where training has its call turns, so a base model and one trained on such data differ
    layouts = [_layout(tokenizer, content, answered) for content in (_PROBE_TEXT, "") for answered in (True, False)]
    layouts = list(dict.fromkeys(layout for layout in layouts if layout is not None))
    # where one layout is the other with text before the calls (Qwen 3's empty think block without
    # content; gpt-oss's message header after its content), the calls begin where the shorter does
    layouts = [a for a in layouts if not any(b != a and a.first.endswith(b.first) for b in layouts)]
    return CallParser(tuple(layouts)) if layouts else None


def _layout(tokenizer, content: str, answered: bool) -> CallLayout | PythonCalls | None:
    def probe(calls: int, arguments: dict = _PROBE_ARGS) -> str | None:
        return _probe_text(tokenizer, calls, content, arguments, answered)

    text, quote = probe(1), string_quote(tokenizer)
    one, argument = _slotted(text, quote), ""
    calls = _python_calls(text) if one is None and text else None
    if calls and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
            [(_PROBE_NAME, _PROBE_ARGS)]:
        return PythonCalls(text.replace(_PROBE_NAME, NAME))
    if one is None:  # arguments not a JSON object: written one by one?
        argument = _repeated(_keys_slotted(text), _keys_slotted(probe(1, _PROBE_ARGS_2)), (KEY, VALUE))[1]
        if not argument or not _SLOTS.split(argument)[0].strip() or _SLOTS.findall(argument) != [KEY, VALUE]:
            return None
        one = _arguments_slotted(text, argument)
    if one is None or one.count(ARGS) != 1 or NAME not in one:
        return None
    two = _arguments_slotted(probe(2), argument) if argument else _slotted(probe(2), quote)
    if two is None or two.count(ARGS) != 2:  # one call per turn (gpt-oss), or two written otherwise
        return CallLayout(one, "", len(one), argument, quote)
    at, repeat = _repeated(one, two, (NAME, ARGS, ID))
    return CallLayout(one, repeat, at if repeat else len(one), argument, quote)


def _repeated(one: str | None, two: str | None, slots: tuple[str, ...]) -> tuple[int, str]:
    """(where, what): `two` is `one` with `what` inserted at `where`, `what` holding each of `slots`
    as often as `one` does; (0, '') when it is not."""
    if one is None or two is None:
        return 0, ""
    grow = len(two) - len(one)
    for at in range(len(one) + 1):
        repeat = two[at:at + grow]
        if two[:at] == one[:at] and two[at + grow:] == one[at:] and all(
                repeat.count(s) == one.count(s) for s in slots):
            return at, repeat
    return 0, ""


def _probe_text(tokenizer, calls: int, content: str, arguments: dict, answered: bool) -> str | None:
    """What the template trains for an assistant turn of `content` and `calls` probe calls (from the end
    of the content), the last message or `answered` by the calls' results, decoded as generated text is;
    None if it cannot write that turn. The first of the probe's forms that training takes (module docstring):
    with the tools list, then without; the probe's id, then `_NAMED_ID`."""
    for call_id, meta in itertools.product((_PROBE_ID, _NAMED_ID), ({"tools": [_PROBE_TOOL]}, {})):
        call = {"id": call_id, "type": "function", "function": {"name": _PROBE_NAME, "arguments": dict(arguments)}}
        results = [{"role": "tool", "tool_call_id": call_id, "name": _PROBE_NAME, "content": "ok"}] * calls * answered
        text = trained_reply(tokenizer, [{"role": "user", "content": "Hi."},
                                         {"role": "assistant", "content": content, "tool_calls": [dict(call)] * calls},
                                         *results], "the tool-call probe", meta)
        if text is not None:
            break
    if text is None or content and content not in text:
        return None
    return (text.split(content, 1)[1] if content else text).strip()


def _slotted(text: str | None, quote: str = "") -> str | None:
    """The probe's text with its arguments, name and id replaced by slots; None when the arguments are
    not written as an object (JSON, or with `quote` the template's notation)."""
    if text is None:
        return None
    out, pos = [], 0
    for m in re.finditer(r"\{", text):
        if m.start() < pos:
            continue
        try:
            value, end = _value_at(text, m.start(), quote)
        except ValueError:
            continue
        if value == _PROBE_ARGS:
            out += [text[pos:m.start()], ARGS]
            pos = end
    out.append(text[pos:])
    slotted = "".join(out)
    return slotted.replace(_PROBE_NAME, NAME).replace(_PROBE_ID, ID) if ARGS in slotted else None


def _keys_slotted(text: str | None) -> str | None:
    """The probe's text with its argument keys and values replaced by slots; None where a value is not
    written as it is (quoted, as a Python-style call writes strings)."""
    if text is None:
        return None
    for value in _PROBE_ARGS_2.values():
        if any(text[m.start() - 1:m.start()] in "'\"" or text[m.end():m.end() + 1] in ("'", '"')
               for m in re.finditer(value, text) if m.start()):
            return None
        text = text.replace(value, VALUE)
    for key in _PROBE_ARGS_2:
        text = text.replace(key, KEY)
    return text


def _arguments_slotted(text: str | None, argument: str) -> str | None:
    """The probe's text with each call's arguments, written in `argument`'s layout, replaced by one
    arguments slot (and its name and id by theirs)."""
    text = _keys_slotted(text)
    if text is None or KEY in text.replace(argument, ""):
        return None
    return text.replace(argument, ARGS).replace(_PROBE_NAME, NAME).replace(_PROBE_ID, ID)
