"""Config -> TrainingArguments: the names mean what HF users expect, and early stopping
brings what transformers needs with it."""

from __future__ import annotations

from sftlab.config import load_config
from sftlab.train.trainer import _training_args


def args_for(tmp_path, *overrides, has_eval=True):
    cfg = load_config(None, ["data.train=x.jsonl", *overrides])
    return _training_args(cfg, tmp_path, has_eval=has_eval, use_bf16=False)


def test_training_fields_pass_through(tmp_path):
    a = args_for(tmp_path, "training.learning_rate=3e-4", "training.per_device_train_batch_size=3",
                 "training.gradient_accumulation_steps=5", "training.num_train_epochs=2.5", "training.seed=7")
    assert (a.learning_rate, a.per_device_train_batch_size, a.gradient_accumulation_steps) == (3e-4, 3, 5)
    assert (a.num_train_epochs, a.seed, a.output_dir) == (2.5, 7, str(tmp_path / "checkpoints"))
    assert not a.remove_unused_columns  # rows of Examples reach the collator untouched


def test_early_stopping_loads_best_and_aligns_save_with_eval_steps(tmp_path):
    a = args_for(tmp_path, "training.early_stopping_patience=2", "training.eval_steps=20", "training.save_steps=50")
    assert a.load_best_model_at_end and a.metric_for_best_model == "eval_loss" and a.greater_is_better is False
    assert a.eval_strategy == "steps" and a.save_steps % a.eval_steps == 0


def test_no_validation_means_no_evaluation(tmp_path):
    a = args_for(tmp_path, "training.early_stopping_patience=2", has_eval=False)
    assert a.eval_strategy == "no" and not a.load_best_model_at_end
