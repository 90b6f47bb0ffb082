"""`sftlab data pairs`: an SFT-style model's wrong answers become DPO-ready pairs."""

from __future__ import annotations

import json

from sftlab.cli import main


def _talkative(tiny_model_dir, tokenizer, out):
    """The tiny random model answers only newlines; with the embedding rows of whitespace and special
    tokens zeroed (the embeddings are tied, so their logits are 0) its greedy answers are words."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    silent = [i for i in range(len(tokenizer)) if not tokenizer.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():
        model.get_input_embeddings().weight[silent] = 0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_data_pairs_writes_pairs_that_align_can_read(tiny_model_dir, tmp_path, tokenizer):
    from sftlab.config import DataConfig
    from sftlab.train.preference import load_preferences

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and {i}.", "output": str(2 * i)}) + "\n"
                            for i in range(6)))
    out = tmp_path / "pairs.jsonl"
    model_dir = _talkative(tiny_model_dir, tokenizer, tmp_path / "model")
    assert main(["data", "pairs", str(model_dir), "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "6"]) == 0
    summary = json.loads((tmp_path / "pairs.pairs.json").read_text())
    assert summary["examples"] == 6
    assert summary["pairs"] == 6 - summary["correct"] - summary["empty"] > 0  # a random model gets them wrong
    rows, stats = load_preferences(str(out), tokenizer, DataConfig(train=str(out)), paired=True)
    assert len(rows) == summary["pairs"]
    first = json.loads(out.read_text().splitlines()[0])
    assert first["source"].startswith(f"{data}:") and first["messages"][-1]["content"] in {str(2 * i) for i in range(6)}
