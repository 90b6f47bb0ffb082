"""augment: provenance on every new record, user-side-only noise, and no duplicates added."""

from __future__ import annotations

from sftlab.data.augment import AugmentOptions, LocalGenerator, augment
from sftlab.data.conversation import Conversation
from sftlab.data.curate import exact_key


def chat(*turns, source="f:1", system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return Conversation(messages=msgs, source=source, meta={"label": "x"})


DATA = [chat("Classify the sentiment of this review: the kettle broke after a day.", "negative", source="f:1"),
        chat("Convert this date to ISO format: March 5, 2021", "2021-03-05", source="f:2", system="Be exact."),
        chat("Hi there, who are you?", "I am an assistant.", "What can you do?", "Answer questions.", source="f:3")]


def test_rule_strategies_keep_provenance_and_add_no_duplicates():
    new, report = augment(DATA, AugmentOptions(strategies=["paraphrase", "system", "noise", "prefixes"], copies=2, seed=1))
    assert new and all(c.meta["augmented_from"] in {"f:1", "f:2", "f:3"} for c in new)
    assert all(c.meta["label"] == "x" and c.meta["augmentation"] in {"paraphrase", "system", "noise", "prefixes"} for c in new)
    keys = [exact_key(c) for c in [*DATA, *new]]
    assert len(set(keys)) == len(keys)  # nothing duplicates a source or another new record
    assert report.kept == {s: sum(c.meta["augmentation"] == s for c in new) for s in ("paraphrase", "system", "noise", "prefixes")}
    assert report.to_json()["kept_total"] == len(new)


def test_noise_touches_user_turns_only():
    new, _ = augment(DATA, AugmentOptions(strategies=["noise"], seed=3))
    for c in new:
        src = next(d for d in DATA if d.source == c.meta["augmented_from"])
        for before, after in zip(src.messages, c.messages):
            assert before["role"] == after["role"]
            if before["role"] != "user":
                assert before == after
        assert any(b["content"] != a["content"] for b, a in zip(src.messages, c.messages))


def test_prefixes_and_system_variation_exact():
    new, _ = augment(DATA, AugmentOptions(strategies=["prefixes"]))
    assert [(c.meta["augmented_from"], c.messages) for c in new] == [("f:3", DATA[2].messages[:2])]
    new, _ = augment(DATA[1:2], AugmentOptions(strategies=["system"], copies=10))
    assert len(new) == 4  # one per built-in system prompt
    assert all(c.messages[0]["role"] == "system" and c.messages[1:] == DATA[1].messages[1:] for c in new)


def test_paraphrase_templates_change_only_the_first_user_turn():
    new, _ = augment(DATA[:1], AugmentOptions(strategies=["paraphrase"], copies=3, seed=0))
    assert len(new) == 3
    for c in new:
        assert c.messages[1] == DATA[0].messages[1]
        assert "the kettle broke after a day" in c.messages[0]["content"]
        assert c.messages[0]["content"] != DATA[0].messages[0]["content"]


class CannedGenerator(LocalGenerator):
    """The generation interface with fixed replies, to test parsing, provenance and filtering exactly."""

    def __init__(self, replies):
        self.replies = list(replies)

    def generate(self, prompts, opts):
        assert len(prompts) == len(self.replies)
        return self.replies


def test_self_instruct_parses_filters_and_records_seeds():
    replies = ["Instruction: Convert this date to ISO format: July 9, 1999\nAnswer: 1999-07-09",
               "Sorry, I do not know.",  # unparseable
               "Instruction: Convert this date to ISO format: March 5, 2021\nAnswer: 2021-03-05",  # copies a source
               "Instruction: Convert this date to ISO format: July 9, 1999\nAnswer: 1999-07-09"]  # repeats the first
    opts = AugmentOptions(strategies=["self_instruct"], self_instruct_count=4, seeds_per_prompt=2, seed=0)
    new, report = augment(DATA, opts, generator=CannedGenerator(replies))
    assert [c.messages for c in new] == [[{"role": "user", "content": "Convert this date to ISO format: July 9, 1999"},
                                          {"role": "assistant", "content": "1999-07-09"}]]
    assert len(new[0].meta["augmented_from"]) == 2 and set(new[0].meta["augmented_from"]) <= {"f:1", "f:2", "f:3"}
    assert report.unparseable == 1 and report.generated["self_instruct"] == 3 and report.kept["self_instruct"] == 1
    # the copy of f:2 lacks its system prompt, so it is a near (not exact) duplicate of it
    assert report.filtered["self_instruct"]["removed"] == {"near duplicate": 1, "exact duplicate": 1}
    examples = report.filtered["self_instruct"]["examples"]
    assert examples["near duplicate"][0]["duplicate_of"] == "f:2"
    assert examples["exact duplicate"][0]["duplicate_of"] == "self_instruct#0"


def test_model_paraphrase_with_a_real_tiny_model(tiny_model_dir):
    opts = AugmentOptions(strategies=["model_paraphrase"], max_new_tokens=8, batch_size=2, model=str(tiny_model_dir))
    new, report = augment(DATA[:2], opts)
    assert report.generated["model_paraphrase"] + report.unparseable == 2
    for c in new:
        src = next(d for d in DATA if d.source == c.meta["augmented_from"])
        assert c.meta["augmentation"] == "model_paraphrase"
        assert c.messages[-1] == src.messages[-1]  # the answer is kept
