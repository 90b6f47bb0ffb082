"""Google's Gemini tuning layout (Vertex AI supervised tuning JSONL): text, system instruction,
function calls and responses, thoughts, camelCase and snake_case keys, and parts sftlab cannot
train on refused with the record's source."""

from __future__ import annotations

import pytest

from sftlab.data.formats import RecordError, detect_format, to_conversation

SRC = "tune.jsonl:3"
WEATHER = {"name": "get_weather", "description": "Weather",
           "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}, "required": ["city"]}}


def turn(role: str, *parts: dict) -> dict:
    return {"role": role, "parts": list(parts)}


def test_text_turns_and_system_instruction():
    rec = {"systemInstruction": {"role": "system", "parts": [{"text": "You are "}, {"text": "terse."}]},
           "contents": [turn("user", {"text": "Capital of "}, {"text": "Peru?"}), turn("model", {"text": "Lima."}),
                        turn("user", {"text": "And Chile?"}), turn("model", {"text": "Santiago."})],
           "id": 4}
    assert detect_format(rec) == "gemini"
    c = to_conversation(rec, SRC)
    assert c.messages == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of Peru?"},
                          {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "And Chile?"},
                          {"role": "assistant", "content": "Santiago."}]
    assert c.meta == {"id": 4} and c.source == SRC


@pytest.mark.parametrize("camel", [True, False], ids=["REST camelCase", "SDK snake_case"])
def test_function_calls_responses_thoughts_and_tools(camel):
    call, response, declarations = ("functionCall", "functionResponse", "functionDeclarations") if camel else \
        ("function_call", "function_response", "function_declarations")
    rec = {"contents": [
        turn("user", {"text": "Weather in Lima and Quito?"}),
        turn("model", {"text": "Checking both.", "thought": True}, {call: {"name": "get_weather", "args": {"city": "Lima"}}},
             {call: {"name": "get_weather", "args": {"city": "Quito"}}}),
        turn("user", {response: {"name": "get_weather", "response": {"temp_c": 24}}},
             {response: {"name": "get_weather", "response": {"temp_c": 13}}}),
        turn("model", {"text": "Lima 24 °C, Quito 13 °C."})],
        "tools": [{declarations: [WEATHER]}]}
    c = to_conversation(rec, SRC)
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}} for city in ("Lima", "Quito")]
    assert c.messages[1] == {"role": "assistant", "content": "", "tool_calls": calls, "reasoning_content": "Checking both."}
    assert c.messages[2:4] == [{"role": "tool", "name": "get_weather", "content": '{"temp_c": 24}'},
                               {"role": "tool", "name": "get_weather", "content": '{"temp_c": 13}'}]
    assert c.messages[4] == {"role": "assistant", "content": "Lima 24 °C, Quito 13 °C."}
    # OpenAPI's upper-case type names as JSON Schema writes them, in the form templates take
    assert c.tools == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    again = to_conversation(c.to_json(), SRC)  # what `sftlab data` writes reads back
    assert again.messages == c.messages and again.tools == c.tools


@pytest.mark.parametrize("contents,kind,detail", [
    ([turn("user", {"inlineData": {"mimeType": "image/png", "data": "AAA"}}), turn("model", {"text": "A cat."})],
     "unsupported part", "'contents' turn 1 part 1 is 'inlineData', not text"),
    ([turn("user", {"text": "q"}), turn("assistant", {"text": "a"})], "unknown role", "'assistant' in 'contents' turn 2"),
    ([turn("user", {"text": "q"}), {"role": "model", "text": "a"}], "mistyped field", "'contents' turn 2 needs 'parts'"),
    ([turn("user", {"text": "q"}), turn("model", {"text": " "})], "empty content", "message 2 (assistant)"),
    ([turn("user", {"text": "q"}), turn("user", {"functionResponse": {"response": {}}})], "malformed tool call",
     "'contents' turn 2 part 1 is not a functionResponse with a name"),
    ("q", "mistyped field", "'contents' must be a list of turns"),
])
def test_records_sftlab_cannot_train_on_are_named(contents, kind, detail):
    with pytest.raises(RecordError) as e:
        to_conversation({"contents": contents}, SRC)
    assert e.value.source == SRC and e.value.kind == kind and detail in str(e.value)


def test_a_model_role_in_openai_messages_is_the_assistant():
    """Sets written for Gemma name the assistant `model`, as its template does."""
    c = to_conversation({"messages": [{"role": "user", "content": "q"}, {"role": "model", "content": "a"}]}, SRC)
    assert c.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
