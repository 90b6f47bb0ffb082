"""End to end through the CLI on the tiny model: train, loss falls, artifacts reload, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import train_set_loss
import torch

from sftlab.cli import main
from sftlab.train import allocator


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from sftlab.demo.dataset import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo"), sizes={"train": 12, "validation": 2, "test": 2})


def train_args(tiny_model_dir, demo_data, out, *extra):
    return ["train", "-", f"model.name_or_path={tiny_model_dir}", f"data.train={demo_data['train']}",
            f"data.validation={demo_data['validation']}", f"output_dir={out}", "data.max_seq_length=128",
            "training.per_device_train_batch_size=4", "training.learning_rate=1e-1", "training.logging_steps=1",
            "training.warmup_ratio=0", "training.lr_scheduler_type=constant", "training.eval_steps=4",
            "training.bf16=false", *extra]


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert main(train_args(tiny_model_dir, demo_data, out, "training.max_steps=8", "training.save_steps=4")) == 0
    return out


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_a_complete_run_and_loss_falls(lora_run):
    for name in ("config.yaml", "run.json", "metrics.jsonl", "README.md", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "tokenizer/tokenizer.json"):
        assert (lora_run / name).exists(), name
    assert len([m for m in read_metrics(lora_run) if "loss" in m]) >= 8
    assert any("eval_loss" in m for m in read_metrics(lora_run))
    info = json.loads((lora_run / "run.json").read_text())
    assert info["global_step"] == 8 and info["method"] == "lora" and info["train_data"]["examples"] == 48
    assert info["versions"]["transformers"]


def test_training_lowers_the_loss_on_the_training_data(lora_run, tiny_model_dir, demo_data, tokenizer):
    from transformers import AutoModelForCausalLM

    from sftlab.models import load_model

    before = train_set_loss(AutoModelForCausalLM.from_pretrained(tiny_model_dir), demo_data["train"], tokenizer)
    after = train_set_loss(load_model(str(lora_run)), demo_data["train"], tokenizer)
    assert after < before - 0.02, (before, after)


def test_adapter_reloads_with_plain_peft_and_matches_sftlab_loader(lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftlab.models import load_model

    ids = torch.tensor([[1, 42, 7, 99, 5]])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_run / "adapter").eval()
    ours = load_model(str(lora_run)).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        a, b, c = (m(input_ids=ids, use_cache=False).logits for m in (plain, ours, base))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3  # the adapter really changed the model


def adapter_weights(run):
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_a_crashed_run_refuses_a_restart_and_resumes_to_the_uninterrupted_weights(
        tiny_model_dir, demo_data, tmp_path, capsys, monkeypatch):
    import shutil

    from sftlab.train.trainer import SFTTrainer

    train_file = tmp_path / "train.jsonl"
    shutil.copy(demo_data["train"], train_file)
    steps = ["training.max_steps=8", "training.save_steps=4", f"data.train={train_file}"]
    straight = train_args(tiny_model_dir, demo_data, tmp_path / "straight", *steps)
    assert main(straight) == 0
    args = train_args(tiny_model_dir, demo_data, tmp_path / "crashed", *steps)

    real_step = SFTTrainer.training_step

    def crash_after_step_5(self, *a, **k):  # planted: the process dies during step 6, after checkpoint-4
        if self.state.global_step == 5:
            raise KeyboardInterrupt
        time.sleep(0.1)  # the first session's steps take at least 0.4 s up to checkpoint-4
        return real_step(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(SFTTrainer, "training_step", crash_after_step_5)
        assert main(args) == 130
    run = tmp_path / "crashed"
    assert (run / "checkpoints" / "checkpoint-4").is_dir() and not (run / "run.json").exists()
    capsys.readouterr()

    assert main(args) == 1  # no --resume: the checkpoints are not overwritten
    err = capsys.readouterr().err
    assert "--resume" in err and "checkpoint-4" in err
    assert main([*args, "training.learning_rate=0.05", "--resume"]) == 1
    assert "training.learning_rate: 0.1 -> 0.05" in capsys.readouterr().err
    original = train_file.read_text()
    train_file.write_text(original.replace("Convert", "Turn"))
    assert main([*args, "--resume"]) == 1
    assert "the train data differ from checkpoint-4's" in capsys.readouterr().err
    train_file.write_text(original)
    shutil.move(run, tmp_path / "moved")  # a run folder moved (or copied) elsewhere resumes there
    run, args = tmp_path / "moved", train_args(tiny_model_dir, demo_data, tmp_path / "moved", *steps)

    steps_run = []

    def counting(self, *a, **k):
        steps_run.append(self.state.global_step)
        return real_step(self, *a, **k)

    resumed_seconds, real_train = [], SFTTrainer.train

    def timed(self, *a, **k):
        start = time.perf_counter()
        try:
            return real_train(self, *a, **k)
        finally:
            resumed_seconds.append(time.perf_counter() - start)

    with monkeypatch.context() as m:
        m.setattr(SFTTrainer, "training_step", counting)
        m.setattr(SFTTrainer, "train", timed)
        assert main([*args, "--resume"]) == 0
    assert steps_run == [4, 5, 6, 7]  # it went on from checkpoint-4, it did not start again
    a, b = adapter_weights(tmp_path / "straight"), adapter_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    info_a, info_b = (json.loads((r / "run.json").read_text()) for r in (tmp_path / "straight", run))
    assert info_b["global_step"] == 8
    assert info_b["trained_tokens_seen"] == info_a["trained_tokens_seen"] > 0
    state = json.loads((run / "checkpoints" / "checkpoint-4" / "sftlab.json").read_text())
    assert 0 < state["trained_tokens_seen"] < info_a["trained_tokens_seen"]
    # train_seconds: the whole run's, the first session's up to checkpoint-4 and the resumed one's.
    # sftlab's clock encloses the timed Trainer.train (so no less, but for run.json's rounding to
    # 0.01 s), and by far less than the first session's seconds (a restored time counted twice)
    assert state["train_seconds"] >= 0.4
    resumed = state["train_seconds"] + resumed_seconds[0]
    assert resumed - 0.005 <= info_b["train_seconds"] < resumed + 0.3
    written = (run / "run.json").stat().st_mtime_ns, (run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0  # finished: nothing to train, nothing written over
    assert "finished at step 8; nothing left to train" in capsys.readouterr().out
    assert ((run / "run.json").stat().st_mtime_ns, (run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns) \
        == written


def test_full_finetune_changes_every_weight_lowers_the_loss_and_saves_a_plain_model(
        tiny_model_dir, demo_data, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    assert main(train_args(tiny_model_dir, demo_data, out, "method=full", "training.max_steps=4",
                           "training.learning_rate=3e-3")) == 0
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    after = AutoModelForCausalLM.from_pretrained(out / "model")  # plain transformers, no PEFT
    start = dict(before.named_parameters())
    unchanged = [n for n, p in after.named_parameters() if torch.equal(p, start[n])]
    assert not unchanged and len(start) == len(dict(after.named_parameters()))
    assert train_set_loss(after, demo_data["train"], tokenizer) < train_set_loss(before, demo_data["train"], tokenizer) - 0.05


@pytest.mark.parametrize("method", ["dora", "qlora"])
def test_dora_and_qlora_train_and_loss_falls(tiny_model_dir, demo_data, tmp_path, tokenizer, method):
    from transformers import AutoModelForCausalLM

    from sftlab.models import load_model

    out = tmp_path / method
    assert main(train_args(tiny_model_dir, demo_data, out, f"method={method}", "training.max_steps=6")) == 0
    assert train_set_loss(load_model(str(out)), demo_data["train"], tokenizer) < train_set_loss(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), demo_data["train"], tokenizer)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is (method == "dora")


def test_config_mistakes_are_one_line_errors(tiny_model_dir, demo_data, tmp_path, capsys):
    assert main(train_args(tiny_model_dir, demo_data, tmp_path, "training.learnig_rate=1")) == 1
    err = capsys.readouterr().err
    assert "did you mean 'training.learning_rate'" in err and "Traceback" not in err
    assert main(["train", str(tmp_path / "nope.yaml")]) == 1
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train: [unclosed\n")
    assert main(["train", str(bad)]) == 1
    assert "bad.yaml:" in capsys.readouterr().err


def test_alignment_config_mistakes_name_the_way_out(tmp_path, capsys):
    """An align config given to train; a typo on the command line (blamed on it, not on the file); data
    options alignment would ignore; a KTO weight under DPO; label smoothing, which the preference losses ignore."""
    import yaml

    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": "pairs.jsonl"}, "align": {"loss": "dpo"}}))
    cases = [(["train", str(config)], "dpo.yaml: unknown key 'align' (an alignment config: run it with sftlab align)"),
             (["align", str(config), "align.los=kto"], "overrides: unknown key 'align.los'; did you mean 'align.loss'?"),
             (["align", str(config), "data.curate={}"], "data.curate does not apply to sftlab align: curate the pairs"),
             (["align", str(config), "data.truncation=truncate"], "a pair over data.max_seq_length is dropped"),
             (["align", str(config), "align.undesirable_weight=2"], "align.undesirable_weight applies to loss kto only"),
             (["align", str(config), "training.label_smoothing_factor=0.1"],
              "the preference losses of sftlab align do not read it")]
    for argv, message in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Value error" not in err, err


def test_bad_data_names_file_and_line(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n')
    assert main(["train", "-", f"model.name_or_path={tiny_model_dir}", f"data.train={data}", f"output_dir={tmp_path / 'r'}"]) == 1
    assert "broken.jsonl:2" in capsys.readouterr().err


def test_sftlab_train_runs_on_tcmalloc_where_installed_and_on_glibc_when_told(tmp_path, tiny_model_dir, demo_data):
    """The command re-executes itself on tcmalloc (train/allocator.py; scripts/setup.sh installs it). Neither it
    nor the export of its run warns of what a user cannot act on."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV, "DS_ACCELERATOR")}
    expected = "tcmalloc" if allocator.tcmalloc_library() else "system"
    for extra, want in (({}, expected), ({allocator.ENV: "system"}, "system")):
        out = tmp_path / f"run-{want}-{len(extra)}"
        proc = subprocess.run([sys.executable, "-m", "sftlab.cli", *train_args(tiny_model_dir, demo_data, out),
                               "training.max_steps=1"], env={**env, **extra}, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((out / "run.json").read_text())["allocator"] == want
        assert ("libtcmalloc-minimal4" in proc.stdout) == (want == "system" and not extra)  # the advice, once
        # no notice a user cannot act on: DeepSpeed, imported with transformers, warned it found no GPU
        assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stdout[-2000:] + proc.stderr[-2000:]
    # saving a model imports DeepSpeed too (accelerate's unwrapping, in save_pretrained)
    proc = subprocess.run([sys.executable, "-m", "sftlab.cli", "export", str(out), str(tmp_path / "merged"),
                           "--to", "merged"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stdout[-2000:] + proc.stderr[-2000:]


def test_ctrl_c_says_interrupted_and_how_to_resume(monkeypatch, capsys):
    """However the interrupt comes back (raised, or typer's 130), one line says so and, for a
    command that checkpoints, how to continue."""
    import sftlab.commands.train as train_command

    def interrupted(**_):
        raise KeyboardInterrupt

    for app in (interrupted, lambda **_: 130):
        monkeypatch.setattr(train_command, "app", app)
        assert main(["train", "config.yaml"]) == 130
        assert capsys.readouterr().err.strip() == \
            "interrupted (sftlab train CONFIG --resume continues from the last checkpoint)"
