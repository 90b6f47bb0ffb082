"""The ORPO loss against the paper's formula written with probabilities."""

from __future__ import annotations

import math

import torch

from sftlab.train.orpo import log_odds, orpo_loss


def test_orpo_loss_matches_the_formula():
    p_chosen, p_rejected, nll, lam = [0.6, 0.2], [0.3, 0.25], torch.tensor(1.5), 0.1
    loss, ratio = orpo_loss(torch.tensor(p_chosen).log(), torch.tensor(p_rejected).log(), nll, lam)
    odds = [math.log(c / (1 - c)) - math.log(r / (1 - r)) for c, r in zip(p_chosen, p_rejected)]
    want = 1.5 - lam * sum(math.log(1 / (1 + math.exp(-o))) for o in odds) / 2
    assert abs(loss.item() - want) < 1e-6
    assert torch.allclose(ratio, torch.tensor(odds), atol=1e-6)


def test_log_odds_is_finite_for_certain_and_hopeless_answers():
    values = log_odds(torch.tensor([0.0, -1e-9, -200.0]))
    assert torch.isfinite(values).all() and values[0] > 10 and values[2] < -150
