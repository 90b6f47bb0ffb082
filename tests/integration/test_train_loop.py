"""The training loop's figures: eval loss per trained token over the whole eval set, and
DoRA on a bf16 base as close to an fp32 base as LoRA is."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from sftlab.data.conversation import Example
from sftlab.data.pack import collate
from sftlab.train.loss import selective_loss_sum


def _example(g, prompt: int, trained: int) -> Example:
    ids = torch.randint(100, 5000, (prompt + trained,), generator=g).tolist()
    return Example(ids, [-100] * prompt + ids[prompt:])


def test_eval_loss_is_the_per_token_loss_of_the_whole_eval_set(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from sftlab.train.attention import can_flatten, choose_attention
    from sftlab.train.trainer import RowDataset, SFTTrainer

    g = torch.Generator().manual_seed(0)
    # eval batches (2 rows each) with 3 and 400 trained tokens: a mean of batch means weighs them alike
    examples = [_example(g, 30, 1), _example(g, 20, 2), _example(g, 5, 200), _example(g, 8, 200)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    choose_attention(model, None)  # the default path: varlen attention, flattened batches
    flatten = can_flatten(model)
    collator = partial(collate, flatten=flatten, bucket=True)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, use_cpu=True, report_to="none",
                             remove_unused_columns=False, prediction_loss_only=True, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, eval_dataset=RowDataset([[e] for e in examples]),
                         data_collator=collator)
    got = trainer.evaluate()["eval_loss"]

    model.eval()
    with torch.no_grad():
        sums = [selective_loss_sum(model, collator(pair)) for pair in ([[examples[0]], [examples[1]]],
                                                                        [[examples[2]], [examples[3]]])]
        # each example alone, unpacked: the figure does not depend on how the set was batched
        alone = [selective_loss_sum(model, collate([[e]])) for e in examples]
    assert [n for _, n in sums] == [3, 400]
    per_token = sum(s.item() for s, _ in alone) / sum(n for _, n in alone)
    assert got == pytest.approx(per_token, rel=1e-5)
    batch_means = sum(s.item() / n for s, n in sums) / len(sums)
    assert abs(batch_means - per_token) > 1e-3  # the two figures really differ on these batches


def test_dora_on_a_bf16_base_gets_gradients_as_close_to_fp32_as_lora(tiny_model_dir):
    """Why `model.dtype: auto` loads a DoRA base in bf16: PEFT keeps the magnitude vector and
    the adapters in fp32, and the gradients move no more than LoRA's do."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ids = torch.randint(100, 5000, (2, 48), generator=torch.Generator().manual_seed(0))
    worst = {}
    for dora in (False, True):
        grads = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
            torch.manual_seed(1)
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=dora))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.05)
            assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            grads[dtype] = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        if dora:
            assert any("lora_magnitude_vector" in n for n in grads[torch.float32])
        a, b = grads[torch.float32], grads[torch.bfloat16]
        worst[dora] = max(((b[n] - a[n]).norm() / a[n].norm()).item() for n in a)
    assert worst[True] < 0.05 and worst[True] < 1.5 * worst[False], worst
