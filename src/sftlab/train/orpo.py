"""ORPO (odds-ratio preference optimisation): SFT loss on the chosen answer plus an odds-ratio
term, with no reference model.

Why our own loss here: TRL 1.16 keeps ORPO only under `trl.experimental`, where the trainer
re-tokenises text itself (`tokenize_row` after applying the chat template) instead of taking
token ids, builds the full vocabulary logits, and computes the NLL term over prompt and answer.
This trainer takes the same batches as DPO (TRL's `DataCollatorForPreference`), scores them
with TRL's fused LM head (per-token log-probs without materialising the logits), and
implements the loss of the ORPO paper (arXiv:2403.07691, eq. 6-7):
    L = NLL(chosen answer) - lambda * log sigmoid(log odds(chosen) - log odds(rejected)),
    log odds(y) = log p - log(1 - p), p = mean per-token probability of the answer.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers import Trainer

from sftlab.train.checkpointing import AtomicCheckpoints
from sftlab.train.guards import RecordsStepLosses
from sftlab.train.schedule import RatioWarmup


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) from log p, stable for p near 0 and 1."""
    return mean_logps - torch.log(-torch.expm1(mean_logps.clamp(max=-1e-6)))


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_nll: torch.Tensor, lam: float):
    """(loss, log-odds ratio per pair) from mean per-token log-probs of each answer."""
    ratio = log_odds(chosen_logps.float()) - log_odds(rejected_logps.float())
    return chosen_nll - lam * F.logsigmoid(ratio).mean(), ratio


class ORPOTrainer(AtomicCheckpoints, RatioWarmup, RecordsStepLosses, Trainer):
    """A Trainer whose loss is ORPO's; logs the same reward metrics as TRL's DPOTrainer.
    Checkpoints and the non-finite guard as in `sftlab train`."""

    def __init__(self, *args, beta: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        from trl.trainer.utils import add_fused_lm_head

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        add_fused_lm_head(base)
        self.beta = beta
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def sequence_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean per-token log-prob of each answer, its token count); rows are [chosen..., rejected...]."""
        mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(mask == 0, -100)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                    fused_lm_head=True, use_cache=False)
        counts = mask[:, 1:].sum(dim=1).clamp(min=1)
        return out.log_probs.sum(dim=1) / counts, counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mean_logps, counts = self.sequence_logps(model, inputs)
        chosen, rejected = mean_logps.chunk(2)
        chosen_counts, _ = counts.chunk(2)
        nll = -(chosen * chosen_counts).sum() / chosen_counts.sum()
        loss, ratio = orpo_loss(chosen, rejected, nll, self.beta)
        m = self._metrics["train" if model.training else "eval"]
        chosen_rewards, rejected_rewards = self.beta * chosen.detach(), self.beta * rejected.detach()
        m["rewards/chosen"].append(chosen_rewards.mean().item())
        m["rewards/rejected"].append(rejected_rewards.mean().item())
        m["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        m["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        m["logps/chosen"].append(chosen.detach().mean().item())
        m["logps/rejected"].append(rejected.detach().mean().item())
        m["nll_loss"].append(nll.item())
        m["log_odds_ratio"].append(ratio.detach().mean().item())
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{k}": sum(v) / len(v) for k, v in self._metrics[mode].items() if v})
        self._metrics[mode].clear()
        super().log(logs, start_time)
