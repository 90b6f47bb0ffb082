"""`sftlab train` with compiled RMSNorm layers (training.compile_norms: true): the compiled layers are
the ones the training steps call, and the run's losses are the eager run's to bf16 rounding."""

from __future__ import annotations

import json

import pytest
import torch


def lora_run(model_dir, data, out, compile_norms):
    from sftlab.config import TrainConfig
    from sftlab.train.trainer import train

    config = TrainConfig.model_validate({
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data), "max_seq_length": 256},
        "method": "lora",
        "training": {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1,
                     "compile_norms": compile_norms},
        "output_dir": str(out),
    })
    said = []
    info = train(config, log=said.append)
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return info, losses, said


def test_training_steps_call_the_compiled_norms_and_train_as_eager(tiny_model_dir, tmp_path, monkeypatch):
    from sftlab.demo.dataset import write_demo_dataset

    data = write_demo_dataset(tmp_path / "data", seed=0, sizes={"train": 20})["train"]
    info, eager, said = lora_run(tiny_model_dir, data, tmp_path / "eager", "auto")
    assert info["compiled_norms"] is False  # auto: a short run does not repay the compile
    assert any("fewer than the 100,000 that repay the first compile" in line for line in said)

    calls = []
    real_compile = torch.compile

    def counted(fn, **kwargs):
        compiled = real_compile(fn, **kwargs)

        def call(*args, **kw):
            calls.append(kw)
            return compiled(*args, **kw)
        return call

    monkeypatch.setattr(torch, "compile", counted)
    info, compiled, said = lora_run(tiny_model_dir, data, tmp_path / "compiled", True)
    assert info["compiled_norms"] is True
    assert any(line.startswith("compiled norms: 5 RMSNorm layers (LlamaRMSNorm) in ") for line in said), said
    # the probe, then 5 norms a forward for each of the 4 steps' rows (flattened: one forward a step)
    assert len(calls) >= 1 + 5 * 4
    assert len(compiled) == len(eager) == 4
    assert compiled == pytest.approx(eager, rel=1e-3), (compiled, eager)
