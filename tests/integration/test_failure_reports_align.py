"""Failure reports filed against other toolkits' preference alignment, checked on sftlab's own path (tiny
random Llama, SmolLM2's tokenizer)."""

from __future__ import annotations

import warnings

import pytest


def _completions(batch, prefix: str = "") -> list[list[int]]:
    """The completion ids of each row of a collated KTO batch (its own, or with prefix "KL_" its KL row's)."""
    masks = batch[f"{prefix}completion_mask"]
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch[f"{prefix}input_ids"], masks)]


@pytest.mark.parametrize("rows, batch_size", [(9, 4), (7, 2), (10, 3)])
def test_kto_s_kl_estimate_never_scores_a_prompt_with_its_own_completion(tiny_model_dir, tokenizer, tmp_path, rows,
                                                                          batch_size):
    """trl#1911 "Minor KTO mis-estimation of KL term on odd batch sizes": the mismatched (prompt, completion)
    pairs of the KL estimate came out matched for one row of a batch, so that batch's KL estimate held a reward.
    TRL 1.16 rotates the completions within each batch, which leaves a last batch of one row (the rows do not
    fill it) with its own completion. In every batch the trainer's loaders give, training and evaluation
    (another batch size), no row's KL completion is its own, and a batch of several rows scores its own
    completions, paired with other prompts."""
    from sftlab.config import AlignConfig, load_config
    from sftlab.data.conversation import Conversation
    from sftlab.train.align import build_trainer, load_policy
    from sftlab.train.preference import render_preferences

    convs = [Conversation([{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"It is {2 * i}."}], source=f"mem:{i}",
                          meta={"label": bool(i % 2)}) for i in range(rows)]
    data = render_preferences(convs, tokenizer, paired=False)
    overrides = {"model.name_or_path": tiny_model_dir, "data.train": "unused.jsonl", "align.loss": "kto",
                 "training.per_device_train_batch_size": batch_size,
                 "training.per_device_eval_batch_size": batch_size + 1, "training.bf16": False,
                 "output_dir": tmp_path}
    config = load_config(None, [f"{k}={v}" for k, v in overrides.items()], cls=AlignConfig)
    model, peft_config, _ = load_policy(config, "float32", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rows are not balanced as the KTO paper recommends
        trainer = build_trainer(config, model, peft_config, tokenizer, data, data[:batch_size + 2], tmp_path, False)
    for loader in (trainer.get_train_dataloader(), trainer.get_eval_dataloader()):
        batches = list(loader)
        assert len(batches[-1]["label"]) == 1  # the case TRL's rotation pairs with itself
        for batch in batches:
            own, kl = _completions(batch), _completions(batch, "KL_")
            assert all(a != b for a, b in zip(own, kl))
            if len(own) > 1:
                assert sorted(kl) == sorted(own)
