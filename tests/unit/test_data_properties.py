"""Property-based: random records, files and conversations never crash the loaders or the renderer.

Every outcome is a valid Conversation / Example or a DataError naming the record's source;
skip mode accounts for every line (records in == kept + rejected).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sftlab.data.conversation import ROLES, Conversation
from sftlab.data.formats import FORMATS, check_messages, to_conversation
from sftlab.data.load import RejectLog, load_conversations
from sftlab.data.render import IGNORE, RenderOptions, render
from sftlab.errors import DataError, SftlabError

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# any code point, lone surrogates included (JSON can carry them as \udXXX escapes)
text = st.one_of(st.text(max_size=12), st.text(st.characters(exclude_categories=()), max_size=12),
                 st.sampled_from(["", " ", "\n", "\x00", "\ud800", "<|im_end|>", "<|im_start|>", "{{ x }}", "é" * 3]))
keys = st.sampled_from(sorted({"prompt", "completion", "response", "instruction", "input", "output", "question",
                               "answer", "answers", "context", "messages", "conversations", "text", "system",
                               "chosen", "rejected", "label", "role", "content", "from", "value", "x"}))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.one_of(keys, text), inner, max_size=4)),
                           max_leaves=12)
roles = st.one_of(st.sampled_from([*ROLES, "human", "gpt", "developer", "bot"]), text, st.integers())
message = st.fixed_dictionaries({"role": roles, "content": st.one_of(text, st.integers(), st.none())})
records = st.one_of(
    json_values,
    st.dictionaries(keys, json_values, max_size=5),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=5)}),
    st.fixed_dictionaries({"prompt": st.one_of(text, st.lists(message, max_size=2)), "completion": text}),
)


def assert_valid(conv: Conversation, source: str) -> None:
    assert conv.source == source
    if conv.is_raw_text:
        assert conv.text.strip()
        conv.text.encode("utf-8")
    else:
        check_messages(conv.messages, source)  # raises if the converter let a bad one through
        for m in conv.messages:
            assert set(m) == {"role", "content"} and m["role"] in ROLES and isinstance(m["content"], str)
    json.dumps(conv.to_json(), ensure_ascii=False)


@SETTINGS
@given(record=records, fmt=st.sampled_from([None, *FORMATS]))
def test_any_record_converts_or_is_a_clear_reject(record, fmt):
    try:
        conv = to_conversation(record, "f.jsonl:7", fmt)
    except DataError as e:
        assert e.source == "f.jsonl:7" and str(e).startswith("f.jsonl:7: ") and e.reason
        return
    assert_valid(conv, "f.jsonl:7")


lines = st.one_of(records.map(lambda r: json.dumps(r)),  # escapes lone surrogates as \udXXX
                  records.map(lambda r: json.dumps(r, ensure_ascii=False)).filter(lambda s: "\ud800" not in s),
                  st.text(max_size=20), st.just(""), st.just("{"), st.just("[1,"))


@SETTINGS
@given(body=st.lists(lines, max_size=8), raw=st.binary(max_size=30))
def test_jsonl_files_account_for_every_line(body, raw, tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "x.jsonl"
    data = "\n".join(ln.replace("\n", " ").replace("\r", " ") for ln in body).encode("utf-8", "surrogatepass") + b"\n" + raw
    path.write_bytes(data)
    rejects = RejectLog()
    try:
        convs = load_conversations(path, on_error="skip", rejects=rejects)
    except DataError as e:  # only a whole-file problem (a UTF-16 byte-order mark, one JSON document) may stop skip mode
        assert str(e).startswith(f"{path}:1: not UTF-8") or (
            "this is one JSON document" in str(e) and json.loads(data.decode("utf-8")) is not None)
        return
    for c in convs:
        assert_valid(c, c.source)
    lines_in = sum(1 for ln in data.split(b"\n") if ln.strip())
    assert len(convs) + rejects.total == lines_in
    try:
        strict = load_conversations(path)
    except DataError as e:
        assert rejects.total and str(e).startswith(f"{path}:")
    else:
        assert rejects.total == 0 and len(strict) == len(convs)


@SETTINGS
@given(raw=st.binary(max_size=60), suffix=st.sampled_from([".json", ".csv", ".tsv", ".parquet"]))
def test_random_bytes_in_any_format_are_a_clear_error(raw, suffix, tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / f"x{suffix}"
    path.write_bytes(raw)
    for mode in ("raise", "skip"):
        rejects = RejectLog()
        try:
            convs = load_conversations(path, on_error=mode, rejects=rejects)
        except SftlabError as e:
            assert str(e).startswith(str(path)) and "\n" not in str(e)
        else:
            for c in convs:
                assert_valid(c, c.source)


turn_text = st.one_of(st.text(min_size=1, max_size=10), st.text(st.characters(exclude_categories=()), min_size=1, max_size=10),
                      st.sampled_from(["<|im_end|>", "\n", " a ", "T", "assistant", "<|im_start|>user"]))


@st.composite
def chats(draw):
    """Mostly well-formed chats (system?, then user/assistant turns), sometimes any roles."""
    if draw(st.booleans()):
        n = draw(st.integers(1, 3))
        msgs = [{"role": "system", "content": draw(turn_text)}] if draw(st.booleans()) else []
        for _ in range(n):
            msgs += [{"role": "user", "content": draw(turn_text)}, {"role": "assistant", "content": draw(turn_text)}]
        return msgs
    return draw(st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": turn_text}), max_size=5))


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(messages=chats(), train_on=st.sampled_from(["all", "last"]), max_len=st.sampled_from([None, 24, 4096]),
       truncation=st.sampled_from(["drop", "truncate"]))
@example(messages=[{"role": "user", "content": "0"}, {"role": "assistant", "content": "0\x1f"}],  # found by this test:
         train_on="all", max_len=None, truncation="drop")  # whitespace str.strip() takes but the marker pattern did not
@example(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok\u00a0\r"}],
         train_on="all", max_len=None, truncation="drop")
def test_render_gives_a_valid_example_or_a_clear_reject(tokenizer, messages, train_on, max_len, truncation):
    try:
        conv = to_conversation({"messages": messages}, "c.jsonl:3")
    except DataError as e:
        assert e.source == "c.jsonl:3"
        return
    options = RenderOptions(train_on=train_on, max_seq_length=max_len, truncation=truncation)
    try:
        ex = render(conv, tokenizer, options)
    except DataError as e:  # over-long under "drop", or nothing trained left after truncation
        assert e.source == "c.jsonl:3" and max_len is not None
        return
    ids, labels = ex.input_ids, ex.labels
    assert len(ids) == len(labels) > 0 and ex.num_trained > 0
    assert all(lab in (IGNORE, tok) for tok, lab in zip(ids, labels))
    assert max_len is None or len(ids) <= max_len
    if max_len is None or not ex.truncated:
        # the template's own tokens: the rendering is exactly apply_chat_template's
        assert ids == tokenizer.apply_chat_template(conv.messages, tokenize=True, return_dict=True)["input_ids"]
        trained = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
        # each answer as the tokenizer gives it back (it drops bytes of characters it cannot encode)
        answers = [tokenizer.decode(tokenizer(m["content"].strip(), add_special_tokens=False)["input_ids"])
                   for m in conv.messages if m["role"] == "assistant"]
        pos = 0
        for answer in (answers[-1:] if train_on == "last" else answers):
            pos = trained.find(answer, pos)
            assert pos >= 0, (answer, trained)
            pos += len(answer)


@pytest.mark.parametrize("content", ["\ud800", "ok \udfff", "a\ud83d"])
def test_lone_surrogates_are_rejected_by_the_converters(content):
    """Strings built in Python (not read from a file) are checked too."""
    with pytest.raises(DataError, match="invalid unicode: message 2 \\(assistant\\) holds a lone surrogate"):
        to_conversation({"prompt": "q", "completion": content}, "m:1")
    with pytest.raises(DataError, match="invalid unicode"):
        to_conversation({"text": content}, "m:1")


cells = st.one_of(st.text(max_size=8), st.sampled_from(["", " ", '"', '""', "a,b", "x\ny", "\r\n", "[1,", "é"]))


@SETTINGS
@given(rows=st.lists(st.tuples(cells, cells), max_size=6))
def test_csv_written_by_the_csv_module_reads_back_row_for_row(rows, tmp_path_factory):
    """Any cells (quotes, commas, newlines) written by Python's csv writer: each row is one record,
    kept with its cells or rejected, and the sources are the physical lines where rows start."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)  # "\r\n" ends rows, so a cell holding "\r" or "\n" is quoted
    writer.writerow(["prompt", "completion"])
    writer.writerows(rows)
    path = tmp_path_factory.mktemp("p") / "x.csv"
    path.write_bytes(buf.getvalue().encode("utf-8", "surrogatepass"))
    rejects = RejectLog()
    convs = load_conversations(path, on_error="skip", rejects=rejects)
    written = [r for r in rows if any(c.strip() for c in r)]  # whitespace-only rows are skipped like blank lines
    assert len(convs) + rejects.total == len(written)
    kept = {c.source: c for c in convs}
    line = 2
    for prompt, completion in rows:
        source = f"{path}:{line}"
        if source in kept:
            assert kept[source].messages[0]["content"] == prompt and kept[source].messages[-1]["content"] == completion
        line += 1 + prompt.count("\n") + completion.count("\n")  # lines end at "\n" (a "\r" alone ends none)
