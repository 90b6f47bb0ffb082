"""Near-duplicate detection on a constructed set (the benchmark's generator, smaller): near-identical
and lightly paraphrased pairs among hard negatives that share templates or whole passages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench" / "curate_bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("curate_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_near_dup_precision_and_recall_with_default_options():
    bench = _bench()
    convs, truth = bench.make_near_dup_set(n_pairs=300, n_negatives=900, seed=5)
    scores = bench.near_dup_scores(convs, truth)
    assert scores["recall"] >= 0.9, scores
    assert scores["precision"] >= 0.95, scores


def test_stricter_threshold_trades_recall_for_precision():
    bench = _bench()
    convs, truth = bench.make_near_dup_set(n_pairs=200, n_negatives=600, seed=6)
    loose = bench.near_dup_scores(convs, truth, near_dedup_threshold=0.4)
    strict = bench.near_dup_scores(convs, truth, near_dedup_threshold=0.9)
    assert strict["recall"] < loose["recall"] and strict["precision"] >= loose["precision"]
    assert loose["precision"] < 0.95  # siblings sharing a passage are caught at a loose threshold
