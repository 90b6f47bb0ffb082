"""curate: each step exactly, each switchable, every removal recorded with its reason."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from sftlab.data.conversation import Conversation
from sftlab.data.curate import CurateOptions, curate, normalize, scrub_pii

OFF = dict(exact_dedup=False, near_dedup=False, empty_answer=False, prompt_echo=False, repetition=False, refusal=False)


def chat(user: str, answer: str, source: str, system: str | None = None) -> Conversation:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return Conversation(messages=msgs, source=source)


def test_exact_dedup_on_normalised_text_keeps_first():
    convs = [chat("What is 2+2?", "4", "a"), chat("what  is 2+2? ", "4", "b"), chat("What is 2+3?", "5", "c"),
             chat("WHAT IS 2+2?", "4", "d")]
    kept, report = curate(convs, CurateOptions(**{**OFF, "exact_dedup": True}))
    assert [c.source for c in kept] == ["a", "c"]
    assert report.removals == [
        {"source": "b", "reason": "exact duplicate", "detail": "same normalised text", "duplicate_of": "a",
         "record": convs[1].to_json()},
        {"source": "d", "reason": "exact duplicate", "detail": "same normalised text", "duplicate_of": "a",
         "record": convs[3].to_json()},
    ]
    assert normalize("  A\tB  ") == "a b"


def test_near_dedup_keeps_first_and_names_it():
    base = ("Summarize the following text in two sentences: the river flooded the lower town after three days "
            "of heavy rain and the council opened the school as a shelter for families")
    answer = "Heavy rain flooded the lower town. The council opened the school as a shelter for families."
    convs = [chat(base, answer, "orig"), chat(base.replace("three", "four"), answer, "near"),
             chat("Write a haiku about autumn leaves falling on a quiet pond at dusk", "Leaves drift, the pond sleeps.", "other")]
    kept, report = curate(convs, CurateOptions(**{**OFF, "near_dedup": True}))
    assert [c.source for c in kept] == ["orig", "other"]
    assert report.removals[0]["source"] == "near" and report.removals[0]["duplicate_of"] == "orig"
    assert report.examples["near duplicate"][0]["duplicate_of_text"].startswith("Summarize the following")


def test_dedup_keeps_both_labels_of_unpaired_preferences():
    """KTO rows: the same prompt's desirable and undesirable answers are not duplicates of each other."""
    prompt = ("Read this review and say whether the customer would recommend the product to a friend: the "
              "blender is loud but crushes ice in seconds and has lasted two years of daily smoothies")
    convs = [chat(prompt, "Yes, the customer would recommend it.", "good"), chat(prompt, "No.", "bad"),
             chat(prompt, "Yes, the customer would recommend it.", "again")]
    for conv, label in zip(convs, (True, False, True)):
        conv.meta["label"] = label
    kept, _ = curate(convs, CurateOptions(**{**OFF, "near_dedup": True, "exact_dedup": True}))
    assert [c.source for c in kept] == ["good", "bad"]


@pytest.mark.parametrize("option,answer,reason", [
    ("empty_answer", "...", "empty or too-short answer"),
    ("refusal", "I'm sorry, but I can't help with that request.", "boilerplate refusal"),
    ("refusal", "As an AI language model, I do not have opinions.", "boilerplate refusal"),
    ("repetition", "buy now " * 20, "repetitive answer"),
    ("prompt_echo", "Name three primary colours used in painting today", "answer repeats the prompt"),
])
def test_quality_filters_each_switchable(option, answer, reason):
    convs = [chat("Name three primary colours used in painting today", answer, "bad"),
             chat("Name three primary colours", "Red, yellow and blue.", "good")]
    kept, report = curate(convs, CurateOptions(**{**OFF, option: True}))
    assert [c.source for c in kept] == ["good"] and report.removed == {reason: 1}
    kept, report = curate(convs, CurateOptions(**OFF))
    assert len(kept) == 2 and not report.removed


def test_tool_calls_tell_records_apart_and_a_call_is_not_an_empty_answer():
    """Two records that differ only in a call's arguments are not duplicates, and a turn that only
    calls a tool (no text) is an answer, not an empty one."""
    def called(city: str, source: str) -> Conversation:
        call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
        return Conversation(messages=[{"role": "user", "content": "Weather where I am?"},
                                      {"role": "assistant", "content": "", "tool_calls": [call]}], source=source)

    convs = [called("Lima", "a"), called("Oslo", "b"), called("Lima", "c")]
    kept, report = curate(convs, CurateOptions())
    assert [c.source for c in kept] == ["a", "b"]
    assert [(r["source"], r["reason"]) for r in report.removals] == [("c", "exact duplicate")]


def test_quality_filters_spare_good_answers():
    convs = [chat("Sentiment of 'great product'?", "positive", "label"),
             chat("What is 7*6?", "42", "number"),
             chat("Extract the city: I flew from Lisbon to Rome on Monday after the conference ended.", "Lisbon", "span"),
             chat("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters the most.", "long")]
    kept, report = curate(convs, CurateOptions(exact_dedup=False, near_dedup=False))
    assert len(kept) == 4, report.removals


def test_pii_scrubbing_exact():
    counts = __import__("collections").Counter()
    text = ("Mail jane.doe@example.com or call +1 415-555-0132 / (020) 7946 0958; key sk-abcdefghijklmnop1234 "
            "and ghp_abcdefghijklmnopqrstuvwxyz12. Meeting on 2021-03-05 at 10:30, order 12345.")
    assert scrub_pii(text, counts) == ("Mail [EMAIL] or call [PHONE] / [PHONE]; key [API_KEY] and [API_KEY]. "
                                       "Meeting on 2021-03-05 at 10:30, order 12345.")
    assert counts == {"email": 1, "phone": 2, "api_key": 2}


def test_pii_option_scrubs_all_messages_and_counts():
    convs = [chat("My email is a@b.io", "Noted: a@b.io", "x", system="Contact admin@corp.com")]
    kept, report = curate(convs, CurateOptions(**{**OFF, "pii": True}))
    assert [m["content"] for m in kept[0].messages] == ["Contact [EMAIL]", "My email is [EMAIL]", "Noted: [EMAIL]"]
    assert report.pii == {"email": 3}


def test_decontamination_removes_planted_overlaps(tmp_path):
    template = "Answer the question about the passage below."
    passages = [("the old lighthouse keeper rowed out at dawn to fix the broken lamp", "Who rowed out?", "The keeper."),
                ("a young baker sold forty loaves before the market opened on Sunday", "How many loaves?", "Forty."),
                ("the river froze early that winter so the ferry stopped running in November", "When did the ferry stop?", "November."),
                ("two climbers reached the summit after a storm delayed them for a week", "What delayed them?", "A storm.")]
    evals = [chat(f"{template} Passage: {p} {q}", a, f"eval{i}") for i, (p, q, a) in enumerate(passages)]
    evals.append(chat("Capital of Peru?", "Lima", "eval-short"))
    eval_file = tmp_path / "test.jsonl"
    eval_file.write_text("".join(json.dumps(c.to_json()) + "\n" for c in evals))
    train = [
        # shares only the instruction template (in every eval example): not contamination
        chat(f"{template} Passage: a farmer planted beans in spring and sold them in autumn. What did he plant?", "Beans.", "clean1"),
        # an eval example reworded around its passage, question and answer: contaminated
        chat(f"Read this: {passages[2][0]}. {passages[2][1]}", passages[2][2], "planted1"),
        # a short eval example inside a longer one: contaminated
        chat("Quiz time. Capital of Peru?", "Lima", "planted2"),
        # a few words in common with an eval passage: not contamination
        chat(f"{template} Passage: the old lighthouse was painted white last year. What colour is it?", "White.", "clean2"),
    ]
    kept, report = curate(train, CurateOptions(**{**OFF, "decontaminate": [str(eval_file)]}))
    assert [c.source for c in kept] == ["clean1", "clean2"]
    assert report.removed == {"contaminated": 2}
    assert [r["source"] for r in report.removals] == ["planted1", "planted2"]
    # the eval example named is the one overlapped: its file line
    assert report.removals[0]["detail"].endswith(f"{eval_file}:3")
    assert report.removals[1]["detail"].endswith(f"{eval_file}:5")


def test_token_length_filters(tokenizer):
    convs = [chat("Hi", "Hello", "short"), chat("Tell me a story. " * 20, "Once upon a time. " * 20, "long"),
             chat("What is the capital of France?", "Paris.", "ok")]
    # lengths as rendered (SmolLM2 template adds its default system prompt): 34, 234, 41 tokens
    kept, report = curate(convs, CurateOptions(**OFF, min_tokens=38, max_tokens=100), tokenizer=tokenizer)
    assert [c.source for c in kept] == ["ok"]
    assert report.removed == {"too few tokens": 1, "too many tokens": 1}


def test_length_filters_need_a_tokenizer():
    from sftlab.errors import SftlabError

    with pytest.raises(SftlabError, match="need a tokenizer"):
        curate([chat("q", "a", "x")], CurateOptions(max_tokens=10))


def test_options_forbid_unknown_keys():
    with pytest.raises(ValidationError, match="near_dedup_treshold"):
        CurateOptions.model_validate({"near_dedup_treshold": 0.5})


def test_report_counts_add_up():
    convs = [chat("q1 about rivers and lakes in the north", "a1 about water", "1"),
             chat("q1 about rivers and lakes in the north", "a1 about water", "2"),
             chat("q3 something else entirely different", "...", "3")]
    kept, report = curate(convs)
    data = report.to_json()
    assert data["records_in"] == 3 == data["kept"] + data["removed_total"]
    assert data["removed"] == {"exact duplicate": 1, "empty or too-short answer": 1}


def test_decontamination_against_a_dataset_with_splits_reads_the_split_named(tmp_path):
    """A saved DatasetDict's train split is not an eval set: it must be named (PATH:SPLIT), not taken."""
    from datasets import Dataset, DatasetDict

    from sftlab.errors import SftlabError

    rows = lambda texts: Dataset.from_list([{"prompt": t, "completion": "Yes."} for t in texts])  # noqa: E731
    folder = tmp_path / "evalset"
    DatasetDict({"train": rows(["the quick brown fox jumps over the lazy dog near the river bank today"]),
                 "test": rows(["a young baker sold forty loaves before the market opened on that Sunday"])}
                ).save_to_disk(folder)
    train = [chat("the quick brown fox jumps over the lazy dog near the river bank today", "Yes.", "in-train"),
             chat("a young baker sold forty loaves before the market opened on that Sunday", "Yes.", "in-test")]
    with pytest.raises(SftlabError, match=r"holds several splits \(train, test\): name the one to read as .*evalset:SPLIT"):
        curate(train, CurateOptions(**{**OFF, "decontaminate": [str(folder)]}))
    kept, report = curate(train, CurateOptions(**{**OFF, "decontaminate": [f"{folder}:test"]}))
    assert [c.source for c in kept] == ["in-train"] and report.removed == {"contaminated": 1}
