"""`training.report_to` reaches transformers' trackers: TensorBoard and MLflow (local file store) get the loss."""

from __future__ import annotations

import json

import pytest

from sftlab.cli import main

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def test_tensorboard_and_mlflow_hold_the_training_loss(tmp_path, tiny_model_dir, monkeypatch):
    from sftlab.demo.dataset import write_demo_dataset

    data = write_demo_dataset(tmp_path / "data", sizes={"train": 8, "validation": 2, "test": 2})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sftlab-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x refuses a file store without it
    out = tmp_path / "run"
    assert main(["train", "-", f"model.name_or_path={tiny_model_dir}", f"data.train={data['train']}",
                 f"output_dir={out}", "data.max_seq_length=128", "training.per_device_train_batch_size=4",
                 "training.max_steps=3", "training.logging_steps=1", "training.bf16=false",
                 "training.report_to=[tensorboard, mlflow]"]) == 0
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]  # metrics.jsonl stays
    losses = {e["step"]: e["loss"] for e in logged if "loss" in e}
    assert sorted(losses) == [1, 2, 3]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(out.glob("checkpoints/runs/*/events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tb = {s.step: s.value for s in acc.Scalars("train/loss")}
    assert tb == pytest.approx(losses, rel=1e-6)

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("sftlab-test").experiment_id])
    assert len(runs) == 1
    history = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert history == pytest.approx(losses, rel=1e-6)
