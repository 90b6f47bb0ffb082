"""End to end: `sftlab train CONFIG --nproc 2` trains LoRA under ZeRO-3 and FSDP2 (torchrun,
gloo on CPU); the adapter loads with plain PeftModel in one process and gives the logits of a
one-process run with the same global batch; run.json counts every rank's trained tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from test_distributed_engines import env, lora_logits, one_process, probe_batch, write_data

pytestmark = [pytest.mark.slow, pytest.mark.all_cores]


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("cli")
    data = write_data(root / "train.jsonl", n=8)
    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(data), "packing": False},  # 8 rows: every rank gets 4, none repeated
        "training": {"num_train_epochs": 1, "per_device_train_batch_size": 1, "learning_rate": 1e-2, "bf16": False,
                     "warmup_ratio": 0, "lr_scheduler_type": "constant", "logging_steps": 4, "seed": 0},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root, one_process(root, "reference")


# the two engines that shard the weights and gather them to save (ZeRO-2's launch and
# equivalence are in test_distributed_engines.py)
@pytest.mark.parametrize("engine,label", [("zero3", "DeepSpeed ZeRO-3"), ("fsdp", "FSDP2")])
def test_sftlab_train_nproc_2(engine, label, lora_setup, tiny_model_dir, tmp_path):
    root, ref = lora_setup
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "sftlab.cli", "train", str(root / "config.yaml"), "--nproc", "2",
                           f"distributed={engine}", f"output_dir={out}"],
                          env=env(root / "cache"), timeout=900, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("Resolved config:") == 1  # one log, rank 0's
    # no library notices a user cannot act on (ZeRO-3 printed torch's deprecations of DeepSpeed's calls every step,
    # and DeepSpeed on every rank that it was "unable to detect" a GPU)
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stdout[-2000:] + proc.stderr[-2000:]
    info = json.loads((out / "run.json").read_text())
    assert info["processes"] == 2 and info["engine"] == f"{label} x 2 processes"
    assert info["trainable_params"] == json.loads((ref / "run.json").read_text())["trainable_params"] > 0
    # one epoch: each rank saw half the rows; the reduced count is the whole data set's
    assert info["trained_tokens_seen"] == info["train_data"]["trained_tokens"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").exists() and not (out / "model").exists()

    batch = probe_batch(root, tiny_model_dir)
    logits = lora_logits(tiny_model_dir, out / "adapter", batch)
    expected = lora_logits(tiny_model_dir, ref / "adapter", batch)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        assert (expected - base(**batch, use_cache=False).logits).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_a_user_mistake_under_nproc_is_its_error_line_and_one_more(lora_setup, tmp_path):
    """A bad data line stops every rank: its `error:` line is printed once (not once per rank), and
    torchrun's ChildFailedError traceback and failure table become one line naming the rank that
    failed first."""
    root, _ = lora_setup
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                      '{"messages": [\n')
    proc = subprocess.run([sys.executable, "-m", "sftlab.cli", "train", str(root / "config.yaml"), "--nproc", "2",
                           f"data.train={broken}", f"output_dir={tmp_path / 'run'}"],
                          env=env(root / "cache"), timeout=600, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.stderr.count(f"error: {broken}:2: malformed JSON") == 1, proc.stderr[-3000:]  # not once per rank
    assert lines[-1].startswith("error: process ") and "of 2 failed first, exit code 1" in lines[-1], lines[-5:]
