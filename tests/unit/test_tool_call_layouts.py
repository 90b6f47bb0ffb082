"""The server reads a reply's tool calls in the layout the model's own chat template writes them,
read off the template (serve/tool_calls.py), on the vendors' templates that TRL installs: what
training teaches for a turn of calls, decoded as the server decodes a reply, parses back to exactly
those calls; text that is not calls in that layout stays text."""

from __future__ import annotations

import json

import pytest

from sftlab.data.conversation import Conversation
from sftlab.data.render import IGNORE, render
from sftlab.serve.generation import IncrementalDecoder, stop_token_ids
from sftlab.serve.tool_calls import call_parser
from conftest import tokenizer_for
from test_data_render import trained_runs
from test_render_tool_calls import EXPECTED, RECORD, WEATHER

ANY = {"name": "convert.currency", "description": "Convert money",
       "parameters": {"type": "object", "properties": {"amount": {"type": "number"}}}}


def call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}, "id": "abc123XYZ"}


CALLS = [call("get_weather", {"city": "Lima"}),
         call("convert.currency", {"amount": 40.5, "to": ["JPY", "EUR"], "note": "dé {\"x\": 1} </tool_call>",
                                   "options": {"round": True, "digits": None}})]

TOOLS = [{"type": "function", "function": f} for f in (WEATHER, ANY)]
# template -> how many calls it writes in one turn (gpt-oss and Llama 3.1 write one)
JSON_LAYOUTS = {"chatml": 2, "qwen2_5.jinja": 2, "qwen3.jinja": 2, "qwen3_instruct_2507.jinja": 2,
                "llama3_1.jinja": 1, "llama3_2.jinja": 1, "gptoss.jinja": 1}
# arguments one by one: <parameter=KEY>, <arg_key>/<arg_value>, <atem:parameter name="KEY">
ARGUMENT_LAYOUTS = {"qwen3_5_nothink.jinja": 2, "qwen3_5_think.jinja": 2, "qwen3_8.jinja": 2, "glm4moe.jinja": 2,
                    "nemotron_3_nano.jinja": 2, "muse_glimmer.jinja": 2}
PYTHON_LAYOUTS = {"lfm2_2_5.jinja": 2, "lfm2_v2.jinja": 2}  # [f(a='x'), g(n=2)]
# call:f{key:<|"|>text<|"|>,n:2}: strings between a special token that decoding keeps
NOTATION_LAYOUTS = {"gemma4.jinja": 2}
LAYOUTS = JSON_LAYOUTS | ARGUMENT_LAYOUTS | PYTHON_LAYOUTS | NOTATION_LAYOUTS


def generated_text(tok, calls: list[dict], content: str = "", tools: list[dict] | None = TOOLS) -> str:
    """What a model trained on the template generates for a turn with these calls: its trained tokens
    (the end-of-turn token aside), decoded as the server decodes a reply. `tools` None: data without a
    tools list (what training takes for a template that writes none)."""
    conv = Conversation([{"role": "user", "content": "Is it warm in Lima?"},
                         {"role": "assistant", "content": content, "tool_calls": calls}],
                        meta={"tools": tools} if tools else {})
    example = render(conv, tok)
    stops, decoder = set(stop_token_ids(tok)), IncrementalDecoder(tok)
    return "".join(decoder.add(t) for t, label in zip(example.input_ids, example.labels)
                   if label != IGNORE and t not in stops)


def as_sent(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_what_a_template_trains_for_calls_reads_back_as_those_calls(tokenizer, name):
    tok = tokenizer_for(tokenizer, name)
    parser = call_parser(tok)
    assert parser is not None
    for n in range(1, LAYOUTS[name] + 1):
        content, calls = parser.parse(generated_text(tok, CALLS[:n]), TOOLS)
        assert as_sent(calls) == [(c["function"]["name"], c["function"]["arguments"]) for c in CALLS[:n]]
        assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
        assert content is None or "Lima" not in content  # nothing of the calls is left in the content
    assert len({c["id"] for c in parser.parse(generated_text(tok, CALLS[:LAYOUTS[name]]), TOOLS)[1]}) == LAYOUTS[name]


@pytest.mark.parametrize("name", sorted(ARGUMENT_LAYOUTS | PYTHON_LAYOUTS))
def test_arguments_written_one_by_one_are_read_by_their_declared_types(tokenizer, name):
    """Such templates write a string as it is and a number, boolean or list as text too: the tool's
    declared type decides ("40" stays a string where the parameter is one), JSON where none is declared.
    A value may hold the layout's own closing tag; a call without arguments has none; content before
    the calls is the message content."""
    tok = tokenizer_for(tokenizer, name)
    parser = call_parser(tok)
    tool = {"name": "book", "parameters": {"type": "object", "properties": {
        "room": {"type": "string"}, "note": {"type": "string"}, "nights": {"type": "integer"}, "late": {"type": "boolean"},
        "tags": {"type": ["array", "null"]}}}}
    closing = "a </parameter> b </arg_value> c </atem:parameter>\nd"  # each layout's own end of a value
    sent = call("book", {"room": "40", "note": closing, "nights": 3, "late": True, "tags": ["quiet"], "extra": 2.5})
    content = "" if name == "muse_glimmer.jinja" else "Booking it."  # it drops a call turn's text
    text = generated_text(tok, [sent, call("book", {})], content=content)
    said, calls = parser.parse(text, [{"type": "function", "function": tool}])
    assert as_sent(calls) == [("book", sent["function"]["arguments"]), ("book", {})]
    assert (said or "").endswith(content)  # after a think block where the template writes one
    untyped = json.loads(parser.parse(text)[1][0]["function"]["arguments"])
    assert untyped["room"] == ("40" if name in PYTHON_LAYOUTS else 40)  # without tools: JSON where it parses


def test_content_before_the_calls_is_the_message_content(tokenizer):
    tok = tokenizer_for(tokenizer, "qwen2_5.jinja")
    content, calls = call_parser(tok).parse(generated_text(tok, CALLS, content="Let me check."))
    assert content == "Let me check." and as_sent(calls)[0] == ("get_weather", {"city": "Lima"})


def test_a_template_without_tools_has_no_parser(tokenizer):
    assert call_parser(tokenizer) is None  # SmolLM2's own template


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',  # arguments not an object
    '<tool_call>\n{"name": "f", "arguments": "x=1"}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}',  # unclosed
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call> and more text',  # text after the calls
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\nbetween\n<tool_call>\n{"name": "g", "arguments": {}}\n'
    '</tool_call>',
    "I would write <tool_call> here, but this is an answer.",
])
def test_text_that_is_not_calls_in_the_layout_stays_text(tokenizer, text):
    assert call_parser(tokenizer_for(tokenizer, "chatml")).parse(text) == (text, [])


@pytest.mark.parametrize("text", [
    "[get_weather(city='Lima'), import_os()",  # unclosed
    "[get_weather('Lima')]",  # a positional argument
    "[get_weather(city=open('x'))]",  # not a literal
    "[get_weather(**{'city': 'Lima'})]",
    "[1, 2] is a list",
    "[get_weather(city='Lima')] and more text",
])
def test_text_that_is_not_a_python_list_of_calls_stays_text(tokenizer, text):
    assert call_parser(tokenizer_for(tokenizer, "lfm2_2_5.jinja")).parse(text) == (text, [])


def test_a_reply_may_vary_the_layout_s_whitespace_and_give_arguments_as_a_json_string(tokenizer):
    parser = call_parser(tokenizer_for(tokenizer, "chatml"))
    text = '  <tool_call>{"name":"f","arguments":"{\\"a\\": 1}"}</tool_call>\n  <tool_call>\n {"name": "g",  "arguments": {}}</tool_call>\n'
    content, calls = parser.parse(text)
    assert content is None and as_sent(calls) == [("f", {"a": 1}), ("g", {})]
    assert parser.openers == ["<tool_call>"]


def test_llama_writes_parameters_and_gpt_oss_the_name_in_its_header(tokenizer):
    llama = call_parser(tokenizer_for(tokenizer, "llama3_1.jinja"))
    assert as_sent(llama.parse('{"name": "f", "parameters": {"a": 1}}')[1]) == [("f", {"a": 1})]
    assert llama.parse('{"name": "f", "arguments": {"a": 1}}')[1] == []  # not how Llama 3.1 writes calls
    gpt = call_parser(tokenizer_for(tokenizer, "gptoss.jinja"))
    assert as_sent(gpt.parse(' to=functions.get_weathercommentary json{"city": "Lima"}')[1]) == \
        [("get_weather", {"city": "Lima"})]


def test_gemma_4_strings_keep_their_quote_token_and_every_value_reads_back(tokenizer):
    """Gemma 4 writes a string between `<|"|>` tokens, as it is (commas, braces, quotes, colons, line
    breaks), keys bare, true/false, numbers and None as Jinja prints them: decoding keeps that token
    alone of the special tokens, and the parser is the template's inverse, nested values included."""
    tok = tokenizer_for(tokenizer, "gemma4.jinja")
    text = generated_text(tok, [call("get_weather", {"city": "Lima"})])
    assert text == 'call:get_weather{city:<|"|>Lima<|"|>}'  # <|tool_call>, <tool_call|> dropped
    sent = {"text": 'a, b} {c: "d"} [e]: f}\nnew line', "empty": "", "n": -3, "x": 2.5e-07,
            "yes": True, "no": False, "none": None, "list": [1, "two", [], {}, [{"k": "v", "m": [False]}]],
            "deep": {"a": {"b": {"c": "é,ü"}}, "n": 0}}
    assert as_sent(call_parser(tok).parse(generated_text(tok, [call("f", sent), call("g", {})]))[1]) == \
        [("f", sent), ("g", {})]


def test_text_before_gemma_4_calls_is_the_content(tokenizer):
    tok = tokenizer_for(tokenizer, "gemma4.jinja")
    content, calls = call_parser(tok).parse("Let me check: {both}.\n" + generated_text(tok, CALLS))
    assert content == "Let me check: {both}." and as_sent(calls) == [(c["function"]["name"], c["function"]["arguments"])
                                                                    for c in CALLS]


@pytest.mark.parametrize("text", [
    'call:f{a:<|"|>x}',  # unclosed string
    "call:f{a:Lima}",  # a string outside quotes
    'call:f{a:<|"|>x<|"|>,}',  # an entry without a key
    "call:f{a:1",  # unclosed
    "call:f{[1]}",
    'call:f{a:1} and more text',
    "I would write call: here, but this is an answer.",
])
def test_text_that_is_not_calls_in_gemma_4_s_notation_stays_text(tokenizer, text):
    assert call_parser(tokenizer_for(tokenizer, "gemma4.jinja")).parse(text) == (text, [])


@pytest.mark.parametrize("name", ["chatml", "qwen3.jinja", "gptoss.jinja", "lfm2_2_5.jinja"])
def test_other_templates_decode_a_reply_as_before(tokenizer, name):
    """Only a template that writes strings between a special token keeps one in a reply: elsewhere every
    special token is dropped, as `decode` drops them."""
    tok = tokenizer_for(tokenizer, name)
    ids = tok(" x ".join(t.content for t in tok.added_tokens_decoder.values()), add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tok)
    assert "".join(decoder.add(t) for t in ids) == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_generation_stops_where_training_ends_a_call_turn(tokenizer, name):
    """The token each template ends a call turn with (gpt-oss `<|call|>`, GLM `<|observation|>`, Gemma 4
    `<|tool_response>`, the end-of-turn elsewhere) is a stop token of evaluation and serving: a model
    that calls a tool stops for the result instead of writing one itself."""
    from sftlab.data.formats import to_conversation

    tok = tokenizer_for(tokenizer, name)
    call_turn = trained_runs(render(to_conversation(RECORD, "tools.jsonl:1"), tok))[0]
    assert call_turn[-1] in stop_token_ids(tok), tok.convert_ids_to_tokens(call_turn[-1:])


def test_evaluation_compares_gemma_4_calls_with_their_string_quotes(tokenizer):
    """Evaluation decodes references and answers as the server decodes a reply: Gemma 4's string quote
    kept (dropped, the call to f with "2" and the call with 2 read alike, and neither parsed back)."""
    from sftlab.evaluation.evaluate import reference_texts
    from sftlab.evaluation.generate import answers

    tok = tokenizer_for(tokenizer, "gemma4.jinja")
    ask = [{"role": "user", "content": "Is it warm in Lima?"}]
    refs = reference_texts([Conversation(ask + [{"role": "assistant", "content": "", "tool_calls": [call("f", {"n": n})]}],
                                         meta={"tools": TOOLS}) for n in ("2", 2)], tok)
    assert refs == ['call:f{n:<|"|>2<|"|>}', "call:f{n:2}"]
    example = render(Conversation(ask + [{"role": "assistant", "content": "", "tool_calls": [call("f", {"n": "2"})]}],
                                  meta={"tools": TOOLS}), tok)
    stops = set(stop_token_ids(tok))
    reply = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE and t not in stops]
    assert answers(tok, [reply], [ask], [TOOLS]) == [refs[0]]
    assert as_sent(call_parser(tok).parse(refs[0])[1]) == [("f", {"n": "2"})]


def test_a_template_that_writes_a_call_s_id_only_once_a_result_follows_reads_calls_with_and_without_it(tokenizer):
    """Apriel 1.5 writes `, "id": ...` in a call turn only when it is not the last message: training (call turns
    are followed by their results) teaches calls with ids, a base model writes them without."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{%- if tools %}{{ tools | tojson }}{% endif -%}"
        "{%- for m in messages -%}{%- set last = loop.last -%}"
        "{%- if m.role == 'assistant' and m.tool_calls -%}assistant: <calls>["
        "{%- for c in m.tool_calls -%}{{ '{\"name\": \"' + c.function.name + '\", \"arguments\": ' }}"
        "{{- c.function.arguments | tojson }}{{ '' if last else ', \"id\": \"' + c.id + '\"' }}{{ '}' }}"
        "{%- if not loop.last %}, {% endif -%}{%- endfor -%}]</calls><|im_end|>"
        "{%- elif m.role == 'tool' -%}<result>{{ m.content }}</result>"
        "{%- else -%}{{ m.role }}: {{ m.content }}<|im_end|>{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt %}assistant: {% endif -%}")
    parser = call_parser(tok)
    for text in ('<calls>[{"name": "get_weather", "arguments": {"city": "Lima"}, "id": "abc123XYZ"}]</calls>',
                 '<calls>[{"name": "get_weather", "arguments": {"city": "Lima"}}]</calls>'):
        content, calls = parser.parse(text)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
            [("get_weather", {"city": "Lima"})], text
