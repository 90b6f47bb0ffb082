"""`sftlab sweep` on the tiny model: a planted best value is found, a killed sweep resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sftlab.cli import main

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from sftlab.demo.dataset import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo"), sizes={"train": 8, "validation": 2, "test": 2})


def write_config(path: Path, tiny_model_dir, demo_data, out: Path, sweep: dict, **training) -> Path:
    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(demo_data["train"]), "validation": str(demo_data["validation"]), "max_seq_length": 128},
        "training": {"per_device_train_batch_size": 4, "learning_rate": 1e-1, "logging_steps": 1, "eval_steps": 2,
                     "warmup_ratio": 0, "lr_scheduler_type": "constant", "bf16": False, "max_steps": 4,
                     "save_steps": 100, **training},
        "output_dir": str(out),
        "sweep": sweep,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def study_trials(sweep_dir: Path) -> list:
    import optuna

    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{sweep_dir / 'sweep.db'}")
    return study.get_trials()


def test_sweep_finds_the_planted_learning_rate(tmp_path, tiny_model_dir, demo_data):
    # On the random tiny model a learning rate of 1e-6 leaves eval loss where it starts (10.78)
    # after 4 steps and 3e-2 brings it down (10.62): the sweep must pick 3e-2 and
    # write it into best.yaml (1e-1 overshoots at this step count).
    out = tmp_path / "sweep"
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, demo_data, out,
                       {"space": {"training.learning_rate": [1e-6, 3e-2]}, "sampler": "grid", "pruner": "none"},
                       max_steps=4, eval_steps=4)
    assert main(["sweep", str(cfg), "--trials", "2"]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    values = {t["params"]["training.learning_rate"]: t["value"] for t in summary["trials"]}
    assert len(values) == 2 and all(t["state"] == "complete" for t in summary["trials"])
    assert summary["best"]["params"] == {"training.learning_rate": 3e-2}
    assert values[3e-2] < values[1e-6] - 0.1
    for t in summary["trials"]:  # each trial is a normal run directory
        run = Path(t["run_dir"])
        assert (run / "run.json").exists() and (run / "adapter" / "adapter_config.json").exists()
        last_eval = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x][-1]
        assert t["value"] == pytest.approx(last_eval["eval_loss"])
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["training"]["learning_rate"] == 3e-2 and "sweep" not in best
    assert best["output_dir"] == str(out / "best")
    html = (out / "report.html").read_text()
    assert "objective.png" in html and "slice-training_learning_rate.png" in html
    assert (out / "objective.png").stat().st_size > 1000


def test_killed_sweep_resumes_without_repeating_finished_trials(tmp_path, tiny_model_dir, demo_data):
    out = tmp_path / "sweep"
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, demo_data, out,
                       {"space": {"training.learning_rate": {"log_uniform": [1e-4, 1e-1]}, "lora.r": [4, 8]},
                        "pruner": "none", "seed": 3},
                       max_steps=2, eval_steps=1)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "sftlab.cli", "sweep", str(cfg), "--trials", "2"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:  # kill the sweep and its trial once trial 0 has finished and trial 1 is training
        while not ((out / "trial-000" / "run.json").exists() and (out / "trial-001" / "metrics.jsonl").exists()):
            assert proc.poll() is None and time.time() < deadline, "sweep ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = study_trials(out)
    assert [t.state.name for t in first] == ["COMPLETE", "RUNNING"]
    finished_mtime = (out / "trial-000" / "run.json").stat().st_mtime_ns

    assert main(["sweep", str(cfg), "--trials", "2"]) == 0
    trials = study_trials(out)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[0].value == first[0].value and (out / "trial-000" / "run.json").stat().st_mtime_ns == finished_mtime
    assert trials[2].params == first[1].params and trials[2].user_attrs["retry_of"] == 1
    assert not (out / "trial-003").exists()
    assert main(["sweep", str(cfg), "--trials", "2"]) == 0  # nothing left to do
    assert len(study_trials(out)) == 3


def test_a_metric_objective_on_column_mapped_data_and_a_failed_trial_in_one_line(tmp_path, tiny_model_dir, capfd):
    """`sftlab eval` in each trial reads data.validation as training reads it: here through a column
    mapping (ask/reply are in no detected schema), so the metric objective can be computed. A trial
    whose `sftlab train` fails (rows too short for any example) is reported in one line with the
    child's own error, no traceback, and the sweep goes on to the next trial."""
    rows = [{"ask": f"What is {i} plus {i}?", "reply": str(2 * i)} for i in range(8)]
    files = {}
    for name, part in (("train", rows[:6]), ("validation", rows[6:])):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in part))
    out = tmp_path / "sweep"
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, files, out,
                       {"space": {"data.max_seq_length": [8, 128]}, "sampler": "grid", "pruner": "none",
                        "objective": "exact_match", "eval_limit": 1}, max_steps=2, eval_steps=2)
    config = yaml.safe_load(cfg.read_text())
    config["data"]["columns"] = {"prompt": "ask", "response": "reply"}
    cfg.write_text(yaml.safe_dump(config))
    assert main(["sweep", str(cfg), "--trials", "2"]) == 0
    text = capfd.readouterr()
    failed = [line for line in (text.out + text.err).splitlines() if " failed: " in line]
    assert len(failed) == 1 and "`sftlab train` exited with 1 (" in failed[0] and "train.log" in failed[0], failed
    assert "Traceback" not in text.out + text.err
    trials = json.loads((out / "sweep.json").read_text())["trials"]
    assert sorted(t["state"] for t in trials) == ["complete", "fail"]
    (trial,) = [t for t in trials if t["state"] == "complete"]
    run = Path(trial["run_dir"])
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())
    assert trial["value"] == evaluated["metrics"]["exact_match"] and 0 <= trial["value"] <= 1
    assert len((run / "eval" / "predictions.jsonl").read_text().splitlines()) == 1
