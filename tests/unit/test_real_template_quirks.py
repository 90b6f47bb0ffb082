"""Quirks of real vendors' chat templates (as llama.cpp keeps them in models/templates), each reproduced by a short
template written here: an answer is trained exactly as the model generates it after the generation prompt, through
the tokens that end its turn, or the template is refused with one clear line."""

from __future__ import annotations

import copy

import pytest

from sftlab.data.formats import to_conversation
from sftlab.data.render import IGNORE, render
from sftlab.errors import DataError, SftlabError
from test_data_render import trained_runs

MULTI = {"messages": [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]}


def installed(tokenizer, template: str, tokens: list[str]):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    tok.chat_template, tok.name_or_path = template, "quirk.jinja"
    return tok


def spans_and_prompts(tok, record: dict) -> tuple[list[str], list[bool]]:
    """The trained spans as text, and per span whether the text before it is the inference prompt."""
    conv = to_conversation(copy.deepcopy(record), "quirk.jsonl:1")
    example = render(conv, tok)
    ids, labels = list(example.input_ids), list(example.labels)
    starts = [k for k, label in enumerate(labels) if label != IGNORE and (k == 0 or labels[k - 1] == IGNORE)]
    turns = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
    prompts = [tok.decode(ids[:k]) == tok.apply_chat_template(conv.messages[:i], tools=conv.tools, tokenize=False,
                                                              add_generation_prompt=True)
               for k, i in zip(starts, turns)]
    return [tok.decode(run) for run in trained_runs(example)], prompts


# Kimi K3 closes an answer with `<|close|>response<|sep|><|close|>message<|sep|><|end_of_msg|>`: the model writes the
# whole row, words glued between the markers, and stops on the last (only the first marker was trained).
GLUED = ("{%- for m in messages -%}{{ '<|open|>' + m.role + '<|sep|>' + m.content + '<|close|>' + m.role + "
         "'<|sep|><|end_of_msg|>' }}{%- endfor -%}{%- if add_generation_prompt %}{{ '<|open|>assistant<|sep|>' }}"
         "{%- endif -%}")


def test_an_answer_s_closing_row_with_words_glued_between_its_markers_is_trained_whole(tokenizer):
    tok = installed(tokenizer, GLUED, ["<|open|>", "<|sep|>", "<|close|>", "<|end_of_msg|>"])
    spans, prompts = spans_and_prompts(tok, MULTI)
    assert spans == ["Hello!<|close|>assistant<|sep|><|end_of_msg|>", "Blue.<|close|>assistant<|sep|><|end_of_msg|>"]
    assert prompts == [True, True]


# Command R7B's tool-use template writes its generation prompt after every conversation, asked for or not: after the
# last answer it follows the end-of-turn tokens in a row, as the next turn's header does after an earlier answer
# (sftlab trained `<|turn|>` of the user's next turn, and a tool-call turn through the tool's result).
ALWAYS_PROMPTED = ("{%- for m in messages -%}{{ '<|turn|><|' + m.role + '|>' + m.content }}"
                   "{%- if m.role == 'assistant' %}{{ '<|end_answer|>' }}{% endif %}{{ '<|end_turn|>' }}"
                   "{%- endfor -%}{{ '<|turn|><|assistant|>' }}")
# a template that ignores add_generation_prompt but writes the assistant's header with each user turn is fine
HEADER_WITH_THE_USER = ("{%- for m in messages -%}{%- if m.role == 'user' %}{{ '<|user|>' + m.content + "
                        "'<|end_turn|><|assistant|>' }}{%- else %}{{ m.content + '<|end_turn|>' }}{%- endif %}"
                        "{%- endfor -%}")


def test_a_template_that_writes_its_generation_prompt_after_every_conversation_is_refused_in_one_line(tokenizer):
    tok = installed(tokenizer, ALWAYS_PROMPTED, ["<|turn|>", "<|user|>", "<|assistant|>", "<|end_answer|>",
                                                 "<|end_turn|>"])
    with pytest.raises(SftlabError, match="writes its generation prompt after every conversation") as refused:
        render(to_conversation(copy.deepcopy(MULTI), "quirk.jsonl:1"), tok)
    assert "\n" not in str(refused.value)

    tok = installed(tokenizer, HEADER_WITH_THE_USER, ["<|user|>", "<|assistant|>", "<|end_turn|>"])
    assert spans_and_prompts(tok, MULTI) == (["Hello!<|end_turn|>", "Blue.<|end_turn|>"], [True, True])


TOOL = {"tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                     "parameters": {"type": "object", "properties": {}}}}],
        "messages": [{"role": "user", "content": "Warm in Lima?"},
                     {"role": "assistant", "content": "", "tool_calls": [
                         {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {}}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "24 C"},
                     {"role": "assistant", "content": "Yes."}]}


def tool_template(prompt: str, end: str) -> str:
    """Calls written `<call>name</call>`, each turn closed by `end`; `prompt` opens the model's turn at inference."""
    return ("{%- if tools %}{{ '<|tools|>' + tools[0].function.name + '<|end|>' }}{% endif -%}"
            "{%- for m in messages -%}{%- if m.role == 'assistant' %}{{ '<|assistant|>' }}"
            "{%- for c in m.tool_calls or [] %}{{ '<call>' + c.function.name + '</call>' }}{% endfor %}"
            "{{ m.content + " + end + " }}{%- else %}{{ '<|' + m.role + '|>' + m.content + '<|end|>' }}{%- endif %}"
            "{%- endfor -%}{%- if add_generation_prompt %}{{ '<|assistant|>" + prompt + "' }}{% endif -%}")


# Nemotron Nano v2 prompts with "<think>\n\n" where a call turn has "<TOOLCALL>[": the two share a "<", which the call
# turn lost (trained from "TOOLCALL", its "<" left to the prompt, where the prompt's token is "<think>").
@pytest.mark.filterwarnings("ignore:the chat template of .* is not prefix-stable:UserWarning")
def test_a_call_turn_that_shares_a_first_character_with_the_prompt_s_added_token_keeps_it(tokenizer):
    from tokenizers import AddedToken

    tok = installed(tokenizer, tool_template("<think>", "'<|end|>'"), ["<|tools|>", "<|user|>", "<|assistant|>",
                                                                       "<|tool|>", "<|end|>"])
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    spans, _ = spans_and_prompts(tok, TOOL)
    assert spans == ["<call>get_weather</call><|end|>", "Yes.<|end|>"]


# Apriel 1.5 ends every model turn with "\n<|end|>\n" + EOS: the model stops on <|end|>, as its answers are trained;
# a call turn was trained on through the newline and the EOS after it.
def test_a_call_turn_ends_where_the_template_s_answers_end_not_at_an_eos_after_a_newline(tokenizer):
    tok = installed(tokenizer, tool_template("", "'\\n<|end|>\\n' + eos_token"),
                    ["<|tools|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"])
    assert spans_and_prompts(tok, TOOL) == (["<call>get_weather</call>\n<|end|>", "Yes.\n<|end|>"], [True, True])


# DeepSeek V3 and R1 write a call's arguments by string concatenation ('```json\n' + arguments): given the object
# sftlab keeps, every tool-call record was refused ("can only concatenate str (not "dict") to str")
TEXT_ARGUMENTS = ("{%- if tools %}{{ '<|tools|>' + tools[0].function.name + '<|end|>' }}{% endif -%}"
                  "{%- for m in messages -%}{%- if m.role == 'assistant' %}{{ '<|assistant|>' + m.content }}"
                  "{%- for c in m.tool_calls or [] %}{{ '<call>' + c.function.name + '\\n' + c.function.arguments + "
                  "'</call>' }}{% endfor %}{{ '<|end|>' }}{%- else %}{{ '<|' + m.role + '|>' + m.content + '<|end|>' }}"
                  "{%- endif %}{%- endfor -%}{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif -%}")


def test_a_template_that_writes_arguments_as_text_gets_them_as_json_in_training_evaluation_and_serving(tokenizer):
    from sftlab.evaluation.generate import prompt_ids
    from sftlab.serve.generation import render as serve_render

    tokens = ["<|tools|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
    record = copy.deepcopy(TOOL)
    record["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"city": "Lima"}
    conv = to_conversation(copy.deepcopy(record), "quirk.jsonl:1")
    call = '<call>get_weather\n{"city": "Lima"}</call><|end|>'
    written = "'\\n' + c.function.arguments + '</call>' }}"
    assert written in TEXT_ARGUMENTS
    for template in (TEXT_ARGUMENTS, TEXT_ARGUMENTS.replace(written, "'\\n' }}{{ c.function.arguments }}{{ '</call>' }}"),
                     TEXT_ARGUMENTS.replace("c.function.arguments", "c.function.arguments | tojson")):  # a repr, JSON
        tok = installed(tokenizer, template, tokens)
        example = render(conv, tok)
        assert [tok.decode(run) for run in trained_runs(example)] == [call, "Yes.<|end|>"]
        # what serving and evaluation send before the last answer: the text training conditions it on
        served = serve_render(tok, conv.messages[:3], conv.tools)
        assert served.endswith(f"{call}<|tool|>24 C<|end|><|assistant|>")
        assert tok.decode(prompt_ids(tok, conv.messages[:3], "quirk.jsonl:1", conv.tools)) == served
        assert tok.decode(example.input_ids[:len(tok(served, add_special_tokens=False)["input_ids"])]) == served


def test_a_template_that_writes_the_call_s_id_for_its_name_says_so(tokenizer):
    """Kimi K2 writes `<|tool_call_begin|>` + the call's id (functions.get_weather:0, its models' form): a call with
    another id has no function name in its turn, and sftlab said the template writes no tool calls at all."""
    tok = installed(tokenizer, tool_template("", "'<|end|>'").replace("c.function.name + '</call>'", "c.id + '</call>'"),
                    ["<|tools|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"])
    with pytest.raises(DataError, match=r"writes each call's id where the function name belongs \(turn 1: c1\)"):
        render(to_conversation(copy.deepcopy(TOOL), "quirk.jsonl:1"), tok)
    record = copy.deepcopy(TOOL)
    record["messages"][1]["tool_calls"][0]["id"] = record["messages"][2]["tool_call_id"] = "functions.get_weather:0"
    assert spans_and_prompts(tok, record)[0] == ["<call>functions.get_weather:0</call><|end|>", "Yes.<|end|>"]


# GigaChat 3.5 ends the conversation's last message with its EOS and any other with `<|message_sep|>`: a call turn,
# whose EOS as the last message is not in the conversation, was trained from its call through the tool's result and
# the next answer to the EOS at the very end; it ends at the marker the template writes after it there.
def test_a_call_turn_whose_last_message_marker_differs_ends_at_its_own_marker_not_the_conversation_s_eos(tokenizer):
    tok = installed(tokenizer, tool_template("", "(eos_token if loop.last else '<|end|>')"),
                    ["<|tools|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"])
    eos = tok.eos_token
    assert spans_and_prompts(tok, TOOL) == (["<call>get_weather</call><|end|>", f"Yes.{eos}"], [True, True])
    # a turn that ends otherwise once followed is never trained through the next message, whatever is found after it
    two = copy.deepcopy(TOOL)
    two["messages"][1]["content"] = "Checking."
    tok = installed(tokenizer, tool_template("", "(eos_token if loop.last else '')").replace(
        "{{ m.content + ", "{{ ('<think></think>' if loop.last else '') + m.content + "),
        ["<|tools|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"])
    with pytest.raises(DataError, match="tool-call turn 1"):
        render(to_conversation(two, "quirk.jsonl:1"), tok)


# Muse Glimmer writes its default system message only with a generation prompt: no prompt is a prefix of the
# conversation, and each answer was trained from its content on, without what the model writes after the prompt
# (`<|start|>assistant` + ` to=self<|message|>` reasoning, then the ` to=user<|message|>` header), the reasoning the
# data gives included; the turns before as the conversation has them, then the prompt's header, line the two up.
DEFAULT_SYSTEM_WHEN_PROMPTED = (
    "{%- if add_generation_prompt %}{{ '<|sys|>Be brief.<|end|>' }}{% endif -%}"
    "{%- for m in messages -%}{%- if m.role == 'assistant' %}{{ '<|assistant|>' }}"
    "{%- if m.reasoning_content %}{{ ' to=self:' + m.reasoning_content + '<|next|><|assistant|>' }}{% endif %}"
    "{{ ' to=user:' + m.content + '<|end|>' }}{%- else %}{{ '<|' + m.role + '|>' + m.content + '<|end|>' }}"
    "{%- endif %}{%- endfor -%}{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif -%}")


@pytest.mark.filterwarnings("ignore:the chat template of .* is not prefix-stable:UserWarning")
def test_an_answer_after_a_prompt_that_is_not_a_prefix_is_trained_from_the_prompt_s_header_on(tokenizer):
    tok = installed(tokenizer, DEFAULT_SYSTEM_WHEN_PROMPTED, ["<|sys|>", "<|user|>", "<|assistant|>", "<|next|>",
                                                              "<|end|>"])
    record = copy.deepcopy(MULTI)
    record["messages"][1]["reasoning_content"] = "A greeting."
    spans, prompts = spans_and_prompts(tok, record)
    assert spans == [" to=self:A greeting.<|next|><|assistant|> to=user:Hello!<|end|>", " to=user:Blue.<|end|>"]
    assert prompts == [False, False]  # the system message is still missing before them (rendering warns)
