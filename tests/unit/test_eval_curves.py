"""Where overfitting started, read from metrics.jsonl curves."""

from __future__ import annotations

import json

from sftlab.evaluation.curves import overfitting_onset, read_metrics_jsonl

TRAIN = [(s, 3.0 - 0.1 * s) for s in range(1, 21)]  # training loss falls throughout


def test_onset_is_the_best_eval_before_a_sustained_rise():
    validation = [(4, 2.0), (8, 1.5), (12, 1.6), (16, 1.7), (20, 1.8)]
    assert overfitting_onset(TRAIN, validation, patience=3) == 8
    assert overfitting_onset(TRAIN, validation[:4], patience=3) is None  # only 2 evals after the best


def test_no_onset_while_validation_improves_or_training_loss_rises_too():
    improving = [(4, 2.0), (8, 1.5), (12, 1.4), (16, 1.3), (20, 1.2)]
    assert overfitting_onset(TRAIN, improving, patience=2) is None
    rising_train = [(s, 1.0 + 0.1 * s) for s in range(1, 21)]
    worse = [(4, 2.0), (8, 2.1), (12, 2.2), (16, 2.3)]
    assert overfitting_onset(rising_train, worse, patience=2) is None  # both rise: not overfitting
    assert overfitting_onset(TRAIN, worse, patience=2) == 4


def test_a_new_best_resets_the_count():
    validation = [(2, 2.0), (4, 2.1), (6, 1.9), (8, 2.0), (10, 2.05), (12, 2.1)]
    assert overfitting_onset(TRAIN, validation, patience=3) == 6


def test_read_metrics_jsonl_skips_broken_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    events = [{"step": 1, "loss": 2.5}, {"step": 2, "eval_loss": 1.9}, {"step": 3, "overfit_warning": True,
                                                                       "overfit_start_step": 2},
              {"step": 1, "loss": 2.0}]  # resumed: step 1 logged again
    path.write_text("\n".join(json.dumps(e) for e in events) + '\n{"step": 4, "lo')
    curves = read_metrics_jsonl(path)
    assert curves.train == [(1, 2.0)]
    assert curves.validation == [(2, 1.9)]
    assert curves.flagged[0]["overfit_start_step"] == 2
