"""Tool-calling conversations on real chat templates (the vendors' own, as TRL installs them in
trl/chat_templates, and sftlab's chatml): exactly what the model generates for a turn that calls
tools is trained, through the token that ends such a turn in that template; the tools list and the
tool results never are; a template that cannot write tools or calls is a clear error."""

from __future__ import annotations

import copy

import pytest

from sftlab.data.formats import to_conversation
from sftlab.data.render import IGNORE, RenderOptions, render
from sftlab.errors import SftlabError
from conftest import tokenizer_for
from test_data_render import trained_runs

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
RECORD = {
    "tools": [WEATHER],
    "messages": [
        {"role": "user", "content": "Is it warm in Lima?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "24 C, sunny"},
        {"role": "assistant", "content": "Yes: 24 C and sunny."},
    ],
}
ANSWER = "Yes: 24 C and sunny."

# template -> the trained text of the tool-call turn (each template's own call syntax and the token
# that ends such a turn there), and the token that ends the answer
EXPECTED = {
    "chatml": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call><|im_end|>',
               "<|im_end|>"),
    "qwen2_5.jinja": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call><|im_end|>',
                      "<|im_end|>"),
    "qwen3.jinja": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call><|im_end|>',
                    "<|im_end|>"),
    "qwen3_5_nothink.jinja": ("<tool_call>\n<function=get_weather>\n<parameter=city>\nLima\n</parameter>\n</function>"
                              "\n</tool_call><|im_end|>", "<|im_end|>"),
    "llama3_1.jinja": ('{"name": "get_weather", "parameters": {"city": "Lima"}}<|eot_id|>', "<|eot_id|>"),
    "gptoss.jinja": (' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Lima"}<|call|>',
                     "<|return|>"),
    "gemma4.jinja": ('<|tool_call>call:get_weather{city:<|"|>Lima<|"|>}<tool_call|><|tool_response>', "<turn|>"),
    "glm4moe.jinja": ("\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Lima</arg_value>"
                      "\n</tool_call><|observation|>", None),
    "lfm2_2_5.jinja": ("<|tool_call_start|>[get_weather(city='Lima')]<|tool_call_end|><|im_end|>", "<|im_end|>"),
}

# what the template writes between the generation prompt and the answer, generated and so trained with it
ANSWER_LEAD = {"qwen3.jinja": "<think>\n\n</think>\n\n", "gptoss.jinja": "<|channel|>final<|message|>",
               "glm4moe.jinja": "\n<think></think>\n"}


def trained_texts(tok, example) -> list[str]:
    return [tok.decode(run) for run in trained_runs(example)]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_tool_call_turn_trains_what_the_model_generates_on_real_templates(tokenizer, name):
    tok = tokenizer_for(tokenizer, name)
    conv = to_conversation(RECORD, "tools.jsonl:1")
    example = render(conv, tok)
    call, answer_end = EXPECTED[name]
    # an answer is trained up to its end-of-turn token; a template that writes none after the last
    # answer (GLM) gets the tokenizer's EOS, as for any answer
    assert trained_texts(tok, example) == [call, ANSWER_LEAD.get(name, "") + ANSWER + (answer_end or tok.eos_token)]
    # the trained call starts where the generation prompt ends: the prompt is a token prefix
    prompt = tok.apply_chat_template(conv.messages[:1], tools=conv.tools, add_generation_prompt=True, tokenize=False)
    first = next(k for k, label in enumerate(example.labels) if label != IGNORE)
    assert tok.decode(example.input_ids[:first]) == prompt


def test_the_tools_list_and_results_are_in_the_prompt_and_never_trained(tokenizer):
    tok = tokenizer_for(tokenizer, "qwen2_5.jinja")
    example = render(to_conversation(RECORD, "tools.jsonl:1"), tok)
    untrained = tok.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE])
    assert '"name": "get_weather", "description": "Current weather in a city"' in untrained
    assert "<tool_response>\n24 C, sunny\n</tool_response>" in untrained


def test_content_beside_calls_and_several_calls_are_trained_with_them(tokenizer):
    tok = tokenizer_for(tokenizer, "chatml")
    record = copy.deepcopy(RECORD)
    record["messages"][1]["content"] = "Let me check."
    record["messages"][1]["tool_calls"].append({"function": {"name": "get_weather", "arguments": {"city": "Cusco"}}})
    record["messages"].insert(3, {"role": "tool", "content": "12 C"})
    example = render(to_conversation(record, "tools.jsonl:2"), tok)
    assert trained_texts(tok, example)[0] == (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Cusco"}}\n</tool_call><|im_end|>')


def test_train_on_last_with_a_call_as_the_last_turn(tokenizer):
    tok = tokenizer_for(tokenizer, "qwen2_5.jinja")
    record = {**RECORD, "messages": RECORD["messages"][:2]}
    example = render(to_conversation(record, "tools.jsonl:3"), tok, RenderOptions(train_on="last"))
    assert trained_texts(tok, example) == [EXPECTED["qwen2_5.jinja"][0]]


def test_the_chatml_template_writes_plain_conversations_as_before(tokenizer):
    """Tool support must not change a conversation without tools: ChatML, byte for byte."""
    tok = tokenizer_for(tokenizer, "chatml")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n" \
        "<|im_start|>assistant\n"


def test_a_template_that_ignores_tools_is_an_error_naming_it(tokenizer):
    """SmolLM2's own template writes neither the tools nor the calls: training would teach calls the
    prompt never offers, so the whole run stops with the way out."""
    with pytest.raises(SftlabError, match=r"chat template of '.*smollm2-tokenizer' does not write the 'tools' list"
                                          r".*model.chat_template.*chatml"):
        render(to_conversation(RECORD, "tools.jsonl:1"), tokenizer)


def test_a_template_that_drops_the_calls_is_an_error_naming_it(tokenizer):
    """LFM2's first template writes the tools but never reads `tool_calls`."""
    tok = tokenizer_for(tokenizer, "lfm2.jinja")
    with pytest.raises(SftlabError, match=r"'lfm2.jinja' does not write assistant tool calls \(tools.jsonl:1: "
                                          r"turn 1 calls get_weather\)"):
        render(to_conversation(RECORD, "tools.jsonl:1"), tok)


@pytest.mark.parametrize("second", ["get_weather", "get_time"])
def test_a_template_that_writes_only_the_first_of_parallel_calls_rejects_the_record(tokenizer, second):
    """gpt-oss's template writes one call per turn: a turn with two (same function or not) cannot be
    trained as the data has it, so that record is rejected (skip mode counts it), not trained short."""
    from sftlab.errors import DataError

    tok = tokenizer_for(tokenizer, "gptoss.jinja")
    record = copy.deepcopy(RECORD)
    record["tools"].append({"name": "get_time", "description": "Local time", "parameters": {"type": "object", "properties": {}}})
    record["messages"][1]["tool_calls"].append({"function": {"name": second, "arguments": {"city": "Cusco"}}})
    with pytest.raises(DataError, match=r"tools.jsonl:4: the chat template of 'gptoss.jinja' writes only some of "
                                        r"the 2 calls of turn 1"):
        render(to_conversation(record, "tools.jsonl:4"), tok)
    tok = tokenizer_for(tokenizer, "qwen2_5.jinja")  # a template that writes both trains both
    assert trained_texts(tok, render(to_conversation(record, "tools.jsonl:4"), tok))[0].count("<tool_call>") == 2
