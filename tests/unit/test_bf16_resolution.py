"""`sftlab estimate` resolves training.bf16 auto for an engine name with the trainer's own resolution
(`preflight.resolve_bf16`), as `wants_bf16` does for a config that trains with that engine."""

from __future__ import annotations

import pytest

from sftlab.config import TrainConfig
from sftlab.estimate import ENGINES, estimate_memory, model_shape
from sftlab.train import preflight


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_the_estimate_counts_the_precision_a_config_of_its_engine_trains_in(fast_bf16, monkeypatch):
    from transformers import LlamaConfig

    monkeypatch.setattr(preflight, "device_supports_bf16", lambda: fast_bf16)
    shape = model_shape(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4))
    for engine in ENGINES:
        config = TrainConfig(data={"train": "-"}, distributed="ddp" if engine == "none" else engine)
        for device in ("cpu", "cuda"):
            est = estimate_memory(None, "lora", 32, 1, shape=shape, nproc=2, distributed=engine, device=device)
            assert (est.dtype == "bf16") == preflight.wants_bf16(config, device), (engine, device)
