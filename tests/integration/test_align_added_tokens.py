"""Aligning from a LoRA SFT run with a model.chat_template that adds tokens beyond the run's tokenizer
(llama3 on SmolLM2's): the LoRA cannot train the new tokens' embedding rows (TRL's preference trainers run
no PEFT trainable tokens), and it trained on with them left at their initial draw, untrained, without a
word. It is refused with the way round, as from a base or a merged run; method full grows and trains them."""

from __future__ import annotations

import json

import pytest

from sftlab.cli import main


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-run")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {a} plus 2?", "chosen": str(a + 2), "rejected": "no idea"}) + "\n"
                             for a in range(8)))
    run = root / "sft"
    assert main(["train", "-", f"model.name_or_path={tiny_model_dir}", f"data.train={pairs}", "lora.r=4",
                 "training.max_steps=1", "training.bf16=false", f"output_dir={run}"]) == 0
    return run, pairs


def _align(run, pairs, out, *extra) -> list[str]:
    return ["align", "-", f"model.name_or_path={run}", f"data.train={pairs}", "model.chat_template=llama3", "lora.r=4",
            "training.max_steps=1", "training.per_device_train_batch_size=4", "training.bf16=false",
            f"output_dir={out}", *extra]


def test_a_lora_run_aligned_with_a_template_that_adds_tokens_is_refused(lora_run, tmp_path, capsys):
    run, pairs = lora_run
    out = tmp_path / "dpo"
    assert main(_align(run, pairs, out)) == 1
    err = capsys.readouterr().err
    assert f"model.chat_template llama3 adds tokens to the tokenizer of {run}" in err
    assert "leave model.chat_template out" in err and "or align with method: full" in err
    assert not out.exists()


def test_full_alignment_from_the_lora_run_grows_the_embeddings_to_the_template(lora_run, tmp_path):
    from sftlab.config import AlignConfig, load_config
    from sftlab.models import load_tokenizer
    from sftlab.train.align import load_policy

    run, pairs = lora_run
    tokenizer = load_tokenizer(str(run), chat_template="llama3")
    cfg = load_config(None, _align(run, pairs, tmp_path / "full", "method=full")[2:], cls=AlignConfig)
    model, peft_config, _ = load_policy(cfg, "float32", False, tokenizer)
    assert peft_config is None and model.get_input_embeddings().weight.shape[0] == len(tokenizer) > 49152
