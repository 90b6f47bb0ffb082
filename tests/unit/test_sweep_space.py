"""Sweep pieces that need no training: the space, config errors, pruning that stops a trial."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from sftlab.config import TrainConfig
from sftlab.errors import SftlabError

optuna = pytest.importorskip("optuna")


def config(tmp_path, space, **sweep) -> TrainConfig:
    return TrainConfig.model_validate({
        "data": {"train": "t.jsonl", "validation": "v.jsonl"}, "output_dir": str(tmp_path / "sweep"),
        "sweep": {"space": space, **sweep},
    })


def test_trial_config_sets_dotted_keys_and_drops_the_sweep(tmp_path):
    from sftlab.train.sweep import trial_config

    cfg = trial_config(config(tmp_path, {"lora.r": [4, 8]}), {"lora.r": 4, "training.learning_rate": 3e-4},
                       tmp_path / "t0")
    assert cfg.lora.r == 4 and cfg.training.learning_rate == 3e-4 and cfg.sweep is None
    assert cfg.output_dir == str(tmp_path / "t0")


@pytest.mark.parametrize("space, message", [
    ({"training.learnin_rate": [1e-4]}, "'training.learnin_rate' is not a config key"),
    ({"lora.r": [0, 8]}, "'lora.r' = 0 is not valid"),
    ({"output_dir": ["a", "b"]}, "is not a config key"),
])
def test_bad_space_keys_and_values_are_one_line_errors(tmp_path, space, message):
    from sftlab.train.sweep import check_space

    with pytest.raises(SftlabError, match=message):
        check_space(config(tmp_path, space))


@pytest.mark.parametrize("sweep, message", [
    ({"space": {"training.learning_rate": {"log_uniform": [0, 1e-3]}}}, "log_uniform needs 0 < low < high"),
    ({"space": {"lora.r": {"int": [8, 4]}}}, "int needs low < high"),
    ({"space": {"lora.r": {"int": [1.5, 4]}}}, r"'lora.r': int needs integer bounds, got \[1.5, 4\]"),
    ({"space": {"lora.r": []}}, "no choices"),
    ({"space": {"lora.r": {"uniform": [1, 2]}}, "sampler": "grid"}, "sampler 'grid' needs every parameter as a list"),
    ({"space": {"lora.r": [4]}, "objetive": "f1"}, "unknown key 'sweep.objetive'; did you mean 'sweep.objective'"),
])
def test_bad_sweep_sections_name_the_problem(tmp_path, sweep, message):
    from sftlab.config import load_config

    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"data": {"train": "t.jsonl"}, "sweep": sweep}))
    with pytest.raises(SftlabError, match=message):
        load_config(path)


def test_direction_follows_the_objective(tmp_path):
    from sftlab.train.sweep import direction_of

    assert direction_of(config(tmp_path, {"lora.r": [4]}).sweep) == "minimize"
    assert direction_of(config(tmp_path, {"lora.r": [4]}, objective="exact_match").sweep) == "maximize"
    assert direction_of(config(tmp_path, {"lora.r": [4]}, objective="f1", direction="minimize").sweep) == "minimize"


def test_a_trial_worse_than_the_median_is_pruned_and_its_training_stopped(tmp_path, monkeypatch):
    # The "training" child writes one eval_loss far above the earlier trials' at step 1, then
    # would run for a minute: the sweep must prune it at that report and stop the child.
    from sftlab.train import sweep as sw

    cfg = config(tmp_path, {"lora.r": [4]}, prune_after_trials=2)
    study = sw.open_study(tmp_path / "sweep", cfg.sweep)
    for value in (1.0, 1.2):
        study.add_trial(optuna.trial.create_trial(
            params={"lora.r": 4}, distributions={"lora.r": optuna.distributions.CategoricalDistribution([4])},
            value=value, intermediate_values={1: value}))
    children = []

    def fake_child(args, log_path):
        metrics = log_path.parent / "metrics.jsonl"
        script = f"open({str(metrics)!r}, 'a').write('{{\"step\": 1, \"eval_loss\": 9.0}}\\n'); import time; time.sleep(60)"
        children.append(subprocess.Popen([sys.executable, "-c", script]))
        return children[-1]

    monkeypatch.setattr(sw, "_child", fake_child)
    start = time.time()
    study.optimize(lambda t: sw.run_trial(t, cfg, tmp_path / "sweep", log=lambda _: None), n_trials=1)
    assert time.time() - start < 30
    last = study.trials[-1]
    assert last.state.name == "PRUNED" and last.intermediate_values == {1: 9.0}
    assert children[0].poll() is not None  # the child was stopped


def test_reopening_marks_a_killed_trial_failed_and_queues_its_parameters(tmp_path):
    # What a resumed sweep sees after a kill: one finished trial, one left RUNNING.
    from sftlab.train.sweep import finished, open_study

    cfg = config(tmp_path, {"lora.r": [4, 8, 16]}, sampler="random")
    study = open_study(tmp_path / "sweep", cfg.sweep)
    done = study.ask()
    done.suggest_categorical("lora.r", [4, 8, 16])
    study.tell(done, 1.0)
    killed = study.ask()
    r = killed.suggest_categorical("lora.r", [4, 8, 16])
    assert finished(study) == 1

    again = open_study(tmp_path / "sweep", cfg.sweep)
    states = [t.state.name for t in again.get_trials()]
    assert states == ["COMPLETE", "FAIL", "WAITING"]
    assert finished(again) == 1  # the killed trial does not count: its retry will
    retry = again.ask()
    assert retry.number == 2 and retry.user_attrs["retry_of"] == 1
    assert retry.suggest_categorical("lora.r", [4, 8, 16]) == r
    again.tell(retry, 0.5)
    assert finished(again) == 2
    assert finished(open_study(tmp_path / "sweep", cfg.sweep)) == 2  # nothing left RUNNING: nothing re-queued


def test_a_trial_stopped_by_ctrl_c_is_retried_on_resume(tmp_path, monkeypatch):
    from sftlab.train import sweep as sw

    cfg = config(tmp_path, {"lora.r": [4, 8, 16]}, sampler="random")
    study = sw.open_study(tmp_path / "sweep", cfg.sweep)
    children = []

    def fake_child(args, log_path):
        children.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        return children[-1]

    def interrupted(trial, proc, metrics_path):
        raise KeyboardInterrupt

    monkeypatch.setattr(sw, "_child", fake_child)
    monkeypatch.setattr(sw, "_follow", interrupted)
    with pytest.raises(KeyboardInterrupt):
        study.optimize(lambda t: sw.run_trial(t, cfg, tmp_path / "sweep", log=lambda _: None), n_trials=1)
    assert children[0].poll() is not None
    stopped = study.trials[0]
    assert stopped.state.name == "FAIL" and stopped.user_attrs["interrupted"]
    again = sw.open_study(tmp_path / "sweep", cfg.sweep)
    assert [t.state.name for t in again.get_trials()] == ["FAIL", "WAITING"]
    assert sw.finished(again) == 0
    assert len(sw.open_study(tmp_path / "sweep", cfg.sweep).get_trials()) == 2  # queued once only
