"""Two SFTTrainer steps on the first two rows and an evaluation on all the rows; run alone
(batch 2) or under torchrun (2 x batch 1). Writes the trained-token count and the eval loss as
JSON (rank 0).

Usage: python ddp_counts.py MODEL_DIR DATA_JSONL OUT.json BATCH
"""

import json
import sys
from functools import partial

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from sftlab.data.load import load_conversations
from sftlab.data.pack import collate
from sftlab.data.render import render_many
from sftlab.train.distributed import end_rank
from sftlab.train.trainer import RowDataset, SFTTrainer

model_dir, data, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model_dir)
rows = [[e] for e in render_many(load_conversations(data), tok)]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
args = TrainingArguments(
    output_dir=out + ".tmp", per_device_train_batch_size=batch, per_device_eval_batch_size=batch, max_steps=2,
    learning_rate=1e-3, optim="sgd", lr_scheduler_type="constant", use_cpu=True, report_to="none",
    save_strategy="no", remove_unused_columns=False, prediction_loss_only=True, seed=0, disable_tqdm=True,
)
trainer = SFTTrainer(model=model, args=args, train_dataset=RowDataset(rows[:2]), eval_dataset=RowDataset(rows),
                     data_collator=partial(collate, pad_token_id=tok.pad_token_id))
trainer.train()
counts = {"trained_tokens_seen": trainer.trained_tokens_seen, "eval_loss": trainer.evaluate()["eval_loss"]}
if trainer.args.process_index == 0:
    with open(out, "w") as f:
        json.dump(counts, f)
end_rank(0)
