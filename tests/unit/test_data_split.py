"""split: exact sizes, deterministic by seed, stratified proportions, nothing lost or repeated."""

from __future__ import annotations

from collections import Counter

import pytest

from sftlab.data.conversation import Conversation
from sftlab.data.split import allocate, split_conversations
from sftlab.errors import DataError

NAMES = ["train", "validation", "test"]


def convs(n: int, labels=("a", "b", "c")) -> list[Conversation]:
    return [Conversation(messages=[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "x"}],
                         source=f"f:{i + 1}", meta={"label": labels[i % len(labels)]}) for i in range(n)]


def test_allocate_largest_remainder():
    assert allocate(10, [0.8, 0.1, 0.1]) == [8, 1, 1]
    assert allocate(7, [0.8, 0.1, 0.1]) == [5, 1, 1]  # 5.6, 0.7, 0.7
    assert allocate(1, [0.8, 0.1, 0.1]) == [1, 0, 0]
    assert allocate(5, [1, 1, 1]) == [2, 2, 1]


def test_split_is_a_partition_and_deterministic():
    data = convs(103)
    a = split_conversations(data, NAMES, [0.8, 0.1, 0.1], seed=7)
    b = split_conversations(data, NAMES, [0.8, 0.1, 0.1], seed=7)
    c = split_conversations(data, NAMES, [0.8, 0.1, 0.1], seed=8)
    sources = {k: [x.source for x in v] for k, v in a.items()}
    assert sources == {k: [x.source for x in v] for k, v in b.items()}
    assert sources != {k: [x.source for x in v] for k, v in c.items()}
    assert [len(v) for v in a.values()] == [83, 10, 10]  # 82.4, 10.3, 10.3
    everything = [s for v in sources.values() for s in v]
    assert sorted(everything) == sorted(x.source for x in data) and len(set(everything)) == 103


def test_stratified_keeps_label_proportions():
    data = convs(90, labels=("a", "a", "a", "a", "b", "c"))  # 60 a, 15 b, 15 c
    parts = split_conversations(data, NAMES, [0.6, 0.2, 0.2], seed=0, stratify="label")
    counts = {k: Counter(c.meta["label"] for c in v) for k, v in parts.items()}
    assert counts == {"train": {"a": 36, "b": 9, "c": 9}, "validation": {"a": 12, "b": 3, "c": 3},
                      "test": {"a": 12, "b": 3, "c": 3}}


def test_stratify_needs_the_field():
    data = convs(3)
    data[1].meta = {}
    with pytest.raises(DataError, match="f:2: no field 'label' to stratify by"):
        split_conversations(data, NAMES, [1, 1, 1], stratify="label")
