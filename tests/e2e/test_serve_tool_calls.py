"""The OpenAI server with `tools`, queried with the official `openai` client: the tools reach the
prompt through the chat template, a reply with calls in the layout the model's template writes
(Hermes / Qwen `<tool_call>` blocks for chatml, Llama 3.1's bare JSON, Qwen 3.5's XML parameters, Gemma 4's
`call:f{...}`) comes
back as `tool_calls` (streamed or not), a conversation that sends calls and results back is rendered,
and a model whose template cannot write tools is a 400, not a prompt without them."""

from __future__ import annotations

import json

import pytest

from conftest import client_for
from sftlab.serve.generation import encode

REPLY = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ASK = [{"role": "user", "content": "Is it warm in Lima?"}]


@pytest.fixture(scope="module")
def chatml(tiny_model_dir):
    from sftlab.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir), chat_template="chatml")


def test_tools_reach_the_prompt_and_calls_come_back_as_tool_calls(chatml):
    client, backend = client_for(chatml, REPLY)
    resp = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS)
    assert backend.requests[0]["ids"] == encode(chatml, messages=ASK, tools=TOOLS)
    assert '"name": "get_weather"' in chatml.decode(backend.requests[0]["ids"])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Lima"}
    # without tools the same text is the content, as generated
    plain = client.chat.completions.create(model="tiny", messages=ASK).choices[0]
    assert (plain.message.content, plain.message.tool_calls, plain.finish_reason) == (REPLY, None, "stop")
    none = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none")
    assert none.choices[0].message.tool_calls is None and backend.requests[-1]["ids"] == encode(chatml, messages=ASK)


def test_a_streamed_call_holds_back_the_call_text_and_sends_the_calls(chatml):
    client, _ = client_for(chatml, REPLY)
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "Let me check."  # as the whole reply's content: the newline before the call is not sent
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == \
        [(0, "get_weather", {"city": "Lima"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_calls_and_results_sent_back_are_rendered(chatml):
    client, backend = client_for(chatml, REPLY)
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "24 C"}]
    client.chat.completions.create(model="tiny", messages=history, tools=TOOLS)
    prompt = chatml.decode(backend.requests[0]["ids"])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>' in prompt
    assert prompt.endswith("<tool_response>\n24 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_a_template_without_tools_and_a_forced_call_are_400s(tokenizer, chatml):
    import openai

    client, backend = client_for(tokenizer, REPLY)  # SmolLM2's own template writes no tools
    with pytest.raises(openai.BadRequestError, match="does not write tools") as e:
        client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS)
    assert e.value.body["param"] == "tools" and not backend.requests
    client, _ = client_for(chatml, REPLY)
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="arguments are not a JSON object"):
        client.chat.completions.create(model="tiny", tools=TOOLS, messages=[*ASK, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "[1]"}}]}])


@pytest.mark.parametrize("template, reply", [
    ("llama3_1.jinja", '{"name": "get_weather", "parameters": {"city": "1984"}}'),
    ("qwen3_5_nothink.jinja", "<tool_call>\n<function=get_weather>\n<parameter=city>\n1984\n</parameter>\n</function>\n"
                              "</tool_call>"),
])
def test_calls_come_back_in_the_layout_of_the_model_s_own_template(tokenizer, template, reply):
    """A model trained on Llama 3.1's template writes a bare JSON object with "parameters", one trained on
    Qwen 3.5's an XML parameter per argument: the server reads each off its template (the parser's own
    cases: tests/unit/test_tool_call_layouts.py), an XML value by the type the request's tool declares
    (the city "1984" is a string), streamed or not."""
    from conftest import tokenizer_for

    client, backend = client_for(tokenizer_for(tokenizer, template), reply)
    choice = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == \
        [("get_weather", {"city": "1984"})]
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, stream=True))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)  # held back from where calls begin
    assert [(tc.function.name, json.loads(tc.function.arguments)) for c in chunks
            for tc in (c.choices[0].delta.tool_calls or [])] == [("get_weather", {"city": "1984"})]


@pytest.mark.parametrize("stream", [False, True])
def test_gemma_4_calls_come_back_as_tool_calls(tokenizer, stream):
    """Gemma 4 writes `call:f{key:<|"|>text<|"|>,n:2}` (its call tokens dropped in decoding, its string
    quote kept): the calls come back with JSON arguments, the text before them as the content; streamed,
    the content is sent and the call text held back from `call:`."""
    from conftest import tokenizer_for

    gemma = tokenizer_for(tokenizer, "gemma4.jinja")
    reply = ('Checking both.\ncall:get_weather{city:<|"|>Lima, Peru<|"|>}'
             'call:get_weather{city:<|"|>{Cusco}<|"|>,days:2}')
    client, _ = client_for(gemma, reply)
    resp = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, stream=stream)
    if stream:
        chunks = [c.choices[0] for c in resp]
        content = "".join(c.delta.content or "" for c in chunks)
        calls, finish = [tc for c in chunks for tc in c.delta.tool_calls or []], chunks[-1].finish_reason
    else:
        choice = resp.choices[0]
        content, calls, finish = choice.message.content, choice.message.tool_calls, choice.finish_reason
    assert (content, finish) == ("Checking both.", "tool_calls")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [("get_weather", {"city": "Lima, Peru"}), ("get_weather", {"city": "{Cusco}", "days": 2})]


def test_a_template_whose_calls_the_server_cannot_read_gives_text_and_says_so(tokenizer, capsys):
    from conftest import tokenizer_for

    lfm2 = tokenizer_for(tokenizer, "lfm2.jinja")  # writes the tools list, but no calls of its own
    client, _ = client_for(lfm2, "[get_weather(city='Lima')]")
    choice = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS).choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == \
        ("[get_weather(city='Lima')]", None, "stop")
    assert "replies to requests with tools come back as text" in capsys.readouterr().err


def test_the_older_functions_and_function_call_forms(chatml):
    import openai

    client, backend = client_for(chatml, REPLY)
    with pytest.raises(openai.BadRequestError, match="send them as 'tools'"):
        client.chat.completions.create(model="tiny", messages=ASK, functions=[TOOLS[0]["function"]])
    history = [*ASK, {"role": "assistant", "content": None,
                      "function_call": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}]
    client.chat.completions.create(model="tiny", messages=history, tools=TOOLS)
    assert '{"name": "get_weather", "arguments": {"city": "Lima"}}' in chatml.decode(backend.requests[0]["ids"])


def test_a_template_that_raises_on_the_request_is_a_400(chatml):
    import copy

    import openai

    strict = copy.deepcopy(chatml)  # a template that insists on a system message first, as some do
    strict.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come "
                            "first') }}{% endif %}" + chatml.chat_template)
    client, backend = client_for(strict, REPLY)
    with pytest.raises(openai.BadRequestError, match="a system message must come first"):
        client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS)
    assert not backend.requests


def test_the_reasoning_before_an_answer_or_calls_comes_as_reasoning_content(tokenizer):
    """A model trained on Qwen 3's template writes its reasoning in a <think> block first: the content is
    the answer (or the calls) alone, the reasoning is `reasoning_content`, as DeepSeek's and vLLM's servers send it."""
    from conftest import tokenizer_for

    qwen3 = tokenizer_for(tokenizer, "qwen3.jinja")
    client, _ = client_for(qwen3, "<think>\nWarm places: Lima is.\n</think>\n\nYes, it is warm.")
    message = client.chat.completions.create(model="tiny", messages=ASK).choices[0].message
    assert (message.content, message.model_extra.get("reasoning_content")) == ("Yes, it is warm.", "Warm places: Lima is.")
    client, _ = client_for(qwen3, "<think>\nI should look it up.\n</think>\n\n" + REPLY.split("\n", 1)[1])
    choice = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.model_extra.get("reasoning_content") == "I should look it up."
    client, _ = client_for(qwen3, "<think>\n\n</think>\n\nYes.")  # no reasoning: Qwen 3's empty block
    message = client.chat.completions.create(model="tiny", messages=ASK).choices[0].message
    assert (message.content, message.model_extra.get("reasoning_content")) == ("Yes.", None)


@pytest.mark.parametrize("reply, reasoning, content", [
    ("<think>\nWarm places: Lima is.\n</think>\n\nYes, it is warm.", "Warm places: Lima is.", "Yes, it is warm."),
    ("<think>\n\n</think>\n\nYes.", "", "Yes."),
    ("<think>\nStill thinking about Lima and its", "Still thinking about Lima and its", ""),  # cut off
])
def test_a_streamed_reply_sends_its_reasoning_as_it_grows_and_then_the_answer(tokenizer, reply, reasoning, content):
    from conftest import tokenizer_for

    client, _ = client_for(tokenizer_for(tokenizer, "qwen3.jinja"), reply)
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    thoughts = [d.model_extra.get("reasoning_content") or "" for d in deltas]
    assert "".join(thoughts) == reasoning
    if reasoning:  # in several deltas, every one before the answer's first
        first_answer = next((i for i, d in enumerate(deltas) if d.content), len(deltas))
        assert sum(map(bool, thoughts)) > 1 and not any(thoughts[first_answer:])
    assert "".join(d.content or "" for d in deltas) == content
