"""split: exact sizes, deterministic by seed, stratified proportions, duplicates together, nothing lost or repeated."""

from __future__ import annotations

import random
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
    a = split_conversations(data, NAMES, [0.8, 0.1, 0.1], seed=7)[0]
    b = split_conversations(data, NAMES, [0.8, 0.1, 0.1], seed=7)[0]
    c = split_conversations(data, NAMES, [0.8, 0.1, 0.1], seed=8)[0]
    sources = {k: [x.source for x in v] for k, v in a.items()}
    assert sources == {k: [x.source for x in v] for k, v in b.items()}
    assert sources != {k: [x.source for x in v] for k, v in c.items()}
    assert [len(v) for v in a.values()] == [83, 10, 10]  # 82.4, 10.3, 10.3
    everything = [s for v in sources.values() for s in v]
    assert sorted(everything) == sorted(x.source for x in data) and len(set(everything)) == 103


def test_stratified_keeps_label_proportions():
    data = convs(90, labels=("a", "a", "a", "a", "b", "c"))  # 60 a, 15 b, 15 c
    parts = split_conversations(data, NAMES, [0.6, 0.2, 0.2], seed=0, stratify="label")[0]
    counts = {k: Counter(c.meta["label"] for c in v) for k, v in parts.items()}
    assert counts == {"train": {"a": 36, "b": 9, "c": 9}, "validation": {"a": 12, "b": 3, "c": 3},
                      "test": {"a": 12, "b": 3, "c": 3}}


def test_many_small_strata_still_fill_every_split():
    data = convs(24, labels=tuple("abcdefgh"))  # 8 labels of 3 rows: 10 % of 3 rounds to 0 per label
    for seed in range(20):
        parts = split_conversations(data, NAMES, [0.8, 0.1, 0.1], seed=seed, stratify="label")[0]
        assert [len(v) for v in parts.values()] == [19, 3, 2]  # 19.2, 2.4, 2.4
        per_label = Counter(c.meta["label"] for c in parts["train"])
        assert set(per_label) == set("abcdefgh") and set(per_label.values()) <= {2, 3}  # 2.4 each


def test_stratified_totals_follow_the_ratios_for_any_strata():
    rng = random.Random(0)
    for _ in range(300):
        labels = [rng.choice("abcdefg") for _ in range(rng.randint(1, 60))]
        ratios = [rng.choice([0.05, 0.1, 0.2, 0.5, 1]) for _ in range(rng.randint(2, 4))]
        names = [f"s{i}" for i in range(len(ratios))]
        data = [Conversation(messages=[{"role": "user", "content": f"q{i}"}], source=f"f:{i}", meta={"label": x})
                for i, x in enumerate(labels)]
        parts = split_conversations(data, names, ratios, seed=rng.randrange(100), stratify="label")[0]
        assert [len(v) for v in parts.values()] == allocate(len(data), ratios)
        for label, n in Counter(labels).items():
            for share, part in zip(ratios, parts.values()):
                got = sum(c.meta["label"] == label for c in part)
                assert abs(got - n * share / sum(ratios)) < 1 + 1e-9


def test_exact_duplicates_land_in_one_split():
    data = convs(40, labels=("a", "b"))
    for i, j in [(0, 1), (2, 7), (3, 30), (5, 11), (9, 39), (12, 13)]:
        data[j].messages = [dict(m) for m in data[i].messages]
    data[21].messages = [{"role": "user", "content": "Q12 "}, {"role": "assistant", "content": "X"}]  # normalised copy
    for seed in range(30):
        for stratify in (None, "label"):
            parts, together = split_conversations(data, NAMES, [0.8, 0.1, 0.1], seed=seed, stratify=stratify)
            texts = {name: {c.messages[0]["content"].strip().lower() for c in v} for name, v in parts.items()}
            assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
            assert not texts["validation"] & texts["test"]
            assert sorted(c.source for v in parts.values() for c in v) == sorted(c.source for c in data)
            assert together == 6


def test_a_duplicate_group_too_big_for_every_quota_stays_whole():
    data = convs(6)
    for c in data[1:5]:
        c.messages = data[0].messages
    for seed in range(10):
        parts, together = split_conversations(data, NAMES, [0.5, 0.25, 0.25], seed=seed)  # quotas 3, 2, 1
        assert [len(v) for v in parts.values()] == [5, 1, 0] and together == 1
        assert [c.source for c in parts["train"]] == [f"f:{i}" for i in range(1, 6)]


def test_stratify_needs_the_field():
    data = convs(3)
    data[1].meta = {}
    with pytest.raises(DataError, match="f:2: no field 'label' to stratify by"):
        split_conversations(data, NAMES, [1, 1, 1], stratify="label")
