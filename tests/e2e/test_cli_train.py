"""End to end through the CLI on the tiny model: train, loss falls, artifacts reload, resume."""

from __future__ import annotations

import json

import pytest
import torch

from sftlab.cli import main


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


def train_set_loss(model, path, tokenizer) -> float:
    """Mean loss per trained token over a whole data file: deterministic, unlike batch losses."""
    from sftlab.data.load import load_conversations
    from sftlab.data.pack import collate
    from sftlab.data.render import render_many
    from sftlab.train.loss import selective_loss_sum

    total, count = 0.0, 0
    with torch.no_grad():
        for ex in render_many(load_conversations(path), tokenizer):
            s, n = selective_loss_sum(model.eval(), collate([[ex]], tokenizer.pad_token_id))
            total, count = total + s.item(), count + n
    return total / count


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


def test_rerun_without_resume_is_refused_and_resume_continues(lora_run, tiny_model_dir, demo_data, capsys):
    args = train_args(tiny_model_dir, demo_data, lora_run, "training.max_steps=10", "training.save_steps=4")
    assert main(args) == 1
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint-8" in out
    assert json.loads((lora_run / "run.json").read_text())["global_step"] == 10


def test_full_finetune_saves_a_plain_model(tiny_model_dir, demo_data, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    assert main(train_args(tiny_model_dir, demo_data, out, "method=full", "training.max_steps=2")) == 0
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.num_parameters() > 0


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


def test_bad_data_names_file_and_line(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n')
    assert main(["train", "-", f"model.name_or_path={tiny_model_dir}", f"data.train={data}", f"output_dir={tmp_path / 'r'}"]) == 1
    assert "broken.jsonl:2" in capsys.readouterr().err
