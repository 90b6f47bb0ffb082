"""The sweep's objective: checked against `sftlab eval`'s metric names before any trial trains,
and read from eval's metrics.json under the name eval reports it by."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sftlab.config import TrainConfig
from sftlab.errors import SftlabError

optuna = pytest.importorskip("optuna")


def config(tmp_path, objective) -> TrainConfig:
    return TrainConfig.model_validate({
        "data": {"train": "t.jsonl", "validation": "v.jsonl"}, "output_dir": str(tmp_path / "sweep"),
        "sweep": {"space": {"lora.r": [4]}, "objective": objective},
    })


@pytest.mark.parametrize("objective, message", [
    ("eval_los", "unknown objective 'eval_los'; did you mean 'eval_loss'"),
    ("rouge_l", "unknown metric 'rouge_l'. Did you mean 'rougeL'"),
    ("rouge", r"'rouge' is several metrics \(rouge1, rouge2, rougeL\)"),
])
def test_a_bad_objective_stops_the_sweep_before_any_trial(tmp_path, monkeypatch, objective, message):
    from sftlab.train import sweep as sw

    started = []
    monkeypatch.setattr(sw, "_child", lambda args, log_path: started.append(args))
    with pytest.raises(SftlabError, match=f"^sweep.objective: {message}") as e:
        sw.run_sweep(config(tmp_path, objective), trials=1, log=lambda _: None)
    assert "\n" not in str(e.value)
    assert not started and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("objective, key", [
    ("eval_loss", "eval_loss"), ("exact_match", "exact_match"), ("rougeL", "rougeL"), ("f1", "macro_f1"),
    ("em", "exact_match"), ("perplexity", "perplexity"), ("choice", "choice_accuracy"),
])
def test_the_objective_is_read_under_the_name_eval_reports(objective, key):
    from sftlab.train.sweep import objective_key

    assert objective_key(objective) == key


def test_a_trial_scored_by_an_alias_reads_the_metric_eval_wrote(tmp_path, monkeypatch):
    # `objective: f1` asks eval for `--metrics f1`, which eval reports as macro_f1.
    from sftlab.train import sweep as sw

    cfg = config(tmp_path, "f1")
    calls = []

    def fake_child(args, log_path):
        calls.append(args)
        if args[0] == "eval":
            assert args[args.index("--metrics") + 1] == "f1"
            out = log_path.parent / "eval"
            out.mkdir()
            (out / "metrics.json").write_text(json.dumps({"metrics": {"accuracy": 0.5, "macro_f1": 0.25}}))
        return subprocess.Popen([sys.executable, "-c", "pass"])

    monkeypatch.setattr(sw, "_child", fake_child)
    study = sw.open_study(tmp_path / "sweep", cfg.sweep)
    study.optimize(lambda t: sw.run_trial(t, cfg, tmp_path / "sweep", log=lambda _: None), n_trials=1)
    assert [a[0] for a in calls] == ["train", "eval"]
    assert study.trials[0].state.name == "COMPLETE" and study.trials[0].value == 0.25
