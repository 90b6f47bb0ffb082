"""The run directory's checkpoint bookkeeping: the atomic commit, what --resume picks, and
what counts as running out of memory. (The kill tests on a real run are in
tests/integration/test_train_crash.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sftlab.errors import SftlabError
from sftlab.train.guards import is_out_of_memory, save_failure_message
from sftlab.train.run_dir import (CHECKPOINT_STATE, STAGING, commit_checkpoint, discard_interrupted_saves,
                                  last_good_checkpoint, resume_checkpoint)

STATE = {"config": {"method": "lora", "training": {"learning_rate": 0.1}}, "data": {"train": "abc"}}


def checkpoint(folder, step: int, record: bool = True, text: str = "weights"):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text(text)
    if record:
        (folder / CHECKPOINT_STATE).write_text(json.dumps({**STATE, "global_step": step, "trained_tokens_seen": 1}))
    return folder


def test_commit_renames_the_staged_folder_into_place_and_replaces_an_older_save_of_the_step(tmp_path):
    ckpts = tmp_path / "checkpoints"
    checkpoint(ckpts / "checkpoint-4", 4, text="old")
    staged = checkpoint(ckpts / STAGING / "checkpoint-4", 4, text="new")
    commit_checkpoint(staged, ckpts / "checkpoint-4")
    assert (ckpts / "checkpoint-4" / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-4"]  # no staging or replaced folder left


def test_resume_picks_the_newest_complete_checkpoint_and_discards_interrupted_saves(tmp_path):
    ckpts = tmp_path / "checkpoints"
    checkpoint(ckpts / "checkpoint-2", 2)
    checkpoint(ckpts / "checkpoint-6", 6, record=False)  # not sftlab's: no record
    checkpoint(ckpts / STAGING / "checkpoint-4", 4)  # its save was interrupted
    assert last_good_checkpoint(tmp_path) == ckpts / "checkpoint-2"
    path, saved = resume_checkpoint(tmp_path, STATE)
    assert (path, saved["global_step"]) == (ckpts / "checkpoint-2", 2)
    assert discard_interrupted_saves(tmp_path) == ["checkpoint-4"] and not (ckpts / STAGING).exists()
    assert discard_interrupted_saves(tmp_path) == []


def test_resume_before_the_first_checkpoint_starts_over_but_not_after_a_finished_run(tmp_path):
    assert resume_checkpoint(tmp_path, STATE) == (None, {})
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(SftlabError, match="no checkpoint in"):
        resume_checkpoint(tmp_path, STATE)


def test_a_failed_save_says_why_and_what_is_left():
    full = save_failure_message("checkpoint-4", OSError(28, "No space left on device", "/r/optimizer.pt"), "/r/checkpoint-2")
    assert full.startswith("saving checkpoint-4 failed: no space left on the device (/r/optimizer.pt); "
                           "the previous checkpoint /r/checkpoint-2 is intact")
    assert "failed: out of memory; no earlier checkpoint exists" in save_failure_message("checkpoint-2", MemoryError(), None)


def test_out_of_memory_is_recognised_on_cpu_and_gpu_and_nothing_else():
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(10**13, dtype=torch.float32)  # 40 TB: the CPU allocator refuses
    assert is_out_of_memory(cpu.value)
    assert is_out_of_memory(MemoryError()) and is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("out of memory"))


def test_resume_refuses_another_process_count_or_engine(tmp_path, monkeypatch):
    from sftlab.config import load_config
    from sftlab.train.run_dir import checkpoint_state

    def state(world: int, engine: str) -> dict:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        return checkpoint_state(load_config(None, ["data.train=x.jsonl", f"distributed={engine}"]), {"train": "abc"})

    saved = state(2, "zero2")
    assert (saved["engine"], saved["processes"]) == ("deepspeed", 2)
    folder = tmp_path / "checkpoints" / "checkpoint-2"
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_STATE).write_text(json.dumps({**saved, "global_step": 2, "trained_tokens_seen": 1}))
    assert resume_checkpoint(tmp_path, state(2, "zero2"))[0] == folder
    with pytest.raises(SftlabError, match=r"^--resume: checkpoint-2 was saved by deepspeed x 2 processes, this run has "
                                          r"deepspeed x 1 process: resume with the same engine and --nproc 2$"):
        resume_checkpoint(tmp_path, state(1, "zero2"))
    with pytest.raises(SftlabError, match="this run has fsdp x 2 processes"):
        resume_checkpoint(tmp_path, state(2, "fsdp"))


def test_a_real_failed_safetensors_write_is_recognised_and_explained(tmp_path):
    """safetensors raises SafetensorError, not OSError, when the file system refuses a write: here
    a file size limit (RLIMIT_FSIZE, as a nearly full quota would) in a child process."""
    script = f"""
import resource, signal, torch
from safetensors.torch import save_file
from sftlab.train.guards import is_save_failure, save_failure_message
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    save_file({{"w": torch.zeros(10_000)}}, {str(tmp_path / "adapter_model.safetensors")!r})
except Exception as e:
    print(type(e).__name__, is_save_failure(e), save_failure_message("checkpoint-4", e, None), sep="|")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    kind, recognised, message = out.stdout.strip().split("|")
    assert (kind, recognised) == ("SafetensorError", "True"), out.stderr[-2000:]
    assert message.startswith("saving checkpoint-4 failed: file too large; no earlier checkpoint exists")
