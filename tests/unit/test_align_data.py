"""Preference data: pair checks with file:line errors, and one render path shared with SFT."""

from __future__ import annotations

import json

import pytest

from sftlab.config import DataConfig
from sftlab.data.conversation import Conversation
from sftlab.data.formats import to_conversation
from sftlab.data.load import load_conversations
from sftlab.data.render import RenderOptions, render
from sftlab.errors import DataError
from sftlab.train.preference import load_preferences, render_preferences

GOOD = {"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "5"}


def _write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bad, kind", [
    ({"prompt": "Q?", "chosen": "same", "rejected": " same "}, "identical pair"),
    ({"prompt": "Q?", "chosen": "ok", "rejected": []}, "empty side"),
    ({"prompt": "Q?", "chosen": "ok", "rejected": ""}, "empty content"),
    ({"chosen": "ok", "rejected": "bad"}, "missing prompt"),
    ({"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "b"}]}, "prompt mismatch"),
    ({"prompt": "Q?", "completion": "a", "label": "maybe"}, "mistyped field"),
    ({"prompt": "What is 2+2?", "chosen": [{"role": "user", "content": "What is 3+3?"}, {"role": "assistant", "content": "6"}],
      "rejected": "5"}, "prompt mismatch"),  # a prompt that is not the one inside the conversation
    ({"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": ""}, "malformed transcript"),
])
def test_malformed_pair_names_file_and_line(tmp_path, tokenizer, bad, kind):
    path = _write(tmp_path, [GOOD, GOOD, bad, GOOD])
    data = DataConfig(train=str(path), format="preference")
    with pytest.raises(DataError) as err:
        load_preferences(str(path), tokenizer, data, paired=True)
    assert str(err.value).startswith(f"{path}:3: {kind}")


def test_skip_mode_counts_the_bad_pair_and_keeps_the_rest(tmp_path, tokenizer):
    path = _write(tmp_path, [GOOD, {"prompt": "Q?", "chosen": "x", "rejected": "x"}, GOOD])
    data = DataConfig(train=str(path), on_error="skip")
    rows, stats = load_preferences(str(path), tokenizer, data, paired=True, rejects_path=tmp_path / "rejects.jsonl")
    assert (len(rows), stats.rejected) == (2, 1)
    assert json.loads((tmp_path / "rejects.jsonl").read_text())["kind"] == "identical pair"


def test_schemas_give_the_same_pair():
    """Strings, message lists with the prompt inside, {messages, rejected} and ShareGPT pairs."""
    user = {"role": "user", "content": "Hi?"}
    want = [user, {"role": "assistant", "content": "Hello!"}]
    forms = [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
        {"chosen": want, "rejected": [user, {"role": "assistant", "content": "Go away."}]},
        {"messages": want, "rejected": "Go away."},
        {"conversations": [{"from": "human", "value": "Hi?"}], "chosen": {"from": "gpt", "value": "Hello!"},
         "rejected": {"from": "gpt", "value": "Go away."}},
    ]
    for record in forms:
        c = to_conversation(record, "f:1")
        assert c.messages == want and c.meta["rejected"] == [user, {"role": "assistant", "content": "Go away."}]


def test_native_pair_layouts_keep_their_system_prompt_and_prompt_column():
    """orca_dpo_pairs ({system, question, chosen, rejected}), a system column beside TRL's pairs or KTO
    records, and HH transcripts beside a prompt column: the system message is the conversation's, the
    transcripts are split into turns."""
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Capital of Peru?"}
    for record in ({"system": "Be brief.", "question": "Capital of Peru?", "chosen": "Lima.", "rejected": "Quito."},
                   {"system_prompt": "Be brief.", "prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Quito."}):
        c = to_conversation(record, "f:1")
        assert c.messages == [system, user, {"role": "assistant", "content": "Lima."}]
        assert c.meta["rejected"] == [system, user, {"role": "assistant", "content": "Quito."}]
        assert not {"system", "system_prompt", "question"} & set(c.meta)
    kto = to_conversation({"system": "Be brief.", "prompt": "Capital of Peru?", "completion": "Lima.", "label": True}, "f:2")
    assert kto.messages[0] == system and kto.meta["label"] is True
    hh = to_conversation({"prompt": "Hi?", "chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.",
                          "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}, "f:3")
    assert hh.messages == [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]


def test_a_pair_problem_names_its_side():
    with pytest.raises(DataError, match=r"f:1: empty content: 'rejected': message 2 \(assistant\)"):
        to_conversation({"prompt": "Hi", "chosen": "Hello!", "rejected": " "}, "f:1")


def test_preference_columns_written_as_python_reprs_are_an_error_not_text(tmp_path):
    """pandas writes a column of message lists to CSV as str() of the list: read as text it would train
    "[{'role': ...}]" as the answer."""
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\n\"[{'role': 'user', 'content': 'Hi'}]\",\"[{'role': 'assistant', "
                    "'content': 'Hello'}]\",\"[{'role': 'assistant', 'content': 'Go'}]\"\n"
                    "Plain prompt,\"[1, 2] is a list\",\"['a', 'b']\"\n")
    with pytest.raises(DataError, match=r"pairs.csv:2: malformed JSON: in column 'prompt': .*Python repr"):
        load_conversations(path)
    path.write_text("prompt,chosen,rejected\nPlain prompt,\"[1, 2] is a list\",\"['a', 'b']\"\n")
    (c,) = load_conversations(path)  # answers that look like lists are still answers
    assert c.messages[-1]["content"] == "[1, 2] is a list" and c.meta["rejected"][-1]["content"] == "['a', 'b']"


def test_pairs_with_one_prompt_and_several_rejected_answers_are_not_duplicates(tmp_path):
    from sftlab.data.curate import CurateOptions, curate
    from sftlab.data.validate import ValidateOptions, validate

    rows = [{"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": r} for r in ("Quito.", "Bogota.", "Quito.")]
    path = _write(tmp_path, rows)
    assert validate(path, ValidateOptions()).duplicates == 1  # only the repeated pair
    kept, report = curate(load_conversations(path), CurateOptions())
    assert [c.meta["rejected"][-1]["content"] for c in kept] == ["Quito.", "Bogota."]


def test_unpaired_record_keeps_its_label():
    c = to_conversation({"prompt": "Hi?", "completion": "Hello!", "label": False}, "f:1")
    assert c.messages[-1]["content"] == "Hello!" and c.meta["label"] is False


def test_same_pair_gives_identical_prompt_tokens_for_sft_and_dpo(tmp_path, tokenizer):
    record = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
              "chosen": "Paris.", "rejected": "Lyon, I think."}
    conv = load_conversations(_write(tmp_path, [record]))[0]
    (row,) = render_preferences([conv], tokenizer, paired=True)
    sft = render(conv, tokenizer, RenderOptions(train_on="last"))
    first = sft.labels.index(next(t for t in sft.labels if t != -100))
    assert row["prompt_ids"] == sft.input_ids[:first]
    assert row["chosen_ids"] == [t for t in sft.labels if t != -100]  # DPO scores what SFT trains
    rejected = render(Conversation(conv.meta["rejected"], source=conv.source), tokenizer, RenderOptions(train_on="last"))
    assert rejected.input_ids[:first] == row["prompt_ids"]
    assert row["rejected_ids"] == [t for t in rejected.labels if t != -100]
    assert tokenizer.decode(row["chosen_ids"]).startswith("Paris.")


def test_kto_unpairs_pairs_and_takes_labels(tokenizer):
    pair = to_conversation(GOOD, "f:1")
    single = to_conversation({"prompt": "Hi?", "completion": "Hello!", "label": True}, "f:2")
    rows = render_preferences([pair, single], tokenizer, paired=False)
    assert [r["label"] for r in rows] == [True, False, True]
    assert rows[0]["prompt_ids"] == rows[1]["prompt_ids"]
    with pytest.raises(DataError, match="f:2: not a pair: needs 'chosen' and 'rejected'"):
        render_preferences([single], tokenizer, paired=True)


def test_kto_counts_its_answers_and_warns_when_they_are_unbalanced(tmp_path, tokenizer):
    import re
    import warnings

    from sftlab.config import AlignOptions
    from sftlab.train.align import _warn_if_kto_unbalanced

    rows = [{"prompt": f"Q{i}?", "completion": f"A{i}.", "label": i % 4 != 0} for i in range(8)]
    rows.insert(2, {"prompt": "Q?", "completion": "A.", "label": 1})  # not true/false: a reject, with its kind
    path = _write(tmp_path, rows)
    data = DataConfig(train=str(path), on_error="skip")
    got, stats = load_preferences(str(path), tokenizer, data, paired=False, rejects_path=tmp_path / "rejects.jsonl")
    assert (stats.rows, stats.desirable) == (8, 6)
    assert stats.summary().endswith(f"8 rows from 9 records (6 desirable, 2 undesirable), 1 rejected "
                                    f"(1 no KTO label; {tmp_path / 'rejects.jsonl'})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_if_kto_unbalanced(6, 2, AlignOptions(loss="kto"))  # 3.0: outside [1, 4/3]
        _warn_if_kto_unbalanced(4, 4, AlignOptions(loss="kto"))  # 1.0: fine
        _warn_if_kto_unbalanced(5, 0, AlignOptions(loss="kto"))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "= 3.00, outside the [1, 4/3]" in messages[0] and "one kind only" in messages[1]
    weight = float(re.search(r"align.undesirable_weight: ([\d.]+)", messages[0])[1])
    assert 1 <= 6 / (weight * 2) <= 4 / 3  # the weight it suggests is in the range


def test_a_column_mapped_record_with_a_rejected_column_is_refused_with_the_way_out(tokenizer):
    """orca_dpo_pairs read through data.columns (question -> prompt, chosen -> response): its rejected column
    stays text beside the conversation; it must not reach the template as a message list."""
    from sftlab.data.formats import Columns

    conv = Columns(prompt="question", response="chosen").convert(
        {"question": "2+2?", "chosen": "4", "rejected": "5"}, "orca.jsonl:1")
    with pytest.raises(DataError, match=r"orca.jsonl:1: not a pair: 'rejected' is a plain column .*data.columns"):
        render_preferences([conv], tokenizer, paired=True)
