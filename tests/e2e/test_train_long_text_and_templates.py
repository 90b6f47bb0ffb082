"""Continued pre-training splits long documents so every token trains; a base model trains with a
named chat template whose new special tokens are learned and saved with the LoRA adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_tiny_llama
from sftlab.cli import main
from sftlab.config import DataConfig
from sftlab.data.conversation import Conversation, Example
from sftlab.data.render import IGNORE, RenderOptions, render
from sftlab.train.dataset import prepare_examples, text_blocks

WORDS = "river stone lantern orbit velvet quarry meadow cipher harbor tundra".split()


@pytest.fixture(scope="module")
def long_doc(tmp_path_factory, tokenizer):
    """A JSONL file with one document of at least 10,000 tokens, and its rendered form."""
    rng = np.random.default_rng(0)
    text = " ".join(rng.choice(WORDS, size=9000))
    while len(tokenizer(text)["input_ids"]) < 10_000:
        text += " " + " ".join(rng.choice(WORDS, size=200))
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    full = render(Conversation(text=text, source="doc"), tokenizer, RenderOptions(split_text=True))
    assert len(full) >= 10_000
    return path, full


def targets(full: Example) -> int:
    """Tokens of the document a model can be trained to predict: all trained labels but the first token's."""
    return full.num_trained - int(full.label_ids[0] != IGNORE)


def test_blocks_cover_every_token_once():
    ex = Example(list(range(10)), list(range(10)), "d")
    blocks = text_blocks(ex, 4, 1)
    assert [b.input_ids for b in blocks] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert [b.labels for b in blocks] == [[0, 1, 2, 3], [IGNORE, 4, 5, 6], [IGNORE, 7, 8, 9]]
    assert [b.source for b in blocks] == ["d block 1/3", "d block 2/3", "d block 3/3"]
    wide = text_blocks(ex, 5, 2)
    assert [b.input_ids[0] for b in wide] == [0, 3, 6] and wide[-1].input_ids == [6, 7, 8, 9]
    assert [lab for b in wide for lab in b.labels[1:] if lab != IGNORE] == list(range(1, 10))
    assert text_blocks(ex, 10, 1) == [ex]


def test_a_10000_token_document_is_split_not_cut(long_doc, tokenizer, tmp_path):
    path, full = long_doc
    data = DataConfig(train=str(path), format="text", max_seq_length=512, stride=16)
    examples, stats = prepare_examples(str(path), tokenizer, data, tmp_path / "cache")
    assert all(len(e) <= 512 for e in examples)
    assert (stats.text_documents, stats.text_blocks) == (1, len(examples)) and len(examples) >= 20
    trained = [lab for e in examples for lab in e.labels[1:] if lab != IGNORE]  # a row's first label is never a target
    assert trained == [lab for lab in full.labels[1:] if lab != IGNORE]  # every token, once, in order
    assert stats.truncated == 0 and stats.too_long == 0


def test_training_on_a_10000_token_document_trains_all_its_tokens(long_doc, tiny_model_dir, tmp_path):
    path, full = long_doc
    out = tmp_path / "run"
    assert main(["train", "-", f"model.name_or_path={tiny_model_dir}", f"data.train={path}", "data.format=text",
                 "data.max_seq_length=256", "training.per_device_train_batch_size=8", "training.num_train_epochs=1",
                 "training.bf16=false", f"output_dir={out}"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["train_data"]["text_documents"] == 1 and info["train_data"]["text_blocks"] >= 40
    assert info["trained_tokens_seen"] == targets(full)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_base_model_trains_with_a_named_template_and_its_new_tokens(tiny_model_dir, tmp_path, tokenizer, tied):
    import torch

    from sftlab.models import load_model

    base_dir = tiny_model_dir if tied else make_tiny_llama(tmp_path / "untied", tokenizer, tied=False)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Echo {w}", "output": w}) + "\n" for w in WORDS))
    out = tmp_path / "run"
    assert main(["train", "-", f"model.name_or_path={base_dir}", f"data.train={data}", "model.chat_template=llama3",
                 "data.max_seq_length=64", "training.max_steps=3", "training.learning_rate=1e-1",
                 "training.bf16=false", "lora.r=4", f"output_dir={out}"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    new_ids = [len(tokenizer), len(tokenizer) + 1, len(tokenizer) + 2]
    assert config["trainable_token_indices"] == {"embed_tokens": new_ids} | ({} if tied else {"lm_head": new_ids})
    assert not config.get("modules_to_save")
    # what trains: the LoRA matrices and the new rows, not an untied head's whole matrix (and its AdamW states)
    lora = sum(4 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]) * 2
    assert json.loads((out / "run.json").read_text())["trainable_params"] == lora + 3 * 64 * (1 if tied else 2)

    model = load_model(str(out))  # the base grows to the run's tokenizer before the adapter loads
    ids = torch.tensor([new_ids + [1, 2]])
    with torch.no_grad():
        tuned = model.get_input_embeddings()(ids)
        tuned_head = model.get_output_embeddings()(tuned)
        with model.disable_adapter():
            base = model.get_input_embeddings()(ids)
            base_head = model.get_output_embeddings()(tuned)
    changed = (tuned - base).abs().amax(-1)[0]
    assert (changed[:3] > 0).all(), "the added tokens' embeddings were not trained"
    assert (changed[3:] == 0).all(), "existing tokens' embeddings must stay the base's"
    head_changed = (tuned_head - base_head).abs().amax((0, 1))
    assert (head_changed[new_ids] > 0).all(), "the model cannot learn to write the added tokens"
    assert (head_changed[: len(tokenizer)] == 0).all(), "existing tokens' output rows must stay the base's"
    # merged, the trained rows are in the plain model (export checks merged == unmerged logits)
    assert main(["export", str(out), "--to", "merged", str(tmp_path / "merged")]) == 0


def whole_embedding_keys(adapter_dir) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return [k for k in f.keys() if ("embed_tokens" in k or "lm_head" in k) and k.endswith(".weight")]


def logits_loaded(run, seed: int, ids: list[int]):
    """The run's model as sftlab loads it, the base's grown rows drawn under `seed`, on `ids`."""
    import torch

    from sftlab.models import load_model

    torch.manual_seed(seed)
    model = load_model(str(run)).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize("grown_by", ["template", "tokenizer"])
def test_the_adapter_holds_the_new_rows_not_the_embedding_layers_and_loads_the_same_model(tmp_path, tokenizer, grown_by):
    """PEFT saved both embedding layers whole into the adapter whenever the vocabulary grew (2 x 113 MB on
    SmolLM2 with model.chat_template=llama3). Every grown row is a trainable token whose values the adapter
    holds, so a base grown again at load (other random rows) gives the same model: also where the tokenizer
    is longer than the model's embeddings (tokens the model never saw, now trained, not left random)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    short = 4 if grown_by == "tokenizer" else 0
    base = tmp_path / "base"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) - short, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                     ).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Echo {w}", "output": w}) + "\n" for w in WORDS))
    out = tmp_path / "run"
    template = ["model.chat_template=llama3"] if grown_by == "template" else []
    assert main(["train", "-", f"model.name_or_path={base}", f"data.train={data}", *template, "data.max_seq_length=64",
                 "training.max_steps=2", "training.learning_rate=1e-1", "training.bf16=false", "lora.r=4",
                 f"output_dir={out}"]) == 0
    rows = json.loads((out / "adapter" / "adapter_config.json").read_text())["trainable_token_indices"]
    new = list(range(len(tokenizer) - short, len(tokenizer) + (3 if grown_by == "template" else 0)))
    assert rows == {"embed_tokens": new, "lm_head": new}
    assert whole_embedding_keys(out / "adapter") == []
    ids = [*new, 5, 6, *new]
    assert torch.equal(logits_loaded(out, 1, ids), logits_loaded(out, 2, ids))
