"""A planted overfitting run: early stopping stops it, the warning callback flags it,
and metrics.jsonl holds every log event plus the flag."""

from __future__ import annotations

import json

import pytest
import torch

from sftlab.evaluation.curves import read_metrics_jsonl
from sftlab.train.callbacks import MetricsJsonlCallback, OverfitWarningCallback
from sftlab.train.trainer import RowDataset


def _rows(prompts, answers):
    return [{"input_ids": torch.tensor(p + a), "labels": torch.tensor([-100] * len(p) + a)}
            for p, a in zip(prompts, answers)]


def test_early_stopping_stops_a_planted_overfitting_run(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, EarlyStoppingCallback, Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 1000, (6,), generator=g).tolist() for _ in range(4)]
    train_answers = [torch.randint(1000, 2000, (4,), generator=g).tolist() for _ in range(4)]
    # Planted: validation asks the same prompts with other answers, so memorising the
    # training answers makes validation loss rise while training loss falls.
    eval_answers = [torch.randint(2000, 3000, (4,), generator=g).tolist() for _ in range(4)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    metrics_path = tmp_path / "metrics.jsonl"
    warn = OverfitWarningCallback(patience=2, metrics_path=metrics_path)
    max_steps = 60
    args = TrainingArguments(
        output_dir=str(tmp_path / "checkpoints"), max_steps=max_steps, learning_rate=1e-2, lr_scheduler_type="constant",
        per_device_train_batch_size=4, per_device_eval_batch_size=4, logging_steps=2, eval_strategy="steps",
        eval_steps=2, save_strategy="steps", save_steps=2, save_total_limit=2, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=False, report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0, warmup_steps=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=RowDataset(_rows(prompts, train_answers)),
        eval_dataset=RowDataset(_rows(prompts, eval_answers)),
        callbacks=[MetricsJsonlCallback(metrics_path), warn, EarlyStoppingCallback(early_stopping_patience=2)],
    )
    trainer.train()

    assert trainer.state.global_step < max_steps  # stopped early
    curves = read_metrics_jsonl(metrics_path)
    assert curves.train[-1][1] < curves.train[0][1]  # training loss fell
    best_step, best_loss = min(curves.validation, key=lambda p: p[1])
    assert curves.validation[-1][1] > best_loss
    assert warn.onset_step == best_step
    assert curves.flagged and curves.flagged[0]["overfit_start_step"] == best_step
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    lines = metrics_path.read_text().splitlines()
    assert all(json.loads(line)["step"] >= 0 for line in lines)  # one JSON object per line
    assert trainer.state.best_metric == pytest.approx(best_loss)
