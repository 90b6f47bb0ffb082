"""A resumed or extended sweep (the same command again, a larger --trials) tries new points."""

from __future__ import annotations

import pytest

from sftlab.config import TrainConfig

optuna = pytest.importorskip("optuna")

SPACE = {"training.learning_rate": {"log_uniform": [1e-5, 3e-3]}, "lora.r": [8, 16, 32]}


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_more_trials_on_a_saved_study_do_not_repeat_the_first_ones(tmp_path, sampler):
    from sftlab.train.sweep import open_study, suggest

    cfg = TrainConfig.model_validate({"data": {"train": "t.jsonl", "validation": "v.jsonl"},
                                      "sweep": {"space": SPACE, "sampler": sampler, "seed": 0}})
    for _ in range(2):  # `sftlab sweep --trials 3`, then `--trials 6` on the same folder
        study = open_study(tmp_path / "sweep", cfg.sweep)
        study.optimize(lambda trial: suggest(trial, SPACE)["training.learning_rate"], n_trials=3)
    rates = [t.params["training.learning_rate"] for t in study.trials]
    assert len(rates) == 6 and len(set(rates)) == 6, rates


def test_a_new_sweep_with_the_same_seed_draws_the_same_points(tmp_path):
    from sftlab.train.sweep import open_study, suggest

    cfg = TrainConfig.model_validate({"data": {"train": "t.jsonl", "validation": "v.jsonl"},
                                      "sweep": {"space": SPACE, "seed": 3}})
    runs = []
    for name in ("a", "b"):
        study = open_study(tmp_path / name, cfg.sweep)
        study.optimize(lambda trial: suggest(trial, SPACE)["training.learning_rate"], n_trials=2)
        runs.append([t.params for t in study.trials])
    assert runs[0] == runs[1]
