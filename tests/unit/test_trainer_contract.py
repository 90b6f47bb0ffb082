"""The private transformers.Trainer methods that crash-safe checkpoints override
(train/checkpointing.py): if a transformers release renames them, changes their arguments or
stops writing checkpoints through `_get_output_dir`, these fail at once, naming the method,
instead of checkpoints quietly losing their atomicity."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import Trainer, TrainingArguments

from sftlab.train import checkpointing
from sftlab.train.checkpointing import AtomicCheckpoints
from sftlab.train.run_dir import CHECKPOINT_STATE, STAGING

OVERRIDDEN = {
    "_get_output_dir": ["self", "trial"],
    "_save_checkpoint": ["self", "model", "trial"],
    "_run_epoch": ["self", "model", "epoch", "train_dataloader", "steps_in_epoch", "num_update_steps_per_epoch",
                   "trial", "ignore_keys_for_eval", "start_time", "resume_from_checkpoint", "epochs_trained",
                   "steps_trained_in_current_epoch"],
}


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_the_overridden_private_methods_exist_with_the_expected_arguments(name):
    method = getattr(Trainer, name, None)
    assert callable(method), f"transformers.Trainer.{name} is gone: update train/checkpointing.py"
    params = list(inspect.signature(method).parameters)
    assert params == OVERRIDDEN[name], f"transformers.Trainer.{name}{params}: update train/checkpointing.py"
    assert name in vars(AtomicCheckpoints)


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x, labels=None):
        return {"loss": ((self.linear(x).squeeze(-1) - labels) ** 2).mean()}


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"x": torch.tensor([float(i), 1.0]), "labels": torch.tensor(float(i))}


class CheckpointingTrainer(AtomicCheckpoints, Trainer):
    checkpoint_state = {"config": {}, "data": {}}


def test_a_one_step_save_goes_through_the_staging_folder(tmp_path, monkeypatch):
    committed = []
    real_commit = checkpointing.commit_checkpoint

    def commit(staged, final):
        committed.append((staged.relative_to(tmp_path), sorted(p.name for p in staged.iterdir())))
        real_commit(staged, final)

    monkeypatch.setattr(checkpointing, "commit_checkpoint", commit)
    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), max_steps=1, save_steps=1, report_to=[],
                             per_device_train_batch_size=2, use_cpu=True, disable_tqdm=True)
    CheckpointingTrainer(model=Regression(), args=args, train_dataset=Rows()).train()
    (staged, files), = committed
    assert staged.as_posix() == f"checkpoints/{STAGING}/checkpoint-1"
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", CHECKPOINT_STATE} <= set(files)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-1"]
