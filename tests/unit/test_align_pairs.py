"""Pairs from a model's mistakes: the wrong answers, and only they, become rejected sides."""

from __future__ import annotations

from sftlab.data.formats import to_conversation
from sftlab.train.mistake_pairs import mistake_pairs


def _conv(i: int, answer: str):
    return to_conversation({"prompt": f"Q{i}?", "completion": answer, "task": "t"}, f"f:{i}")


def test_wrong_answers_become_pairs_right_and_empty_ones_do_not():
    convs = [_conv(1, "2021-03-05"), _conv(2, "Paris"), _conv(3, "42")]
    pairs, stats = mistake_pairs(convs, [" 2021-03-05 ", "  ", "41"])
    assert (stats.examples, stats.correct, stats.empty, stats.pairs) == (3, 1, 1, 1)
    (p,) = pairs
    assert p == {"prompt": [{"role": "user", "content": "Q3?"}], "chosen": "42", "rejected": "41", "source": "f:3",
                 "task": "t"}
    back = to_conversation(p, p["source"])  # a valid preference record
    assert back.reference() == "42" and back.meta["rejected"][-1]["content"] == "41"


def test_case_and_whitespace_do_not_make_a_mistake():
    pairs, stats = mistake_pairs([_conv(1, "Paris")], ["paris"])
    assert pairs == [] and stats.correct == 1


def test_anchor_pairs_keep_right_answers_with_another_reference_of_their_group_rejected():
    convs = [to_conversation({"prompt": f"Review {i}", "completion": label, "task": "sentiment"}, f"f:{i}")
             for i, label in enumerate(["neutral", "neutral", "positive", "negative", "positive", "negative"])]
    convs.append(to_conversation({"prompt": "Date?", "completion": "2020-01-01", "task": "dates"}, "f:6"))  # alone in its group
    predictions = ["positive", "negative", "positive", "negative", "positive", "negative", "2020-01-01"]
    pairs, stats = mistake_pairs(convs, predictions, anchors=1.0)
    mistakes, anchors = pairs[:2], pairs[2:]
    assert [p["chosen"] for p in mistakes] == ["neutral", "neutral"] and stats.pairs == 2
    assert stats.anchors == len(anchors) == 2 and all(p["anchor"] for p in anchors)
    for p in anchors:
        source = convs[int(p["source"].split(":")[1])]
        assert p["chosen"] == source.reference() != p["rejected"]
        assert p["rejected"] in {"neutral", "positive", "negative"}  # another label, never a date
        assert to_conversation(p, p["source"]).reference() == p["chosen"]
    assert mistake_pairs(convs, predictions, anchors=1.0)[0] == pairs  # seeded
    assert mistake_pairs(convs, predictions, anchors=10.0)[1].anchors == 4  # as many as there are right answers
    assert mistake_pairs(convs, predictions)[1].anchors == 0
