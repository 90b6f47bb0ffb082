"""Config -> TrainingArguments: the names mean what HF users expect, and early stopping
brings what transformers needs with it."""

from __future__ import annotations

from sftlab.config import load_config
from sftlab.train.trainer import training_args


def args_for(tmp_path, *overrides, has_eval=True):
    cfg = load_config(None, ["data.train=x.jsonl", *overrides])
    return training_args(cfg, tmp_path, has_eval=has_eval, use_bf16=False)


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


def test_no_deprecation_warning_and_checkpointing_has_one_key(tmp_path):
    """Every run built its TrainingArguments with the deprecated `gradient_checkpointing` name, and
    transformers warned each time; checkpointing is training.gradient_checkpointing, which sftlab
    applies before the LoRA wrap, so HF's own keys for it are refused with that name."""
    import warnings

    import pytest

    from sftlab.errors import SftlabError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = args_for(tmp_path, "training.gradient_checkpointing=true")
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    assert not a.activation_checkpointing  # the model's own is on: build_model applied it
    with pytest.raises(SftlabError, match="training.activation_checkpointing.*set by sftlab; use training.gradient_checkpointing"):
        args_for(tmp_path, "training.activation_checkpointing=true")


def test_no_validation_means_no_evaluation(tmp_path):
    a = args_for(tmp_path, "training.early_stopping_patience=2", has_eval=False)
    assert a.eval_strategy == "no" and not a.load_best_model_at_end


def lr_schedule(tmp_path, steps, *overrides):
    import torch

    from sftlab.train.trainer import SFTTrainer

    cfg = load_config(None, ["data.train=x.jsonl", "training.learning_rate=1.0", f"training.max_steps={steps}",
                             *overrides])
    trainer = SFTTrainer(model=torch.nn.Linear(2, 2), args=training_args(cfg, tmp_path, False, False),
                         warmup_ratio=cfg.training.scheduled_warmup_ratio)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return lrs


def test_warmup_ratio_is_a_ratio_of_the_steps_even_at_one(tmp_path):
    import pytest

    # warmup over the whole run: 0, 1/8, ..., 7/8 of the peak (transformers would read 1.0 as one step)
    assert lr_schedule(tmp_path, 8, "training.warmup_ratio=1.0", "training.lr_scheduler_type=linear") == \
        pytest.approx([i / 8 for i in range(8)])
    # a quarter of 8 steps: 2 warm-up steps, then linear decay to 0 over the remaining 6
    assert lr_schedule(tmp_path, 8, "training.warmup_ratio=0.25", "training.lr_scheduler_type=linear") == \
        pytest.approx([0, 0.5, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert lr_schedule(tmp_path, 4, "training.warmup_ratio=0", "training.lr_scheduler_type=constant") == [1.0] * 4
    # one step: no warm-up, whatever the ratio (its first step's learning rate of 0 would train nothing)
    assert lr_schedule(tmp_path, 1, "training.lr_scheduler_type=linear") == [1.0]


def test_explicit_warmup_steps_win_over_the_default_warmup_ratio(tmp_path):
    import pytest

    from sftlab.errors import SftlabError

    # 4 warm-up steps of 8 (the default warmup_ratio 0.05 would give 1), then linear decay over 4
    assert lr_schedule(tmp_path, 8, "training.warmup_steps=4", "training.lr_scheduler_type=linear") == \
        pytest.approx([0, 0.25, 0.5, 0.75, 1, 0.75, 0.5, 0.25])
    with pytest.raises(SftlabError, match="warmup_steps and warmup_ratio are both given: choose one"):
        load_config(None, ["data.train=x.jsonl", "training.warmup_steps=4", "training.warmup_ratio=0.1"])


def test_lora_and_dora_load_a_bf16_base_full_finetuning_fp32():
    from sftlab.train.trainer import base_weights_dtype

    assert base_weights_dtype("lora", True) == base_weights_dtype("dora", True) == "bfloat16"
    assert base_weights_dtype("full", True) == base_weights_dtype("dora", False) == "float32"
