"""Packing and padding-free collation: exact rows, positions and labels."""

from __future__ import annotations

import random

import pytest

from sftlab.data.conversation import Example
from sftlab.data.pack import collate, pack, packing_stats
from sftlab.data.render import IGNORE


def test_best_fit_decreasing_exact_bins():
    assert pack([5, 3, 7, 2, 8, 1, 4], 10) == [[4, 3], [2, 1], [0, 6, 5]]
    # best fit, not first fit: the 2 goes to the bin with 2 free, not the one with 4 free
    assert pack([6, 8, 2], 10) == [[1, 2], [0]]


def test_pack_keeps_every_example_once_and_respects_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    bins = pack(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    # BFD is within 11/9 OPT + 1; the simple lower bound is sum / capacity
    assert len(bins) <= 11 / 9 * (sum(lengths) / 64) + 2


def test_pack_rejects_an_over_long_example():
    with pytest.raises(ValueError, match="example 1 has 11 tokens"):
        pack([3, 11], 10)


def test_collate_rows_positions_and_labels_exactly():
    a = Example([1, 2, 3], [IGNORE, 2, 3])
    b = Example([4, 5], [4, 5])  # first label is dropped: nothing predicts an example's first token
    c = Example([6, 7, 8, 9], [IGNORE, IGNORE, 8, 9])
    batch = collate([[a, b], [c]])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 6]]  # padding: the row's first token
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5], [IGNORE, IGNORE, 8, 9, IGNORE]]
    assert "attention_mask" not in batch


def test_packing_stats_counts():
    rows = [[Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [IGNORE])], [Example([5, 6], [IGNORE, 6])]]
    s = packing_stats(rows, batch_rows=2)
    assert (s["real_tokens"], s["computed_tokens"], s["trained_tokens"]) == (6, 8, 3)
    assert s["padding_ratio"] == pytest.approx(0.25)
