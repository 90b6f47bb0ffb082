"""`sftlab estimate` end to end: the table, the JSON, and one-line errors."""

from __future__ import annotations

import json

from sftlab.cli import main


def test_estimate_prints_the_table(tiny_model_dir, capsys):
    code = main(["estimate", str(tiny_model_dir), "--method", "lora", "--seq-len", "128", "--batch", "2",
                 "--lora-r", "8", "--dtype", "fp32", "--memory", "4GiB"])
    out = capsys.readouterr().out
    assert code == 0
    for row in ("weights", "LoRA parameters", "gradients", "optimizer states", "activations", "logits", "total",
                "largest batch"):
        assert row in out
    assert "Batch 2 fits in 4.00 GiB" in out


def test_estimate_json_agrees_with_the_library(tiny_model_dir, capsys):
    from sftlab.estimate import estimate_memory

    code = main(["estimate", str(tiny_model_dir), "--method", "full", "--seq-len", "64", "--batch", "3",
                 "--dtype", "bf16", "--grad-checkpointing", "--memory", "2GiB", "--json"])
    assert code == 0
    got = json.loads(capsys.readouterr().out)
    want = estimate_memory(tiny_model_dir, "full", 64, 3, dtype="bf16", gradient_checkpointing=True)
    assert got["total"] == want.total
    assert got["max_batch"] == want.max_batch(2 * 1024**3)


def test_estimate_bad_input_is_one_line(tiny_model_dir, capsys):
    assert main(["estimate", str(tiny_model_dir), "--memory", "lots"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read the memory size 'lots'") and err.count("\n") == 1
    assert main(["estimate", "./missing-model-folder"]) == 1
    assert "model folder not found" in capsys.readouterr().err
