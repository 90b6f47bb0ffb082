"""Tool calls in the layouts of DeepSeek V3 and Kimi K2, read off their templates as every other layout is
(serve/tool_calls.py): what training teaches for a turn of calls, decoded as the server decodes a reply,
parses back to exactly those calls, the content before them kept; text that is not calls stays text.

DeepSeek V3 (TRL's `deepseekv3.jinja`) writes no tools list, so training takes its calls without one; its
`<｜...｜>` markers are added tokens of its tokenizer, here special or not, so the layout is read with them
and, dropped in decoding, without them. Kimi K2's template is not installed with TRL: `KIMI` is a short
template written for these tests in its layout (a call's id where its name belongs, `<|tool_call_begin|>ID
<|tool_call_argument_begin|>{...}<|tool_call_end|>`, special tokens that decoding drops), and its calls have
ids in the form Kimi K2's models write, `functions.NAME:IDX`, as training asks of such data."""

from __future__ import annotations

import copy
import re

import pytest
from tokenizers import AddedToken

from sftlab.serve.tool_calls import call_parser
from conftest import tokenizer_for
from test_tool_call_layouts import CALLS, TOOLS, as_sent, generated_text

KIMI = (
    "{%- if tools %}<|im_system|>tools<|im_middle|>{{ tools | tojson }}<|im_end|>{% endif -%}"
    "{%- for m in messages -%}<|im_{{ m.role }}|>{{ m.role }}<|im_middle|>"
    "{%- if m.role == 'assistant' and m.tool_calls -%}{{ m.content or '' }}<|tool_calls_section_begin|>"
    "{%- for c in m.tool_calls -%}<|tool_call_begin|>{{ c.id }}<|tool_call_argument_begin|>"
    "{{- c.function.arguments | tojson }}<|tool_call_end|>{%- endfor -%}<|tool_calls_section_end|>"
    "{%- else -%}{{ m.content }}{%- endif -%}<|im_end|>{%- endfor -%}"
    "{%- if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif -%}")


def deepseek(base, special: bool):
    """SmolLM2's tokenizer with DeepSeek V3's template and its `<｜...｜>` tokens: the turn markers special,
    the tool-call markers special or not."""
    tok = tokenizer_for(base, "deepseekv3.jinja")
    markers = sorted(set(re.findall(r"<｜[^｜<>]+｜>", tok.chat_template)))
    tok.add_tokens([AddedToken(m, special=special or "tool" not in m, normalized=False) for m in markers])
    return tok


def kimi(base):
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"additional_special_tokens": sorted(set(re.findall(r"<\|\w+\|>", KIMI)))})
    tok.chat_template, tok.name_or_path = KIMI, "kimi-k2-layout"
    return tok


def kimi_ids(calls: list[dict], first: int = 0) -> list[dict]:
    return [c | {"id": f"functions.{c['function']['name']}:{first + k}"} for k, c in enumerate(calls)]


CASES = {"deepseekv3, markers special": lambda base: (deepseek(base, True), CALLS, None),
         "deepseekv3, markers not special": lambda base: (deepseek(base, False), CALLS, None),
         "kimi k2 layout": lambda base: (kimi(base), kimi_ids(CALLS), TOOLS)}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("content", ["", "Let me check."])
def test_what_the_template_trains_for_calls_reads_back_as_those_calls(tokenizer, case, content):
    tok, calls, tools = CASES[case](tokenizer)
    parser = call_parser(tok)
    assert parser is not None
    for n in (1, 2, 3):
        sent = (calls * 2)[:n]
        said, got = parser.parse(generated_text(tok, sent, content, tools), TOOLS)
        assert as_sent(got) == [(c["function"]["name"], c["function"]["arguments"]) for c in sent]
        assert said == (content or None)


def test_deepseek_calls_are_read_with_their_markers_kept_or_dropped(tokenizer):
    kept, dropped = deepseek(tokenizer, False), deepseek(tokenizer, True)
    text = generated_text(kept, CALLS[:1], tools=None)
    assert text == ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n'
                    '{"city": "Lima"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
    assert generated_text(dropped, CALLS[:1], tools=None) == 'functionget_weather\n```json\n{"city": "Lima"}\n```'
    assert call_parser(kept).openers == ["<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"]
    assert call_parser(dropped).openers == ["function"]
    # dropped, calls begin at the first `function`: one in the content is where they would, so the reply is text
    # (as text between calls is), not a call named `.functionget_weather`
    for tok, expected in ((kept, [("get_weather", {"city": "Lima"})]), (dropped, [])):
        assert as_sent(call_parser(tok).parse(generated_text(tok, CALLS[:1], "Check the function.", None))[1]) == \
            expected


def test_kimi_calls_later_in_a_conversation_count_on_and_stream_from_functions(tokenizer):
    """Kimi K2's models number calls across a conversation: a later turn's first call is not `:0`."""
    tok = kimi(tokenizer)
    text = generated_text(tok, kimi_ids(CALLS, first=3), "Both.")
    assert text.startswith("Both.functions.get_weather:3{")  # the markers are special tokens, dropped
    assert as_sent(call_parser(tok).parse(text)[1]) == [(c["function"]["name"], c["function"]["arguments"])
                                                       for c in CALLS]
    assert call_parser(tok).openers == ["functions."]


@pytest.mark.parametrize("case, text", [
    ("deepseekv3, markers special", "A function is a mapping."),
    ("deepseekv3, markers special", 'functionf\n```json\n{"a": 1}\n``` and more text'),
    ("deepseekv3, markers special", 'functionf\n```json\n[1]\n```'),
    ("deepseekv3, markers not special", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n'
                                        '{"a": 1}\n```'),  # unclosed
    ("kimi k2 layout", "Call functions.f:0 when asked."),
    ("kimi k2 layout", 'functions.f:0{"a": 1'),
    ("kimi k2 layout", 'functions.f:0{"a": 1} then text'),
])
def test_text_that_is_not_calls_in_the_layout_stays_text(tokenizer, case, text):
    assert call_parser(CASES[case](tokenizer)[0]).parse(text) == (text, [])


def test_a_kimi_call_id_in_another_form_is_not_a_call(tokenizer):
    """The layout reads ids as the probe wrote them, `functions.NAME:ID`: a bare id carries no name."""
    text = 'abc123XYZ{"city": "Lima"}'
    assert call_parser(kimi(tokenizer)).parse(text) == (text, [])
    assert as_sent(call_parser(kimi(tokenizer)).parse('functions.f:7{"x": [1]}')[1]) == [("f", {"x": [1]})]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_server_returns_the_calls_as_tool_calls(tokenizer, case, stream):
    """Through the OpenAI server: the content before the calls is the content (streamed, the call text is held
    back from where calls begin), the calls come back as `tool_calls`. DeepSeek V3's template writes no tools
    list: a request offering tools is served all the same (its tools are not in the prompt), not refused."""
    import json

    from conftest import client_for

    tok, calls, tools = CASES[case](tokenizer)
    # DeepSeek V3's prompt opens a reasoning block: the reply closes it first
    thought = "I check.</think>" if case.startswith("deepseek") else ""
    client, backend = client_for(tok, thought + generated_text(tok, calls, "Checking both.", tools))
    resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], tools=TOOLS,
                                          stream=stream)
    assert ("get_weather" in tok.decode(backend.requests[0]["ids"])) == bool(tools)
    if stream:
        chunks = [c.choices[0] for c in resp]
        content = "".join(c.delta.content or "" for c in chunks)
        calls, finish = [tc for c in chunks for tc in c.delta.tool_calls or []], chunks[-1].finish_reason
    else:
        message, finish = resp.choices[0].message, resp.choices[0].finish_reason
        content, calls = message.content, message.tool_calls
    assert (content, finish) == ("Checking both.", "tool_calls")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in CALLS]
