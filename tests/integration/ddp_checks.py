"""What two processes under torchrun (2 x batch 1) must reproduce of one process (batch 2), all in
one launch (a torchrun start-up costs more than the checks):
- one SGD step of SFTTrainer on two rows, on transformers' sdpa with one padded row per example
  (`sdpa-rows`) and on the path train() picks (`default`: sftlab_varlen on batches flattened into
  one row and shape-rounded): the weights after it;
- two steps on the first two rows and an evaluation on all the rows (`counts`): the trained-token
  count and the eval loss.

Usage: python ddp_checks.py MODEL_DIR STEP_DATA COUNT_DATA OUT.pt BATCH (under torchrun: rank 0 writes)
"""

from __future__ import annotations

import os
import sys
from functools import partial

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from sftlab.data.load import load_conversations
from sftlab.data.pack import collate
from sftlab.data.render import render_many
from sftlab.train.attention import NAME, can_flatten, choose_attention
from sftlab.train.trainer import RowDataset, SFTTrainer


def _args(out: str, batch: int, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=out, per_device_train_batch_size=batch, optim="sgd", lr_scheduler_type="constant",
                             use_cpu=True, report_to="none", save_strategy="no", remove_unused_columns=False, seed=0,
                             disable_tqdm=True, **kw)


def one_step(model_dir: str, data: str, out: str, batch: int, path: str) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = render_many(load_conversations(data)[:2], tok)
    assert examples[0].num_trained != examples[1].num_trained  # normalisation must matter
    rows = [[e] for e in examples]
    torch.manual_seed(0)
    attn = {"sdpa-rows": "sdpa", "default": None}[path]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    choose_attention(model, attn, packing=True)
    default = path == "default"
    assert (model.config._attn_implementation == NAME) == default and can_flatten(model) == default
    trainer = SFTTrainer(model=model, args=_args(out, batch, max_steps=1, learning_rate=1.0, max_grad_norm=0.0),
                         train_dataset=RowDataset(rows),
                         data_collator=partial(collate, flatten=default, bucket=default))
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
    trainer.train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def counts(model_dir: str, data: str, out: str, batch: int) -> dict[str, float]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [[e] for e in render_many(load_conversations(data), tok)]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = _args(out, batch, per_device_eval_batch_size=batch, max_steps=2, learning_rate=1e-3, prediction_loss_only=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=RowDataset(rows[:2]), eval_dataset=RowDataset(rows),
                         data_collator=collate)
    trainer.train()
    return {"trained_tokens_seen": trainer.trained_tokens_seen, "eval_loss": trainer.evaluate()["eval_loss"]}


def run_all(model_dir: str, step_data: str, count_data: str, work: str, batch: int) -> dict:
    results = {path: one_step(model_dir, step_data, f"{work}.{path}", batch, path) for path in ("sdpa-rows", "default")}
    results["counts"] = counts(model_dir, count_data, f"{work}.counts", batch)
    return results


if __name__ == "__main__":
    from sftlab.train.distributed import end_rank

    model_dir, step_data, count_data, out, batch = sys.argv[1:5] + [int(sys.argv[5])]
    results = run_all(model_dir, step_data, count_data, out + ".tmp", batch)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out)
    end_rank(0)
