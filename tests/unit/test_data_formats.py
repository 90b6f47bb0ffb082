"""Each schema converter, exactly; detection; the role/content rules."""

from __future__ import annotations

import json
import re

import pytest

from sftlab.data.formats import FORMATS, RecordError, detect_format, to_conversation
from sftlab.errors import SftlabError

SRC = "f.jsonl:3"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_alpaca_with_input_system_and_meta():
    c = to_conversation({"instruction": "Reverse", "input": "abc", "output": "cba", "system": "Be exact.",
                         "label": "x", "id": 3}, SRC)
    assert c.messages == msgs(("system", "Be exact."), ("user", "Reverse\n\nabc"), ("assistant", "cba"))
    assert c.meta == {"label": "x", "id": 3}
    assert c.source == SRC and c.text is None


def test_alpaca_empty_input_is_dropped():
    c = to_conversation({"instruction": "Say hi", "input": "", "output": "hi"}, SRC)
    assert c.messages == msgs(("user", "Say hi"), ("assistant", "hi"))


def test_sharegpt_roles_and_messages_key():
    rec = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                             {"from": "gpt", "value": "A"}, {"from": "user", "value": "Q2"},
                             {"from": "assistant", "value": "A2"}], "task": "t"}
    c = to_conversation(rec, SRC)
    assert c.messages == msgs(("system", "S"), ("user", "Q"), ("assistant", "A"), ("user", "Q2"), ("assistant", "A2"))
    assert c.meta == {"task": "t"}
    c2 = to_conversation({"messages": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, SRC)
    assert detect_format({"messages": [{"from": "human", "value": "Q"}]}) == "sharegpt"
    assert c2.messages == msgs(("user", "Q"), ("assistant", "A"))


def test_sharegpt_tool_roles():
    rec = {"conversations": [{"from": "human", "value": "Weather?"}, {"from": "gpt", "value": "call"},
                             {"from": "function", "value": "{\"t\": 20}"}, {"from": "gpt", "value": "20 C"}]}
    assert [m["role"] for m in to_conversation(rec, SRC).messages] == ["user", "assistant", "tool", "assistant"]


def test_openai_messages_with_text_parts():
    rec = {"messages": [{"role": "system", "content": "S"},
                        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
                        {"role": "assistant", "content": "Hi"}], "id": "m1"}
    c = to_conversation(rec, SRC)
    assert c.messages == msgs(("system", "S"), ("user", "Hello there"), ("assistant", "Hi"))
    assert c.meta == {"id": "m1"}


@pytest.mark.parametrize("p,a", [("prompt", "completion"), ("prompt", "response"), ("question", "answer"), ("input", "output")])
def test_prompt_completion_pairs(p, a):
    c = to_conversation({p: "Q?", a: "A.", "label": "L"}, SRC)
    assert detect_format({p: "Q?", a: "A."}) == "prompt_completion"
    assert c.messages == msgs(("user", "Q?"), ("assistant", "A."))
    assert c.meta == {"label": "L"}


def test_prompt_completion_conversational():
    rec = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
           "completion": [{"role": "assistant", "content": "A"}]}
    assert to_conversation(rec, SRC).messages == msgs(("system", "S"), ("user", "Q"), ("assistant", "A"))


def test_text():
    c = to_conversation({"text": "Once upon a time.", "id": 1}, SRC)
    assert c.is_raw_text and c.text == "Once upon a time." and c.messages == [] and c.meta == {"id": 1}


def test_preference_strings():
    c = to_conversation({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away.", "score": 1}, SRC)
    assert c.messages == msgs(("user", "Hi?"), ("assistant", "Hello!"))
    assert c.meta == {"score": 1, "rejected": msgs(("user", "Hi?"), ("assistant", "Go away."))}


def test_preference_pairs_in_alpaca_and_argilla_layouts():
    """LLaMA-Factory's Alpaca pairs (instruction + input, history) and Argilla's orca pairs (`input` as
    the prompt): the input was dropped into meta, and an `input`-only pair had no prompt."""
    rec = {"instruction": "Translate.", "input": "chat", "chosen": "cat", "rejected": "dog",
           "history": [["Hi", "Hello"]], "system": "Be exact."}
    c = to_conversation(rec, SRC)
    prompt = [("system", "Be exact."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Translate.\n\nchat")]
    assert c.messages == msgs(*prompt, ("assistant", "cat"))
    assert c.meta == {"rejected": msgs(*prompt, ("assistant", "dog"))}
    c = to_conversation({"system": "", "input": "2+2?", "chosen": "4", "rejected": "5", "order": ["a", "b"]}, SRC)
    assert c.messages == msgs(("user", "2+2?"), ("assistant", "4")) and c.meta["order"] == ["a", "b"]


def test_preference_message_lists_without_prompt():
    chosen = msgs(("user", "Q"), ("assistant", "good"))
    rejected = msgs(("user", "Q"), ("assistant", "bad"))
    c = to_conversation({"chosen": chosen, "rejected": rejected}, SRC)
    assert c.messages == chosen and c.meta == {"rejected": rejected}


def test_preference_hh_rlhf_transcripts():
    """HH-RLHF as downloaded: each side a whole "\n\nHuman: ...\n\nAssistant: ..." transcript."""
    chosen = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6."
    rejected = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: No idea."
    c = to_conversation({"chosen": chosen, "rejected": rejected}, SRC)
    prompt = [("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?")]
    assert c.messages == msgs(*prompt, ("assistant", "6."))
    assert c.meta == {"rejected": msgs(*prompt, ("assistant", "No idea."))}
    other = rejected.replace("3+3", "5+5")
    with pytest.raises(RecordError, match="prompt mismatch"):
        to_conversation({"chosen": chosen, "rejected": other}, SRC)


@pytest.mark.parametrize("label,expected", [(True, True), (False, False), ("True", True), ("false", False)])
def test_unpaired_preference_labels_as_csv_holds_them(label, expected):
    rec = {"prompt": "Is the sky blue?", "completion": "Yes.", "label": label}
    assert detect_format(rec) == "preference"
    assert to_conversation(rec, SRC).meta == {"label": expected}
    assert detect_format({**rec, "label": "positive"}) == "prompt_completion"  # a class label, not KTO's


WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lima"}}}


def test_openai_tool_calls_tools_and_results_are_read_in_the_form_templates_take():
    rec = {"tools": [{"type": "function", "function": WEATHER}],
           "messages": [{"role": "user", "content": "Warm in Lima?"},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"id": "c1", "type": "function",
                             "function": {"name": "get_weather", "arguments": "{\"city\": \"Lima\"}"}}]},
                        {"role": "tool", "tool_call_id": "c1", "content": "24 C"},
                        {"role": "assistant", "content": "Yes, 24 C."}], "id": 7}
    c = to_conversation(rec, SRC)
    assert c.messages[1] == {"role": "assistant", "content": "", "tool_calls": [{**CALL, "id": "c1"}]}
    assert c.messages[2] == {"role": "tool", "content": "24 C", "tool_call_id": "c1"}
    assert c.tools == [{"type": "function", "function": WEATHER}] and c.meta == {"id": 7, "tools": c.tools}
    assert to_conversation(c.to_json(), SRC).messages == c.messages  # what `sftlab data` writes reads back


def test_bare_tools_legacy_function_call_and_json_string_columns():
    rec = {"tools": json.dumps([WEATHER]),  # a Parquet/CSV column holds the list as a JSON string
           "messages": [{"role": "user", "content": "Lima?"},
                        {"role": "assistant", "content": "Checking.",
                         "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Lima\"}"}},
                        {"role": "function", "name": "get_weather", "content": "24 C"},
                        {"role": "assistant", "content": "24 C."}]}
    c = to_conversation(rec, SRC)
    assert c.tools == [{"type": "function", "function": WEATHER}]
    assert c.messages[1] == {"role": "assistant", "content": "Checking.", "tool_calls": [CALL]}
    assert c.messages[2] == {"role": "tool", "content": "24 C", "name": "get_weather"}


def test_sharegpt_function_call_turns_as_llama_factory_writes_them():
    rec = {"tools": json.dumps([WEATHER]),
           "conversations": [{"from": "human", "value": "Lima?"},
                             {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                                            "arguments": {"city": "Lima"}})},
                             {"from": "observation", "value": "24 C"}, {"from": "gpt", "value": "24 C."}]}
    c = to_conversation(rec, SRC)
    assert [m["role"] for m in c.messages] == ["user", "assistant", "tool", "assistant"]
    assert c.messages[1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    after_text = {**rec, "conversations": [rec["conversations"][0], {"from": "gpt", "value": "Checking."},
                                           *rec["conversations"][1:]]}
    assert to_conversation(after_text, SRC).messages[1] == {"role": "assistant", "content": "Checking.",
                                                            "tool_calls": [CALL]}


@pytest.mark.parametrize("call,reason", [
    ({"function": {"arguments": {}}}, "tool call 1 has no function name"),
    ({"function": {"name": "f", "arguments": "[1, 2]"}}, "tool call 1's arguments are not a JSON object"),
    ({"function": {"name": "f", "arguments": "{city: Lima"}}, "tool call 1's arguments is a string that is not JSON"),
])
def test_malformed_tool_calls_are_named(call, reason):
    rec = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "", "tool_calls": [call]}]}
    with pytest.raises(RecordError, match=re.escape(f"malformed tool call: 'messages' message 2's {reason}")):
        to_conversation(rec, SRC)
    with pytest.raises(RecordError, match="malformed tool call: 'tools' must be a list"):
        to_conversation({"messages": msgs(("user", "Q"), ("assistant", "A")), "tools": {"name": "f"}}, SRC)


def test_a_call_on_a_user_turn_and_an_empty_turn_without_calls_are_refused():
    rec = {"messages": [{"role": "user", "content": "Q", "tool_calls": [CALL]}, {"role": "assistant", "content": "A"}]}
    with pytest.raises(RecordError, match="is a user message with tool calls"):
        to_conversation(rec, SRC)
    with pytest.raises(RecordError, match="empty content"):
        to_conversation({"messages": msgs(("user", "Q"), ("assistant", ""))}, SRC)


def test_pairs_whose_answers_differ_only_in_their_calls_are_pairs():
    other = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lim"}}}
    prompt = [{"role": "user", "content": "Lima?"}]
    rec = {"prompt": prompt, "tools": [WEATHER], "chosen": [{"role": "assistant", "content": "", "tool_calls": [CALL]}],
           "rejected": [{"role": "assistant", "content": "", "tool_calls": [other]}]}
    c = to_conversation(rec, SRC)
    assert c.messages[-1]["tool_calls"] == [CALL] and c.meta["rejected"][-1]["tool_calls"] == [other]
    assert c.tools == [{"type": "function", "function": WEATHER}]


def test_openassistant_message_rows_are_refused():
    row = {"message_id": "m2", "parent_id": "m1", "role": "prompter", "text": "Hi", "lang": "en"}
    with pytest.raises(RecordError, match="message rows: one message of an OpenAssistant tree"):
        to_conversation(row, SRC)
    assert to_conversation(row, SRC, format="text").text == "Hi"


def test_preference_round_trips_through_to_json():
    c = to_conversation({"prompt": "Hi?", "chosen": "Hello!", "rejected": "No."}, SRC)
    again = to_conversation(c.to_json(), SRC)
    assert detect_format(c.to_json()) == "preference"
    assert again.messages == c.messages and again.meta == c.meta


@pytest.mark.parametrize("rec", [
    {"instruction": "i", "output": "o", "label": 1},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "task": "t"},
    {"text": "raw", "id": 2},
])
def test_to_json_round_trip(rec):
    c = to_conversation(rec, SRC)
    again = to_conversation(c.to_json(), SRC)
    assert (again.messages, again.text, again.meta) == (c.messages, c.text, c.meta)


def test_format_override_and_unknown_format():
    rec = {"input": "x", "output": "y", "instruction": "z"}
    assert detect_format(rec) == "alpaca"
    assert to_conversation(rec, SRC, format="prompt_completion").messages == msgs(("user", "x"), ("assistant", "y"))
    with pytest.raises(SftlabError, match="unknown data format 'alpacca'.*Did you mean 'alpaca'"):
        to_conversation(rec, SRC, format="alpacca")
    with pytest.raises(RecordError, match="missing field: 'messages'"):
        to_conversation(rec, SRC, format="messages")


def test_registry_names():
    assert {"alpaca", "dolly", "squad", "sharegpt", "messages", "prompt_completion", "text", "preference",
            "multiple_choice"} <= set(FORMATS)


@pytest.mark.parametrize("messages,kind,detail", [
    (msgs(("bot", "x"), ("assistant", "y")), "unknown role", "'bot' in message 1"),
    (msgs(("user", "q")), "no assistant turn", ""),
    (msgs(("user", "q"), ("assistant", "  \n")), "empty content", "message 2 (assistant)"),
    (msgs(("user", ""), ("assistant", "a")), "empty content", "message 1 (user)"),
    (msgs(("assistant", "a"), ("user", "q")), "roles out of order", "assistant message 1 comes before any user"),
    (msgs(("system", "s"), ("assistant", "a")), "roles out of order", "assistant message 2 comes before any user"),
    (msgs(("user", "a"), ("user", "b"), ("assistant", "c")), "roles out of order", "two user messages in a row"),
    (msgs(("user", "a"), ("assistant", "b"), ("assistant", "c")), "roles out of order", "two assistant messages"),
    (msgs(("user", "q"), ("system", "s"), ("assistant", "a")), "roles out of order", "system message 2 is not first"),
    (msgs(("user", "q"), ("tool", "t"), ("assistant", "a")), "roles out of order", "tool message 2"),
    ([], "no messages", ""),
])
def test_message_rules(messages, kind, detail):
    with pytest.raises(RecordError) as e:
        to_conversation({"messages": messages}, SRC)
    assert e.value.kind == kind
    assert str(e.value).startswith(f"{SRC}: {kind}") and detail in str(e.value)


@pytest.mark.parametrize("rec,kind", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 42}]}, "non-string content"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}, "empty content"),
    ({"messages": "hello"}, "mistyped field"),
    ({"messages": [{"role": "user"}]}, "missing field"),
    ({"instruction": 5, "output": "x"}, "mistyped field"),
    ({"instruction": "i", "output": None}, "missing field"),
    ({"text": "  "}, "empty content"),
    ({"foo": 1}, "unknown schema"),
    (["a list"], "not an object"),
    ({"prompt": "p", "chosen": "c", "rejected": ""}, "empty content"),
])
def test_record_errors(rec, kind):
    with pytest.raises(RecordError) as e:
        to_conversation(rec, SRC)
    assert e.value.kind == kind and e.value.source == SRC


def test_unknown_schema_names_the_closest_and_what_it_lacks():
    with pytest.raises(RecordError, match=r"closest: instruction \+ output, without 'output'"):
        to_conversation({"instruction": "Say hi", "input": ""}, SRC)
    # a CSV row whose completion cell is empty: prompt + completion, not KTO's prompt + completion + label
    with pytest.raises(RecordError, match=r"closest: prompt \+ completion, without 'completion'$"):
        to_conversation({"prompt": "Say hi"}, SRC)


def test_xlam_query_answers_tools_as_the_dataset_stores_them():
    rec = {"id": 3, "query": "Weather in Lima and Quito?",
           "answers": json.dumps([{"name": "get_weather", "arguments": {"city": "Lima"}},
                                  {"name": "get_weather", "arguments": {"city": "Quito"}}]),
           "tools": json.dumps([{"name": "get_weather", "description": "Weather",
                                 "parameters": {"city": {"type": "str", "description": "City"}}}])}
    assert detect_format(rec) == "xlam"
    c = to_conversation(rec, SRC)
    assert c.messages == [{"role": "user", "content": "Weather in Lima and Quito?"},
                          {"role": "assistant", "content": "", "tool_calls": [
                              {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
                              for city in ("Lima", "Quito")]}]
    assert c.tools[0]["function"]["name"] == "get_weather" and c.meta["id"] == 3
    # xLAM's {name: {type: "str", ...}} parameters become the JSON Schema clients send at inference
    assert c.tools[0]["function"]["parameters"] == {
        "type": "object", "properties": {"city": {"type": "string", "description": "City"}}, "required": ["city"]}
    optional = json.dumps([{"name": "f", "parameters": {"n": {"type": "int, optional", "default": 3},
                                                        "tags": {"type": "List[str]"}}}])
    assert to_conversation({**rec, "tools": optional}, SRC).tools[0]["function"]["parameters"] == {
        "type": "object", "properties": {"n": {"type": "integer"}, "tags": {"type": "array"}}, "required": ["tags"]}
    with pytest.raises(RecordError, match="empty content: 'answers' holds no call"):
        to_conversation({**rec, "answers": "[]"}, SRC)


@pytest.mark.parametrize("key,turns", [("conversations", [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]),
                                       ("messages", msgs(("user", "Hi"), ("assistant", "Hello")))])
def test_a_system_column_beside_the_messages_is_the_system_message(key, turns):
    """LLaMA-Factory's ShareGPT layout keeps the system prompt in a `system` column: it must not be lost."""
    c = to_conversation({"system": "You are a bot.", key: turns, "id": 1}, SRC)
    assert c.messages == msgs(("system", "You are a bot."), ("user", "Hi"), ("assistant", "Hello"))
    assert c.meta == {"id": 1}
    first = {"system": "Ignored.", key: [{"from": "system", "value": "Own."} if key == "conversations"
                                         else {"role": "system", "content": "Own."}, *turns]}
    assert to_conversation(first, SRC).messages[0]["content"] == "Own."  # the messages' own system message wins


def test_null_keys_a_parquet_struct_column_adds_are_dropped():
    """Arrow stores a column of structs with every key any row has, null where a row has none: a tool's
    schema and a call's arguments must come back as the row wrote them."""
    tool = {"type": "function", "function": {"name": "get_time", "description": None, "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}, "city": None}}}}
    call = {"type": "function", "function": {"name": "get_time", "arguments": {"tz": "CET", "city": None}}}
    c = to_conversation({"tools": [tool], "messages": [{"role": "user", "content": "Time?"},
                                                       {"role": "assistant", "content": None, "tool_calls": [call]}]}, SRC)
    assert c.tools[0]["function"] == {"name": "get_time", "parameters": {"type": "object",
                                                                         "properties": {"tz": {"type": "string"}}}}
    assert c.messages[1]["tool_calls"][0]["function"]["arguments"] == {"tz": "CET"}


def test_message_lists_kept_as_json_strings_are_read():
    """Parquet and Arrow columns of strings hold message lists as JSON text (CSV cells are parsed by the reader)."""
    openai = {"messages": json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])}
    sharegpt = {"conversations": json.dumps([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}])}
    for rec in (openai, sharegpt, {"messages": sharegpt["conversations"]}):
        assert to_conversation(rec, SRC).messages == msgs(("user", "Hi"), ("assistant", "Hello"))
    with pytest.raises(RecordError, match="'messages' must be a list of messages, got str"):
        to_conversation({"messages": "[not json"}, SRC)


def test_alpaca_history_pairs_come_before_the_instruction():
    """LLaMA-Factory's Alpaca layout: `history` holds the earlier turns (they were kept in meta and the
    conversation trained without them); a CSV column holds them as a JSON string."""
    rec = {"instruction": "And Chile?", "input": "", "output": "Santiago.", "system": "Be brief.",
           "history": [["Capital of Peru?", "Lima."], ["Of Bolivia?", "Sucre."]], "id": 3}
    c = to_conversation(rec, SRC)
    assert c.messages == msgs(("system", "Be brief."), ("user", "Capital of Peru?"), ("assistant", "Lima."),
                              ("user", "Of Bolivia?"), ("assistant", "Sucre."), ("user", "And Chile?"),
                              ("assistant", "Santiago."))
    assert c.meta == {"id": 3}
    assert to_conversation({**rec, "history": json.dumps(rec["history"])}, SRC).messages == c.messages
    assert to_conversation({**rec, "history": []}, SRC).messages == msgs(("system", "Be brief."), ("user", "And Chile?"),
                                                                         ("assistant", "Santiago."))
    with pytest.raises(RecordError, match="'history' entry 2 is not a \\[question, answer\\] pair"):
        to_conversation({**rec, "history": [["q", "a"], ["q only"]]}, SRC)


def test_cohere_roles():
    c = to_conversation({"messages": [{"role": "System", "content": "s"}, {"role": "User", "content": "q"},
                                      {"role": "Chatbot", "content": "a"}]}, SRC)
    assert c.messages == msgs(("system", "s"), ("user", "q"), ("assistant", "a"))


@pytest.mark.parametrize("key", ["conversations", "conversation", "messages"])
def test_any_chat_key_holds_either_message_layout(key):
    """LMSYS-Chat-1M and WildChat keep role/content messages under `conversation`, some sets under
    `conversations` (both refused before); ShareGPT's from/value under any of the three."""
    openai = [{"role": "user", "content": "Hi", "language": "English"}, {"role": "assistant", "content": "Hello"}]
    sharegpt = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    for messages, fmt in ((openai, "messages"), (sharegpt, "sharegpt")):
        rec = {key: messages, "model": "vicuna-13b", "turn": 1}
        assert detect_format(rec) == fmt
        c = to_conversation(rec, SRC)
        assert c.messages == msgs(("user", "Hi"), ("assistant", "Hello")) and c.meta == {"model": "vicuna-13b", "turn": 1}


def test_llama_factory_kto_tag_is_the_kto_label():
    """LLaMA-Factory writes KTO data as chat records with a `kto_tag`: the label KTO reads (it stayed a
    meta column, and `sftlab align` with KTO refused every record as unlabelled)."""
    from sftlab.train.preference import _sides

    for tag, label in ((True, True), ("false", False)):
        rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "kto_tag": tag}
        c = to_conversation(rec, SRC)
        assert c.meta == {"label": label} and _sides(c, paired=False) == [(c.messages, label)]
    c = to_conversation({"instruction": "q", "output": "a", "kto_tag": True, "label": "math"}, SRC)
    assert c.meta == {"kto_tag": True, "label": "math"}  # a label of its own is left as it is


def test_amazon_bedrock_and_nova_text_parts_are_read_and_other_parts_named():
    """Amazon Nova's / Bedrock Converse's fine-tuning records write content and the system prompt as
    [{"text": ...}] parts without OpenAI's "type": they were refused as "content is list"."""
    rec = {"schemaVersion": "bedrock-conversation-2024", "system": [{"text": "Be brief."}],
           "messages": [{"role": "user", "content": [{"text": "Hi, "}, {"text": "there"}]},
                        {"role": "assistant", "content": [{"text": "Hello"}]}]}
    c = to_conversation(rec, SRC)
    assert c.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, there"},
                          {"role": "assistant", "content": "Hello"}]
    assert c.meta == {"schemaVersion": "bedrock-conversation-2024"}
    rec["messages"][0]["content"].append({"image": {"format": "png", "source": {"bytes": "..."}}})
    with pytest.raises(RecordError, match=r"message 1 content part 3 is 'image': only text parts are read"):
        to_conversation(rec, SRC)


def test_capybara_input_output_exchanges_are_user_and_assistant_turns():
    """Capybara / Pure-Dove keep a `conversation` of {"input", "output"} exchanges: it was refused as a
    message without a 'role'."""
    rec = {"source": "Dove", "conversation": [{"input": "Hi", "output": "Hello!"}, {"input": "And you?", "output": "Fine."}]}
    assert detect_format(rec) == "messages"
    c = to_conversation(rec, SRC)
    assert [(m["role"], m["content"]) for m in c.messages] == [
        ("user", "Hi"), ("assistant", "Hello!"), ("user", "And you?"), ("assistant", "Fine.")]
    assert c.meta == {"source": "Dove"}
    rec["conversation"].append({"input": "Bye"})
    with pytest.raises(RecordError, match=r"'conversation' turn 3 is not an \{input, output\} exchange"):
        to_conversation(rec, SRC)


def test_openai_preference_fine_tuning_records_are_pairs():
    """OpenAI's (and Together's) preference fine-tuning JSONL keeps the prompt's messages and tools in
    `input` and the answers as `preferred_output` / `non_preferred_output`: it was an unknown schema."""
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]
    rec = {"input": {"messages": [{"role": "user", "content": "How cold is it?"}], "tools": tools,
                     "parallel_tool_calls": True},
           "preferred_output": [{"role": "assistant", "content": "Mild today."}],
           "non_preferred_output": [{"role": "assistant", "content": "Cold."}]}
    assert detect_format(rec) == "preference"
    c = to_conversation(rec, SRC)
    asked = [{"role": "user", "content": "How cold is it?"}]
    assert c.messages == asked + [{"role": "assistant", "content": "Mild today."}]
    assert c.meta["rejected"] == asked + [{"role": "assistant", "content": "Cold."}]
    assert c.tools == tools and c.meta["parallel_tool_calls"] is True
    rec["non_preferred_output"] = rec["preferred_output"]
    with pytest.raises(RecordError, match="identical pair"):
        to_conversation(rec, SRC)
    rec["non_preferred_output"] = [{"role": "user", "content": "Cold."}]
    with pytest.raises(RecordError, match="'non_preferred_output' holds no assistant answer"):
        to_conversation(rec, SRC)
