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


def test_a_training_config_is_estimated_with_its_own_settings(tiny_model_dir, tmp_path, capsys):
    """`sftlab estimate CONFIG.yaml` (or a run directory) estimates what `sftlab train` would run: its
    model and settings, printed as the options that give the same estimate; an option given wins."""
    import yaml

    config = {"model": {"name_or_path": str(tiny_model_dir)}, "method": "lora", "lora": {"r": 4, "dropout": 0.1},
              "data": {"train": "x.jsonl", "max_seq_length": 96},
              "training": {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2, "bf16": False,
                           "optim": "adamw_bnb_8bit", "gradient_checkpointing": True}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["estimate", str(path), "--memory", "2GiB", "--json"]) == 0
    out, err = capsys.readouterr()
    options = err.split("settings of ")[1].split(": ", 1)[1].split()
    assert " ".join(options) == ("--method lora --seq-len 96 --batch 3 --lora-r 4 --lora-dropout 0.1 --target-modules "
                                 "all-linear --grad-checkpointing --dtype fp32 --weights-dtype auto --optimizer adamw_8bit "
                                 "--nproc 1 --grad-accum 2")
    assert main(["estimate", str(tiny_model_dir), *options, "--memory", "2GiB", "--json"]) == 0
    assert json.loads(out) == json.loads(capsys.readouterr().out)

    assert main(["estimate", str(path), "--batch", "1", "--memory", "2GiB", "--json"]) == 0  # an option wins
    one = json.loads(capsys.readouterr().out)
    assert main(["estimate", str(tiny_model_dir), *options, "--batch", "1", "--memory", "2GiB", "--json"]) == 0
    assert one == json.loads(capsys.readouterr().out) and one["total"] < json.loads(out)["total"]

    run = tmp_path / "run"  # a run directory: its base model, its config.yaml's settings
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"base_model": str(tiny_model_dir), "method": "lora"}))
    (run / "config.yaml").write_text(path.read_text())
    assert main(["estimate", str(run), "--memory", "2GiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(out)


def test_an_alignment_config_counts_both_sides_of_a_pair_and_the_reference(tiny_model_dir, tmp_path, capsys):
    import yaml

    from sftlab.estimate import estimate_memory

    config = {"model": {"name_or_path": str(tiny_model_dir)}, "method": "full", "data": {"train": "pairs.jsonl",
              "max_seq_length": 64}, "training": {"per_device_train_batch_size": 2, "bf16": False},
              "align": {"loss": "dpo"}}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["estimate", str(path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "(alignment: a pair's two sides per row and a frozen reference copy)" in err
    want = estimate_memory(tiny_model_dir, "full", 64, 2, dtype="fp32", sequences_per_row=2, reference_copy=True)
    sft = estimate_memory(tiny_model_dir, "full", 64, 2, dtype="fp32")
    got = json.loads(out)
    assert got["total"] == want.total and got["weight_copies"] == sft.weight_copies + sft.weights
    assert got["activations"] == 2 * sft.activations
    path.write_text(yaml.safe_dump(config | {"method": "lora", "align": {"loss": "kto"}}))  # LoRA: adapters off
    assert main(["estimate", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == estimate_memory(tiny_model_dir, "lora", 64, 2, dtype="fp32").total


def test_a_missing_folder_beside_existing_ones_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, capsys):
    """`runs/nope` where runs/ is here is a mistyped path: one line at once, not a minute of hub retries;
    owner/name with no such folder here stays a hub id."""
    from sftlab.models import resolve_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["estimate", "runs/nope"]) == 1
    assert "model folder not found: runs/nope" in capsys.readouterr().err
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", None)
