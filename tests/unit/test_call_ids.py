"""Call ids for templates that take only their own kind (Mistral's: "Tool call IDs should be alphanumeric
strings with length 9!"). Tool-calling data often has no ids (xLAM, Glaive, Hermes function calling) or
short ones (`call_1`): every such record was refused. Such a template gets 9-character ids, the same one
for a call and for the result that answers it, in training and in serving alike."""

from __future__ import annotations

import copy
import re

from sftlab.data.formats import to_conversation
from sftlab.data.render import render_many
from sftlab.serve.generation import render as serve_render

# written for this test, in the manner of Mistral's templates: ids checked, written in the call and its result
NINE_CHARACTER_IDS = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}[INST]{{ m.content }}[/INST]"
    "{%- elif m.role == 'assistant' and m.tool_calls -%}[TOOL_CALLS]["
    "{%- for c in m.tool_calls -%}"
    "{%- if c.id is not defined or c.id | length != 9 -%}"
    "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif -%}"
    "{%- if not loop.first %}, {% endif -%}"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}, "id": "{{ c.id }}"}'
    "{%- endfor -%}]<|im_end|>"
    "{%- elif m.role == 'assistant' -%}{{ m.content }}<|im_end|>"
    "{%- elif m.role == 'tool' -%}"
    "{%- if m.tool_call_id is not defined or m.tool_call_id | length != 9 -%}"
    "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif -%}"
    '[TOOL_RESULTS]{"content": {{ m.content | tojson }}, "call_id": "{{ m.tool_call_id }}"}[/TOOL_RESULTS]'
    "{%- endif -%}{%- endfor -%}"
)


def nine_character_ids(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
                                                         "[/TOOL_RESULTS]"]})
    tok.chat_template = NINE_CHARACTER_IDS
    return tok


def record(*ids: str | None) -> dict:
    """Two parallel calls with ids IDS (None: none) and their results, answered in order."""
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
             for city in ("Lima", "Oslo")]
    results = [{"role": "tool", "content": content} for content in ("24 C", "3 C")]
    for call, result, call_id in zip(calls, results, ids):
        if call_id is not None:
            call["id"] = result["tool_call_id"] = call_id
    return {"messages": [{"role": "user", "content": "Lima or Oslo?"},
                         {"role": "assistant", "content": "", "tool_calls": calls}, *results,
                         {"role": "assistant", "content": "Lima is warmer."}]}


def written_ids(text: str) -> tuple[list[str], list[str]]:
    return re.findall(r'"id": "([^"]*)"', text), re.findall(r'"call_id": "([^"]*)"', text)


def test_calls_without_ids_or_with_short_ones_get_nine_character_ids_their_results_share(tokenizer):
    tok = nine_character_ids(tokenizer)
    records = [record(None, None), record("call_1", "call_2"), record("call_1", None)]
    examples = render_many([to_conversation(copy.deepcopy(r), f"data.jsonl:{k + 1}") for k, r in enumerate(records)],
                           tok)
    seen = []
    for example in examples:
        assert not isinstance(example, Exception), example
        calls, results = written_ids(tok.decode(example.input_ids))
        assert len(calls) == 2 and all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in calls), calls
        assert results == calls and calls[0] != calls[1]  # each result answers its call, in order
        seen.append(calls)
    assert seen[1] != seen[0] and seen[2][0] == seen[1][0]  # an id is always given the same replacement


def test_ids_the_template_takes_are_kept_and_inference_writes_the_ids_training_did(tokenizer):
    tok = nine_character_ids(tokenizer)
    (example,) = render_many([to_conversation(record("abc123XYZ", "def456UVW"), "data.jsonl:1")], tok)
    assert written_ids(tok.decode(example.input_ids)) == (["abc123XYZ", "def456UVW"],) * 2

    messages = to_conversation(record("call_1", "call_2"), "data.jsonl:1").messages
    (trained,) = render_many([to_conversation(record("call_1", "call_2"), "data.jsonl:1")], tok)
    assert written_ids(serve_render(tok, messages[:-1])) == written_ids(tok.decode(trained.input_ids))


def test_a_template_that_fails_on_a_call_without_an_id_gets_one_and_keeps_those_given(tokenizer):
    """Apriel 1.5 writes `', "id": "' + tool_call['id'] + '"'`: any id will do, none fails."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{%- for m in messages -%}"
        "{%- if m.role == 'assistant' and m.tool_calls -%}<calls>"
        "{%- for c in m.tool_calls -%}{{ '{\"name\": \"' + c.function.name + '\", \"id\": \"' + c.id + '\"}' }}"
        "{%- endfor -%}</calls><|im_end|>"
        "{%- elif m.role == 'tool' -%}<result>{{ m.content }}</result>"
        "{%- else -%}{{ m.role }}: {{ m.content }}<|im_end|>{%- endif -%}{%- endfor -%}")
    without, given = render_many([to_conversation(record(None, None), "data.jsonl:1"),
                                  to_conversation(record("call_1", "call_2"), "data.jsonl:2")], tok)
    calls = written_ids(tok.decode(without.input_ids))[0]
    assert len(calls) == 2 and all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in calls), calls
    assert written_ids(tok.decode(given.input_ids))[0] == ["call_1", "call_2"]
