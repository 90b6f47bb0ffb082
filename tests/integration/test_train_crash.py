"""Crash safety of `sftlab train` on the tiny model, fp32 on CPU:
- a run killed with SIGKILL during a step, or during a checkpoint save, resumes with
  `--resume` to the final weights and loss of an uninterrupted run;
- a NaN/inf loss or gradient stops the run naming the step and the batch's examples (file:line), with the
  last good checkpoint kept, or, with `training.skip_nonfinite_steps`, the step is skipped;
- a full disk or no memory during a save (of a checkpoint, or of the final adapter), or running
  out of memory in a step, is a clear message, and the previous checkpoint stays intact.
tests/integration/killed_train.py does the killing; more random kill points:
`SFTLAB_KILL_TRIALS=6 pytest tests/integration/test_train_crash.py -k random`.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sftlab.cli import main

KILLED = Path(__file__).with_name("killed_train.py")
STEPS, SAVE_EVERY, ACCUM = 6, 2, 2
# the demo data's 12 examples pack into 5 batches an epoch: steps of 2, 2 and 1 micro-batches (an epoch's last
# step takes what is left), so 6 steps are 10 micro-batches over two epochs and checkpoint-4 is inside the second
MICRO_BATCHES = 10


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from sftlab.demo.dataset import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo"), sizes={"train": 3, "validation": 2, "test": 2})


def train_args(model, data, out, *extra) -> list[str]:
    return ["train", "-", f"model.name_or_path={model}", f"data.train={data['train']}", f"output_dir={out}",
            "data.max_seq_length=128", "training.per_device_train_batch_size=2",
            f"training.gradient_accumulation_steps={ACCUM}", "training.learning_rate=1e-2",
            "training.logging_steps=1", f"training.max_steps={STEPS}", f"training.save_steps={SAVE_EVERY}",
            "training.save_total_limit=1", "training.bf16=false", "lora.dropout=0.1", *extra]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_model_dir, demo_data) -> tuple[Path, dict[str, int]]:
    """The uninterrupted run, through killed_train.py without a kill: its folder, and how many
    training forwards ("step") and checkpointing events ("save") it had, where kill points are drawn."""
    out = tmp_path_factory.mktemp("straight") / "run"
    err = start_killed("count", 0, train_args(tiny_model_dir, demo_data, out)).communicate(timeout=900)[1]
    counts = re.search(r"^KILL-POINTS (\{.*\})$", err, re.MULTILINE)
    assert counts and (out / "run.json").exists(), err[-2000:]
    counts = ast.literal_eval(counts[1])
    assert counts["step"] == MICRO_BATCHES, counts
    return out, counts


@pytest.fixture(scope="module")
def straight(straight_run) -> Path:
    return straight_run[0]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter in a run's adapter/ folder or in a checkpoint folder."""
    from safetensors.torch import load_file

    return load_file(next(p for p in (folder / "adapter" / "adapter_model.safetensors",
                                      folder / "adapter_model.safetensors") if p.exists()))


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def last_loss(run: Path, step: int = STEPS) -> float:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if "loss" in m and m["step"] == step][-1]


def checkpoint_names(run: Path) -> list[str]:
    return sorted(c.name for c in (run / "checkpoints").glob("checkpoint-*"))


def start_killed(kind: str, n: int, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(KILLED), kind, str(n), "--", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_runs(points, tiny_model_dir, demo_data, tmp_path) -> list[Path]:
    """One run per (kind, n) kill point, killed there (two at a time: one per core)."""
    runs = [tmp_path / f"{i}-{kind}-{n}" for i, (kind, n) in enumerate(points)]
    for start in range(0, len(points), 2):
        batch = list(zip(points, runs))[start:start + 2]
        procs = [(point, start_killed(*point, train_args(tiny_model_dir, demo_data, run))) for point, run in batch]
        for point, p in procs:
            err = p.communicate(timeout=600)[1]
            assert p.returncode == -signal.SIGKILL, (point, err[-2000:])
    for run in runs:
        assert not (run / "run.json").exists()
    return runs


def resume_and_compare(run: Path, straight: Path, tiny_model_dir, demo_data) -> float:
    """Resume a killed run; check step, tokens and losses against the uninterrupted run and
    return the largest weight difference."""
    assert main([*train_args(tiny_model_dir, demo_data, run), "--resume"]) == 0
    assert last_loss(run) == pytest.approx(last_loss(straight), rel=1e-6)
    a, b = (json.loads((r / "run.json").read_text()) for r in (straight, run))
    assert (b["global_step"], b["trained_tokens_seen"]) == (a["global_step"], a["trained_tokens_seen"])
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)  # over the whole run, not since resuming
    assert not (run / "checkpoints" / ".saving").exists()
    return max_weight_difference(straight, run)


def test_killed_during_a_step_or_a_save_resumes_to_the_uninterrupted_weights(
        tiny_model_dir, demo_data, tmp_path, straight, capsys):
    # during step 4's second micro-batch (checkpoint-2 saved); at the rename that would commit
    # checkpoint-4, its files all written (save_total_limit=1: checkpoint-2 must survive); after
    # the last checkpoint is committed, as rotation starts (nothing left to train, only to save); during
    # step 5 (checkpoint-4 saved, inside the second epoch: resuming there must replay that epoch's order, not
    # the first's, and skip the batches it trained)
    points = [("step", 7), ("commit", 4), ("rotate", 4), ("step", 9)]
    runs = kill_runs(points, tiny_model_dir, demo_data, tmp_path)
    for run in runs[:2]:
        assert checkpoint_names(run) == ["checkpoint-2"]
    assert checkpoint_names(runs[3]) == ["checkpoint-4"]
    epoch = json.loads((runs[3] / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())["epoch"]
    assert 1 < epoch < 2, epoch
    staged = runs[1] / "checkpoints" / ".saving" / "checkpoint-4"
    assert (staged / "sftlab.json").exists() and (staged / "adapter_model.safetensors").exists()
    assert checkpoint_names(runs[2]) == ["checkpoint-4", "checkpoint-6"]

    diffs, outs = [], []
    for run in runs:
        capsys.readouterr()
        diffs.append(resume_and_compare(run, straight, tiny_model_dir, demo_data))
        outs.append(capsys.readouterr().out)
    assert all("resuming from" in out for out in outs)
    assert "checkpoint-2 (step 2" in outs[0] and "checkpoint-2 (step 2" in outs[1] and "checkpoint-6 (step 6" in outs[2]
    assert "checkpoint-4 (step 4" in outs[3]
    assert "discarded checkpoint-4" in outs[1]  # the interrupted save is thrown away, not resumed from
    print(f"kill points {points}: max |weight difference| {diffs}")
    assert max(diffs) <= 1e-6, diffs


@pytest.mark.skipif(not os.environ.get("SFTLAB_KILL_TRIALS"), reason="set SFTLAB_KILL_TRIALS=N for N random kill points")
def test_random_kill_points_resume_to_the_uninterrupted_weights(tiny_model_dir, demo_data, tmp_path, straight_run):
    straight, counts = straight_run
    assert counts["save"] > STEPS // SAVE_EVERY, counts
    rng = random.Random(int(os.environ.get("SFTLAB_KILL_SEED", "0")))
    kinds = ["step", "save"]  # during a training forward, or at any filesystem event of checkpointing
    points = [(kinds[i % 2], rng.randint(1, counts[kinds[i % 2]])) for i in range(int(os.environ["SFTLAB_KILL_TRIALS"]))]
    print(f"\nevents of the uninterrupted run: {counts}")
    runs = kill_runs(points, tiny_model_dir, demo_data, tmp_path)
    diffs = [resume_and_compare(run, straight, tiny_model_dir, demo_data) for run in runs]
    for point, d in zip(points, diffs):
        print(f"KILL {point}: max |weight difference| {d:.3g}")
    assert max(diffs) <= 1e-6, diffs


ALIGN_STEPS = 4


def align_args(model, pairs: Path, out: Path, loss: str) -> list[str]:
    return ["align", "-", f"model.name_or_path={model}", f"data.train={pairs}", f"output_dir={out}",
            f"align.loss={loss}", "data.max_seq_length=96", "lora.r=8", "lora.alpha=16", "lora.dropout=0.1",
            "training.learning_rate=5e-3", "training.per_device_train_batch_size=2", "training.warmup_ratio=0",
            f"training.gradient_accumulation_steps={ACCUM}", f"training.max_steps={ALIGN_STEPS}",
            "training.save_steps=2", "training.save_total_limit=1", "training.logging_steps=1", "training.bf16=false"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"What is {a} plus {a + 3}?", "chosen": f"{2 * a + 3}", "rejected": f"{a * (a + 3)}, I think"}
            for a in range(1, 9)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("loss", ["dpo"])
def test_align_killed_during_a_step_resumes_to_the_uninterrupted_adapter(tiny_model_dir, pairs, tmp_path, capsys, loss):
    straight, run = tmp_path / "straight", tmp_path / "killed"
    assert main(align_args(tiny_model_dir, pairs, straight, loss)) == 0
    killed = start_killed("step", 3 * ACCUM + 1, align_args(tiny_model_dir, pairs, run, loss))  # in step 4
    err = killed.communicate(timeout=600)[1]
    assert killed.returncode == -signal.SIGKILL, err[-2000:]
    assert checkpoint_names(run) == ["checkpoint-2"] and not (run / "run.json").exists()
    capsys.readouterr()
    assert main(align_args(tiny_model_dir, pairs, run, loss)) == 1  # not over a run without --resume
    assert "already holds a run" in capsys.readouterr().err
    assert main([*align_args(tiny_model_dir, pairs, run, loss), "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "loss" in m].count(1) == 1  # continued, not started over
    a, b = (json.loads((r / "run.json").read_text()) for r in (straight, run))
    assert b["global_step"] == a["global_step"] == ALIGN_STEPS
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)  # over the whole run, not since resuming
    assert last_loss(run, ALIGN_STEPS) == pytest.approx(last_loss(straight, ALIGN_STEPS), rel=1e-6)
    diff = max_weight_difference(straight, run)
    print(f"align {loss}: killed in step 4, resumed: max |weight difference| {diff:.3g}")
    assert diff <= 1e-6


def test_align_stops_at_a_nonfinite_loss_keeping_the_last_good_checkpoint(
        tiny_model_dir, pairs, tmp_path, monkeypatch, capsys):
    from sftlab.train import align as align_module

    real_load, calls = align_module.load_policy, [0]

    def load_policy(*a, **k):
        model, peft_config, base = real_load(*a, **k)

        def hook(module, inputs, output):
            if module.training and torch.is_grad_enabled():  # the policy's forward, not the reference's
                calls[0] += 1
                if calls[0] == 3 * ACCUM + 1:  # step 4
                    return output * float("inf")
        model.get_input_embeddings().register_forward_hook(hook)
        return model, peft_config, base

    monkeypatch.setattr(align_module, "load_policy", load_policy)
    run = tmp_path / "run"
    assert main(align_args(tiny_model_dir, pairs, run, "dpo")) == 1
    err = capsys.readouterr().err
    assert "step 4: non-finite loss" in err and "Traceback" not in err
    assert "the last good checkpoint is" in err and "checkpoint-2" in err
    assert checkpoint_names(run) == ["checkpoint-2"] and not (run / "run.json").exists()


def plant_in_forward(monkeypatch, at_call: int, fault, module=lambda model: model.get_input_embeddings()
                     ) -> list[list[str]]:
    """On the `at_call`-th training forward, `fault(output)` replaces the output of the model's
    input embeddings (or of `module(model)`), or raises; returns the sources of every training
    micro-batch, in order."""
    from sftlab.train import trainer as trainer_module

    real_build, real_loss = trainer_module.build_model, trainer_module.SFTTrainer.compute_loss
    calls, seen = [0], []

    def build_model(*a, **k):
        model = real_build(*a, **k)

        def hook(module, inputs, output):
            if module.training:
                calls[0] += 1
                if calls[0] == at_call:
                    return fault(output)
        module(model).register_forward_hook(hook)
        return model

    def compute_loss(self, model, inputs, *a, **k):
        if model.training:
            seen.append(inputs["sources"])
        return real_loss(self, model, inputs, *a, **k)

    monkeypatch.setattr(trainer_module, "build_model", build_model)
    monkeypatch.setattr(trainer_module.SFTTrainer, "compute_loss", compute_loss)
    return seen


def poisoned_gradient(hidden):
    hidden.register_hook(lambda grad: grad * float("inf"))  # the loss stays finite
    return hidden


@pytest.mark.parametrize("what, fault, module", [
    ("loss", lambda emb: emb * float("inf"), lambda model: model.get_input_embeddings()),
    ("gradients", poisoned_gradient, lambda model: model.get_base_model().model.norm),
])
def test_a_nonfinite_step_stops_the_run_naming_the_step_and_the_batch(
        tiny_model_dir, demo_data, tmp_path, monkeypatch, capsys, what, fault, module):
    seen = plant_in_forward(monkeypatch, 7, fault, module)  # micro-batch 7: step 4's second (MICRO_BATCHES)
    run = tmp_path / "run"
    assert main(train_args(tiny_model_dir, demo_data, run)) == 1
    err = capsys.readouterr().err
    assert f"step 4: non-finite {what}" in err and "Traceback" not in err
    assert seen[6] and all(f"train.jsonl:{s.split(':')[-1]}" in err for s in seen[6])
    assert "the last good checkpoint is" in err and "checkpoint-2" in err and "skip_nonfinite_steps" in err
    assert checkpoint_names(run) == ["checkpoint-2"] and (run / "checkpoints" / "checkpoint-2" / "sftlab.json").exists()
    assert not (run / "run.json").exists()


def test_skip_nonfinite_steps_leaves_weights_and_moments_alone_and_counts_the_step(
        tiny_model_dir, demo_data, tmp_path, monkeypatch):
    plant_in_forward(monkeypatch, 7, lambda emb: emb * float("inf"))  # in step 4
    run = tmp_path / "run"
    assert main(train_args(tiny_model_dir, demo_data, run, "training.skip_nonfinite_steps=true", "training.max_steps=5",
                           "training.save_steps=1", "training.save_total_limit=5")) == 0
    info = json.loads((run / "run.json").read_text())
    assert (info["global_step"], info["nonfinite_steps_skipped"], info["nonfinite_skipped_steps"]) == (5, 1, [4])
    ckpt = {n: weights(run / "checkpoints" / f"checkpoint-{n}") for n in (2, 3, 4, 5)}
    opt = {n: torch.load(run / "checkpoints" / f"checkpoint-{n}" / "optimizer.pt")["state"] for n in (3, 4)}
    for k in ckpt[3]:
        assert torch.equal(ckpt[3][k], ckpt[4][k]) and torch.isfinite(ckpt[5][k]).all()
    assert any(not torch.equal(ckpt[2][k], ckpt[3][k]) for k in ckpt[3])  # the other steps do move them
    assert any(not torch.equal(ckpt[4][k], ckpt[5][k]) for k in ckpt[3])
    for i, state in opt[3].items():
        assert all(torch.equal(v, opt[4][i][k]) for k, v in state.items())


def fail_writes(monkeypatch, path_part: str, error: BaseException) -> None:
    """Make the weights (safetensors) and torch.save writes whose path contains `path_part`
    write half a file, then raise `error`, as a full disk or a failed allocation would."""
    import safetensors.torch

    real_save, real_serialize = torch.save, safetensors.torch.serialize_file

    def failing(real):
        def write(obj, f, *a, **k):
            if path_part in str(f):
                Path(f).write_bytes(b"\0" * 100)
                raise error
            return real(obj, f, *a, **k)
        return write

    monkeypatch.setattr(torch, "save", failing(real_save))
    monkeypatch.setattr(safetensors.torch, "serialize_file", failing(real_serialize))  # peft and transformers


def enospc(path: str = "") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


@pytest.mark.parametrize("file, error, reason", [
    ("optimizer.pt", enospc("optimizer.pt"), "no space left on the device (optimizer.pt)"),
    # safetensors reports a failed write as SafetensorError, not OSError
    ("adapter_model.safetensors", "SafetensorError", "no space left on the device"),
    ("adapter_model.safetensors", MemoryError(), "out of memory"),
])
def test_a_full_disk_or_no_memory_during_a_save_is_a_clear_error_and_keeps_the_previous_checkpoint(
        tiny_model_dir, demo_data, tmp_path, monkeypatch, capsys, file, error, reason):
    from safetensors import SafetensorError

    if error == "SafetensorError":
        error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    fail_writes(monkeypatch, f"checkpoint-4{os.sep}{file}", error)
    run = tmp_path / "run"
    assert main(train_args(tiny_model_dir, demo_data, run, "training.max_steps=4")) == 1
    err = capsys.readouterr().err
    assert f"saving checkpoint-4 failed: {reason};" in err and "Traceback" not in err
    assert "the previous checkpoint" in err and "checkpoint-2 is intact" in err and "--resume" in err
    assert checkpoint_names(run) == ["checkpoint-2"] and not (run / "checkpoints" / ".saving" / "checkpoint-4").exists()
    assert (run / "checkpoints" / "checkpoint-2" / "sftlab.json").exists()
    assert weights(run / "checkpoints" / "checkpoint-2")  # still loads


def test_a_full_disk_at_the_final_save_leaves_no_half_adapter_and_resume_finishes(
        tiny_model_dir, demo_data, tmp_path, monkeypatch, capsys, straight):
    from safetensors import SafetensorError

    error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with monkeypatch.context() as patched:
        fail_writes(patched, f".adapter.saving{os.sep}adapter_model.safetensors", error)
        run = tmp_path / "run"
        assert main(train_args(tiny_model_dir, demo_data, run)) == 1
    err = capsys.readouterr().err
    assert "saving the final adapter/, tokenizer/ failed: no space left on the device;" in err
    assert "checkpoint-6 is intact" in err and "Traceback" not in err
    assert not [p.name for p in run.iterdir() if "adapter" in p.name or "tokenizer" in p.name]
    assert not (run / "run.json").exists()
    assert main([*train_args(tiny_model_dir, demo_data, run), "--resume"]) == 0  # nothing left to train: saves
    assert max_weight_difference(straight, run) == 0 and (run / "tokenizer" / "tokenizer.json").exists()


def test_out_of_memory_in_a_step_says_what_to_lower(tiny_model_dir, demo_data, tmp_path, monkeypatch, capsys):
    def oom(emb):  # what the CPU allocator raises (tests/unit/test_checkpoint_commit.py makes it fail for real)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    plant_in_forward(monkeypatch, ACCUM + 1, oom)  # step 2
    assert main(train_args(tiny_model_dir, demo_data, tmp_path / "run", "training.max_steps=2")) == 1
    err = capsys.readouterr().err
    assert "step 2: out of memory" in err and "Traceback" not in err
    assert "per_device_train_batch_size (now 2" in err and "max_seq_length (now 128)" in err
    assert "gradient_checkpointing=true" in err
