"""Multimodal types beyond test_archs_multimodal.py's, found wrong by a sweep over transformers' image-text-to-text
and multimodal LM types (a tiny random model of each, then what a user runs on text-only chat data: `sftlab estimate`,
and the model `sftlab train` builds, a packed training step, LoRA all-linear and full): each trains its language
model alone, every parameter that trains gets a gradient from the text, and the estimate counts them; or it is
refused in one line, by `sftlab estimate` too where the config shows it."""

from __future__ import annotations

import re

import pytest
import torch
from test_archs_multimodal import TEXT, VISION

from sftlab.errors import SftlabError

IMAGE = dict(VISION, image_size=28, patch_size=14)
# model type -> its config beyond the text's sizes (v: the vocabulary size), and what was wrong
ARCHS = {
    # its image patches enter through one linear layer, vision_embed_tokens, and its config has a text_config alone:
    # LoRA all-linear adapted that layer and full fine-tuning trained it, text never running it
    "fuyu": lambda v: dict(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=v), image_token_id=v - 1,
                           image_size=28, patch_size=14),
    # image_newline, a parameter of the model beside its towers: full fine-tuning trained it
    "llava_next": lambda v: dict(text_config=dict(TEXT, vocab_size=v), vision_config=IMAGE, image_token_index=v - 1,
                                 image_grid_pinpoints=[[28, 28]]),
    # an audio-text model, which AutoModelForCausalLM refuses: `sftlab train` and `sftlab estimate` could not load it
    "qwen2_audio": lambda v: dict(text_config=dict(TEXT, vocab_size=v), audio_token_index=v - 1,
                                  audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2,
                                                    encoder_ffn_dim=64, num_mel_bins=16)),
}
# model type -> its config, the refusal, and whether `sftlab estimate` refuses it too; each trained to a traceback at
# the first step (BLIP: forward() missing 'pixel_values'; Florence-2: an IndexError; IDEFICS: 'Exactly 1 of
# pixel_values, image_encoder_embeddings or perceiver_embeddings has to be not-None')
REFUSED = {
    "blip": (lambda v: dict(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, vocab_size=v, encoder_hidden_size=32),
                            vision_config=IMAGE), "needs pixel_values at every step besides the text", True),
    "florence2": (lambda v: dict(text_config=dict(d_model=64, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64,
                                                  decoder_ffn_dim=64, encoder_attention_heads=4,
                                                  decoder_attention_heads=4, vocab_size=v),
                                 vision_config=dict(embed_dim=[32], depths=[1], num_heads=[2], num_groups=[2],
                                                    patch_size=[7], patch_stride=[4], patch_padding=[3],
                                                    patch_prenorm=[False], projection_dim=64),
                                 image_token_id=v - 1), "is an encoder-decoder model", True),
    "idefics": (lambda v: dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               vocab_size=v, additional_vocab_size=0, cross_layer_interval=1,
                               vision_config=dict(embed_dim=32, image_size=28, patch_size=14, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=64),
                               perceiver_config=dict(resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                                                     resampler_head_dim=8)),
                "does not run on text alone (ValueError: Exactly 1 of pixel_values", False),
}


def save(model_type: str, given, tokenizer, path) -> str:
    """A tiny random `model_type` saved as its checkpoints are: the whole multimodal model."""
    from transformers import AutoConfig, AutoModelForMultimodalLM

    config = AutoConfig.for_model(model_type, **given(len(tokenizer)))
    torch.manual_seed(0)
    AutoModelForMultimodalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def train_config(path: str, method: str):
    from sftlab.config import TrainConfig

    return TrainConfig.model_validate({"model": {"name_or_path": path}, "method": method, "lora": {"r": 4},
                                       "data": {"train": "x.jsonl"}})


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_text_trains_the_language_model_alone_and_the_estimate_counts_what_trains(model_type, tokenizer, tmp_path):
    from test_train_invariants import demo_examples

    from sftlab.data.pack import collate
    from sftlab.estimate import estimate_memory
    from sftlab.train.loss import selective_loss_sum
    from sftlab.train.trainer import build_model

    path = save(model_type, ARCHS[model_type], tokenizer, tmp_path)
    batch = collate([demo_examples(tokenizer)[:2]])  # packed in one row
    for method in ("lora", "full"):
        model = build_model(train_config(path, method), use_bf16=False, tokenizer=tokenizer)
        selective_loss_sum(model.train(), batch)[0].backward()
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trained and [n for n, p in trained.items() if p.grad is None] == [], method
        estimated = estimate_memory(path, method, seq_len=64, batch=1, lora_r=4).trainable_params
        assert estimated == sum(p.numel() for p in trained.values()), method


@pytest.mark.parametrize("model_type", list(REFUSED))
def test_a_model_text_alone_cannot_train_is_refused_in_one_line(model_type, tokenizer, tmp_path):
    from sftlab.estimate import estimate_memory
    from sftlab.train.trainer import build_model

    given, reason, by_estimate = REFUSED[model_type]
    path = save(model_type, given, tokenizer, tmp_path)
    with pytest.raises(SftlabError, match=f"^model: [A-Za-z0-9]+ {re.escape(reason)}"):
        build_model(train_config(path, "lora"), use_bf16=False, tokenizer=tokenizer)
    if by_estimate:
        with pytest.raises(SftlabError, match=f"^model: [A-Za-z0-9]+ {re.escape(reason)}"):
            estimate_memory(path, "lora", seq_len=64, batch=1)
