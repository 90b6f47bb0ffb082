"""One SGD step of SFTTrainer on two rows; run alone (batch 2) or under torchrun (2 x batch 1).

Usage: python ddp_step.py MODEL_DIR DATA_JSONL OUT.pt BATCH PATH
PATH: `sdpa-rows` (transformers' sdpa, one padded row per example) or `default` (what train()
picks: sftlab_varlen on batches flattened into one row and shape-rounded).
"""

import sys
from functools import partial

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from sftlab.data.load import load_conversations
from sftlab.data.pack import collate
from sftlab.data.render import render_many
from sftlab.train.attention import NAME, can_flatten, choose_attention
from sftlab.train.distributed import end_rank
from sftlab.train.trainer import RowDataset, SFTTrainer

model_dir, data, out, batch, path = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
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
args = TrainingArguments(
    output_dir=out + ".tmp", per_device_train_batch_size=batch, max_steps=1, learning_rate=1.0, optim="sgd",
    lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=True, report_to="none", save_strategy="no",
    remove_unused_columns=False, seed=0, disable_tqdm=True,
)
trainer = SFTTrainer(model=model, args=args, train_dataset=RowDataset(rows),
                     data_collator=partial(collate, pad_token_id=tok.pad_token_id, flatten=default, bucket=default))
trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
trainer.train()
if trainer.args.process_index == 0:
    torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, out)
end_rank(0)
