"""split as a dataset grows and as real data is shaped: records added later, several records of one
conversation, augmented records."""

from __future__ import annotations

import pytest

from sftlab.data.augment import augment
from sftlab.data.conversation import Conversation
from sftlab.data.split import split_conversations
from sftlab.errors import DataError, SftlabError

NAMES = ["train", "validation", "test"]


def qa(i: int, **meta) -> Conversation:
    return Conversation(messages=[{"role": "user", "content": f"question {i}"},
                                  {"role": "assistant", "content": f"answer {i}"}], source=f"f:{i}", meta=meta)


def where(parts: dict[str, list[Conversation]]) -> dict[str, str]:
    return {c.source: name for name, convs in parts.items() for c in convs}


@pytest.mark.parametrize("stratify", [None, "label"])
def test_records_added_later_move_few_others_and_none_between_train_and_test(stratify):
    """Before: 45 of 1,000 records changed split when 10 were appended, 8 of them between train and test."""
    data = [qa(i, label="ab"[i % 2]) for i in range(1010)]
    before = where(split_conversations(data[:1000], NAMES, [0.8, 0.1, 0.1], seed=0, stratify=stratify)[0])
    after = where(split_conversations(data, NAMES, [0.8, 0.1, 0.1], seed=0, stratify=stratify)[0])
    moved = [(before[s], after[s]) for s in before if before[s] != after[s]]
    assert len(moved) <= 10 and not {("train", "test"), ("test", "train")} & set(moved), moved


def test_records_of_one_conversation_stay_in_one_split():
    """A long chat cut into parts (ShareGPT's `id_0`, `id_1`, ...) or several records per thread."""
    data = [qa(i, conversation_id=f"c{i // 4}") for i in range(200)]
    parts, _ = split_conversations(data, NAMES, [0.8, 0.1, 0.1], seed=1, group="conversation_id")
    homes: dict[str, set[str]] = {}
    for name, convs in parts.items():
        for c in convs:
            homes.setdefault(c.meta["conversation_id"], set()).add(name)
    assert all(len(h) == 1 for h in homes.values())
    assert [len(v) for v in parts.values()] == [160, 20, 20]
    with pytest.raises(DataError, match="f:0: no field 'thread' to group by"):
        split_conversations(data, NAMES, [0.8, 0.1, 0.1], group="thread")


def test_augmented_records_are_refused_with_what_to_do():
    """Variants of a validation or test record in train would train on its answer."""
    data = [qa(i) for i in range(20)]
    variants, _ = augment(data)
    with pytest.raises(SftlabError, match="20 records were made by `sftlab data augment` .*augment the train split"):
        split_conversations([*data, *variants], NAMES, [0.8, 0.1, 0.1])
