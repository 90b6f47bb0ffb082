"""Row-end padding is never trained, but its own forward and backward run: where the pad token's
embedding row is kept at zero (`padding_idx`, as in tiny random models), a padding segment's hidden
states stay zero (it attends only to itself), a norm of the form sqrt(mean(x^2)) has an infinite
derivative there, and 0 x inf poisoned every gradient of the step."""

from __future__ import annotations

import json

import torch

from sftlab.cli import main


def test_a_gemma3n_run_with_row_end_padding_trains_with_finite_gradients(tokenizer, tmp_path, capsys):
    """Gemma 3n's AltUp rescales by sqrt(mean(x^2)) of the embedded input: padded with its pad token (a
    zero row), the first LoRA step stopped with non-finite gradients; transformers' own loss on such a
    batch is NaN in backward too. Padding now repeats the row's first token."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = tmp_path / "gemma3n"
    config = AutoConfig.for_model(
        "gemma3n_text", vocab_size=len(tokenizer), vocab_size_per_layer_input=len(tokenizer), hidden_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=[96, 128],
        layer_types=["sliding_attention", "full_attention"], sliding_window=16, num_kv_shared_layers=0, laurel_rank=8,
        hidden_size_per_layer_input=16, activation_sparsity_pattern=[0.0, 0.0], pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert not model.get_input_embeddings().weight[tokenizer.pad_token_id].any()  # the zero row that did it
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "d.jsonl"  # rows of different lengths: the shorter one is padded
    data.write_text("".join(json.dumps({"instruction": "Say " + " ".join([w] * n), "output": w}) + "\n"
                            for w, n in (("a", 1), ("b", 9), ("c", 2), ("d", 14))))
    run = tmp_path / "run"
    assert main(["train", "-", f"model.name_or_path={model_dir}", f"data.train={data}", "data.max_seq_length=64",
                 "training.per_device_train_batch_size=2", "training.max_steps=2", "training.bf16=false",
                 "lora.r=4", f"output_dir={run}"]) == 0, capsys.readouterr().err
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
