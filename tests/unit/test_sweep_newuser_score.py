"""A trial is scored on the model its run keeps: with early stopping, the best checkpoint, not the last evaluation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sftlab.config import TrainConfig

optuna = pytest.importorskip("optuna")

EVALS = [(10, 0.9), (20, 0.5), (30, 0.7), (40, 0.8)]  # overfits after step 20


def score(tmp_path, monkeypatch, **training) -> float:
    from sftlab.train import sweep as sw

    cfg = TrainConfig.model_validate({
        "data": {"train": "t.jsonl", "validation": "v.jsonl"}, "output_dir": str(tmp_path / "sweep"),
        "training": {"eval_steps": 10, "save_steps": 10, **training}, "sweep": {"space": {"lora.r": [4]}}})

    def fake_training(args, log_path):  # what `sftlab train` leaves in the run dir
        run = log_path.parent
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval_loss": v}) + "\n" for s, v in EVALS))
        (run / "run.json").write_text(json.dumps({"best_checkpoint": str(run / "checkpoints" / "checkpoint-20")}))
        return subprocess.Popen([sys.executable, "-c", "pass"])

    monkeypatch.setattr(sw, "_child", fake_training)
    study = sw.open_study(tmp_path / "sweep", cfg.sweep)
    study.optimize(lambda t: sw.run_trial(t, cfg, tmp_path / "sweep", log=lambda _: None), n_trials=1)
    return study.trials[0].value


def test_an_early_stopped_trial_scores_its_best_checkpoint(tmp_path, monkeypatch):
    assert score(tmp_path, monkeypatch, early_stopping_patience=2) == 0.5


def test_a_trial_that_keeps_its_last_weights_scores_its_last_evaluation(tmp_path, monkeypatch):
    assert score(tmp_path, monkeypatch) == 0.8
