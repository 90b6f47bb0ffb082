"""A planted overfitting run through sftlab's own training path (`train(config)`, SFTTrainer):
early stopping stops it `patience` evaluations after the best per-token eval loss, the best
checkpoint is the model saved, the warning callback flags it, and metrics.jsonl holds every
log event plus the flag."""

from __future__ import annotations

import json
import random

import pytest
from conftest import train_set_loss
import torch

from sftlab.evaluation.curves import read_metrics_jsonl

WORDS = ("apple river stone cloud maple ember violet harbor lantern meadow copper falcon "
         "willow summit cedar orbit prairie quartz saffron tundra").split()


def _write(path, prompts, answers):
    with open(path, "w", encoding="utf-8") as f:
        for p, a in zip(prompts, answers):
            f.write(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}) + "\n")
    return path


def test_early_stopping_stops_a_planted_overfitting_run(tmp_path, tiny_model_dir, tokenizer):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sftlab.config import load_config
    from sftlab.train.trainer import train

    rng = random.Random(0)
    phrase = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    prompts = [phrase(6) for _ in range(4)]
    # Planted: validation asks the same prompts with other answers (of other lengths, so the
    # per-token figure matters), so memorising the training answers makes validation loss
    # rise while training loss falls.
    train_file = _write(tmp_path / "train.jsonl", prompts, [phrase(4) for _ in range(4)])
    valid_file = _write(tmp_path / "valid.jsonl", prompts, [phrase(n) for n in (1, 2, 9, 12)])
    out = tmp_path / "run"
    patience, max_steps = 2, 60
    config = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={train_file}", f"data.validation={valid_file}",
        f"output_dir={out}", "method=full", f"training.max_steps={max_steps}", "training.learning_rate=1e-2",
        "training.lr_scheduler_type=constant", "training.warmup_ratio=0", "training.per_device_train_batch_size=4",
        "training.per_device_eval_batch_size=2", "training.logging_steps=2", "training.eval_steps=2",
        "training.save_steps=2", f"training.early_stopping_patience={patience}", "training.bf16=false",
    ])
    info = train(config, log=lambda *_: None)

    assert info["global_step"] < max_steps  # stopped early
    curves = read_metrics_jsonl(out / "metrics.jsonl")
    assert curves.train[-1][1] < curves.train[0][1]  # training loss fell
    steps = [s for s, _ in curves.validation]
    assert steps == list(range(2, info["global_step"] + 1, 2))  # an evaluation every eval_steps, none lost
    best_step, best_loss = min(curves.validation, key=lambda p: p[1])
    # stopped exactly `patience` evaluations after the best one
    assert steps.index(best_step) == len(steps) - 1 - patience
    assert all(loss > best_loss for _, loss in curves.validation[steps.index(best_step) + 1:])
    assert curves.flagged and curves.flagged[0]["overfit_start_step"] == best_step
    assert info["best_checkpoint"].endswith(f"checkpoint-{best_step}")

    # the saved model is the best checkpoint's, and its eval loss is the per-token loss of the set
    saved = load_file(out / "model" / "model.safetensors")
    best = load_file(out / "checkpoints" / f"checkpoint-{best_step}" / "model.safetensors")
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in saved)
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    assert train_set_loss(model, valid_file, tokenizer) == pytest.approx(best_loss, rel=1e-4)
