"""A mixture of experts whose config asks for its router logits trains with the load-balancing
loss, as transformers' own loss (labels given) adds it: sftlab's summed loss over a micro-batch's
trained tokens, divided by their count, must equal the model's loss. Evaluation stays the CE."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sftlab.train.loss import IGNORE, selective_loss_sum


@pytest.fixture(scope="module")
def moe():
    config = AutoConfig.for_model("mixtral", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                  num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def batch():
    ids = torch.randint(64, (1, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = IGNORE  # a prompt
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(12)[None]}


def test_training_adds_the_load_balancing_loss_as_transformers_does(moe):
    b = batch()
    moe.train()
    loss_sum, n = selective_loss_sum(moe, b)
    reference = moe(input_ids=b["input_ids"], labels=b["labels"], use_cache=False)
    assert reference.aux_loss > 0.1  # the load-balancing term matters at this size
    assert (loss_sum / n).item() == pytest.approx(reference.loss.item(), rel=1e-5)


def test_evaluation_loss_is_the_cross_entropy_alone(moe):
    b = batch()
    moe.eval()
    loss_sum, n = selective_loss_sum(moe, b)
    reference = moe(input_ids=b["input_ids"], labels=b["labels"], use_cache=False)
    ce = reference.loss - moe.config.router_aux_loss_coef * reference.aux_loss
    assert (loss_sum / n).item() == pytest.approx(ce.item(), rel=1e-5)
