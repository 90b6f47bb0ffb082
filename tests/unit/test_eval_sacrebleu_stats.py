"""sftlab's BLEU/chrF bootstrap uses sacrebleu's private sufficient-statistics methods
(`_extract_corpus_statistics`, `_compute_score_from_stats`; sacrebleu has no public API for them).
This test fails loudly if a sacrebleu release changes them."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("cls_name", ["BLEU", "CHRF"])
def test_summed_statistics_reproduce_the_corpus_score(cls_name):
    import numpy as np
    import sacrebleu

    preds = ["the cat sat on the mat", "a quick brown fox", "hello world again", "2021-03-05"]
    refs = [["the cat is on the mat", "the quick brown fox", "hello there world", "2021-03-05"]]
    metric = getattr(sacrebleu, cls_name)()
    assert hasattr(metric, "_extract_corpus_statistics") and hasattr(metric, "_compute_score_from_stats"), (
        f"sacrebleu {sacrebleu.__version__} changed its private statistics API: update evaluation/metrics.py")
    stats = np.array(metric._extract_corpus_statistics(preds, refs), dtype=np.float64)
    assert stats.shape[0] == len(preds)
    score = metric._compute_score_from_stats(list(stats.sum(0))).score
    assert score == pytest.approx(metric.corpus_score(preds, refs).score)
    half = metric._compute_score_from_stats(list(stats[:2].sum(0))).score
    assert half == pytest.approx(metric.corpus_score(preds[:2], [r[:2] for r in refs]).score)
