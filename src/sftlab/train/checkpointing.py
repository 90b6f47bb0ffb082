"""Crash-safe saving shared by `sftlab train` and `sftlab align`: checkpoints written into a
staging folder and renamed into place whole, the final weights and tokenizer folders written
the same way, and a failed write (full disk, out of memory) turned into a clear message."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from sftlab.errors import SftlabError
from sftlab.files import staging_name, write_json
from sftlab.train.guards import TRAIN_RESUME, is_save_failure, save_failure_message
from sftlab.train.run_dir import CHECKPOINT_STATE, STAGING, commit_checkpoint, commit_folder, last_good_checkpoint


@contextmanager
def explained_save_failure(name: str, run_dir: Path, resume_command: str, cleanup: Callable[[], None] = lambda: None):
    """Turn a write that runs out of disk or memory into an SftlabError naming the checkpoint
    that is still intact and how to continue; `cleanup` removes the half-written output first."""
    try:
        yield
    except Exception as e:
        if not is_save_failure(e):
            raise
        cleanup()
        raise SftlabError(save_failure_message(name, e, last_good_checkpoint(run_dir), resume_command)) from None


class AtomicCheckpoints:
    """A mixin, first in the bases of a transformers Trainer (SFTTrainer, the align trainers).

    It overrides three private Trainer methods, whose names and signatures
    tests/unit/test_trainer_contract.py checks against the installed transformers:
    `_get_output_dir` points transformers' checkpoint writing into checkpoints/.saving/,
    `_save_checkpoint` adds sftlab's record and commits the staged folder with one rename
    (run_dir.commit_checkpoint) before rotating old ones out, and `_run_epoch` stops a run
    resumed from its last step's checkpoint before it takes a step too many.
    """

    checkpoint_state: dict | None = None  # config + data digests (run_dir.checkpoint_state)
    nonfinite = None  # the NonFiniteGuard, when one runs
    resume_command = TRAIN_RESUME  # what the failure messages suggest (align sets its own)
    loss_sum_restored = 0.0  # the resumed checkpoint's sum of step losses
    seconds_restored = 0.0  # the resumed checkpoint's training seconds (its run's, resumes included)
    _train_started: float | None = None
    _staging: Path | None = None  # set while a checkpoint is being written

    @property
    def train_loss_sum(self) -> float:
        """Sum of the step losses since the run began (resumes included), as transformers sums them."""
        return self.loss_sum_restored + self._total_loss_scalar + float(self._tr_loss)

    def train(self, *args, **kwargs):
        self._train_started = time.perf_counter()
        return super().train(*args, **kwargs)

    @property
    def train_seconds(self) -> float:
        """Seconds in `train` over the whole run: this session's and those the resumed checkpoint had run."""
        return self.seconds_restored + (time.perf_counter() - self._train_started if self._train_started else 0.0)

    def checkpoint_record(self) -> dict | None:
        """sftlab's record written into each checkpoint (called on every process)."""
        if self.checkpoint_state is None:
            return None
        return {**self.checkpoint_state, "global_step": self.state.global_step, "train_loss_sum": self.train_loss_sum,
                "train_seconds": self.train_seconds,
                "nonfinite_skipped_steps": self.nonfinite.skipped if self.nonfinite else []}

    def restore_record(self, saved: dict) -> None:
        """Take up the record of the checkpoint a run resumes from."""
        self.loss_sum_restored = saved.get("train_loss_sum", 0.0)
        self.seconds_restored = saved.get("train_seconds", 0.0)
        if self.nonfinite is not None:
            self.nonfinite.skipped = list(saved.get("nonfinite_skipped_steps", []))

    def run_train_loss(self, training_loss: float, resumed_step: int) -> float:
        """The mean step loss over the whole run from `train()`'s `training_loss`, which is the
        mean over this call's steps only (those after `resumed_step`)."""
        if not resumed_step or not self.state.global_step:
            return training_loss
        steps_now = self.state.global_step - resumed_step
        return (self.loss_sum_restored + training_loss * steps_now) / self.state.global_step

    def _get_output_dir(self, trial) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint, written into checkpoints/.saving/checkpoint-N with sftlab's
        record, then renamed into place and only then the old ones rotated out: a kill or a
        failed write never leaves a checkpoint that --resume picks."""
        folder = Path(super()._get_output_dir(trial))  # RUN/checkpoints
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged = folder / STAGING / name
        self._staging = staged.parent
        try:
            with explained_save_failure(name, folder.parent, self.resume_command,
                                        cleanup=lambda: shutil.rmtree(staged, ignore_errors=True)):
                self._write_staged(model, trial, staged)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every process has written its part
        if self.args.should_save:
            commit_checkpoint(staged, folder / name)
            rotate_checkpoints(str(folder), self.args.save_total_limit, self.state.best_model_checkpoint,
                               use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _write_staged(self, model, trial, staged: Path) -> None:
        super()._save_checkpoint(model, trial)  # its own rotation sees only the staged checkpoint
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == staged.parent:  # transformers named the staged path
            self.state.best_model_checkpoint = str(staged.parent.parent / Path(best).name)
        record = self.checkpoint_record()
        if self.args.should_save:
            if not staged.is_dir():
                raise SftlabError(f"transformers did not write {staged.name} into {staged.parent} (its private "
                                  "_get_output_dir is no longer used?): this sftlab needs transformers 5.x "
                                  "as pinned in pyproject.toml")
            self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
            if record is not None:
                write_json(staged / CHECKPOINT_STATE, record)

    def _run_epoch(self, *args, **kwargs):
        # Resumed from the last step's checkpoint (a run stopped between it and the final save):
        # transformers would take one step past max_steps before checking it.
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return
        return super()._run_epoch(*args, **kwargs)


def save_outputs(run_dir: Path, writers: dict[str, Callable[[Path], None]], resume_command: str,
                 main: bool = True) -> None:
    """Write each output folder of a finished run (`writers`: name -> fn(folder)) under a
    temporary name, then rename them into place: a kill or a full disk leaves either the old
    folder or the new one, never half of one, and a failed write is an SftlabError naming the
    checkpoint that is still intact. Every process calls it (a gathering save is collective);
    only `main` deletes and renames."""
    staged = {name: run_dir / staging_name(name) for name in writers}

    def clear():
        for tmp in staged.values():
            if main:
                shutil.rmtree(tmp, ignore_errors=True)

    clear()  # left by an earlier, killed save
    with explained_save_failure("the final " + "/, ".join(writers) + "/", run_dir, resume_command, cleanup=clear):
        for name, write in writers.items():
            write(staged[name])
        if main:
            for name, tmp in staged.items():
                commit_folder(tmp, run_dir / name)
