"""Teacher-forced log-likelihood of reference answers, masked exactly like training.

Every conversation goes through `sftlab.data.render.render`, the function training uses,
so the tokens scored here are the tokens trained there (assistant content + end-of-turn).
Only per-example sums are kept, so memory does not grow with the number of examples; the
vocabulary projection is computed only at positions whose next token is scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from sftlab.data.conversation import Conversation, Example

IGNORE = -100
LOGITS_BUDGET = 256 * 1024**2  # bytes of fp32 logits one forward may produce


@dataclass
class LogLikelihood:
    """Sum of log-probs (nats) of one example's scored tokens, and how many there were."""

    logprob: float
    tokens: int


@dataclass
class PerplexityResult:
    perplexity: float
    loss: float  # mean negative log-likelihood per scored token (what training reports)
    tokens: int
    per_example: list[LogLikelihood]


def sequence_logprobs(
    model, examples: Sequence[Example], *, batch_size: int = 8, progress: bool = False, desc: str = "score"
) -> list[LogLikelihood]:
    """Log-likelihood of each example's labelled tokens (labels are not shifted: position p
    predicts token p+1, as in the training loss). Forwards use `use_cache=False`.

    Rows are left-padded (with explicit position ids), so answers, which end the sequences,
    share columns and the vocabulary projection covers few positions; rows are split further
    when those logits would exceed LOGITS_BUDGET bytes.
    """
    import torch
    from tqdm.auto import tqdm

    from sftlab.evaluation.generate import check_fits

    for ex in examples:
        if len(ex.input_ids) != len(ex.labels):
            raise ValueError(f"{ex.source}: input_ids and labels differ in length")
        check_fits(model, len(ex.input_ids), ex.source, "the example")
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    out: list[LogLikelihood | None] = [None] * len(examples)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(examples), desc=desc, unit="ex", disable=not progress)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(examples[i].input_ids) for i in idx)
                input_ids = torch.zeros((len(idx), width), dtype=torch.long)
                attention = torch.zeros((len(idx), width), dtype=torch.long)
                positions = torch.zeros((len(idx), width), dtype=torch.long)
                targets = torch.full((len(idx), width), IGNORE, dtype=torch.long)
                for row, i in enumerate(idx):  # left padding; position p is scored on labels[p + 1]
                    ex = examples[i]
                    n, pad = len(ex.input_ids), width - len(ex.input_ids)
                    input_ids[row, pad:] = torch.tensor(ex.input_ids)
                    attention[row, pad:] = 1
                    positions[row, pad:] = torch.arange(n)
                    targets[row, pad : width - 1] = torch.tensor(ex.labels[1:])
                keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
                rows_per_pass = max(1, LOGITS_BUDGET // max(1, keep.numel() * vocab * 4))
                for lo in range(0, len(idx), rows_per_pass):
                    part = slice(lo, lo + rows_per_pass)
                    sums, counts = _score_rows(model, device, input_ids[part], attention[part], positions[part],
                                               targets[part], keep)
                    for row, i in enumerate(idx[part]):
                        out[i] = LogLikelihood(sums[row], counts[row])
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return out  # type: ignore[return-value]


def _score_rows(model, device, input_ids, attention, positions, targets, keep) -> tuple[list[float], list[int]]:
    import torch.nn.functional as F

    if keep.numel() == 0:
        return [0.0] * len(input_ids), [0] * len(input_ids)
    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        position_ids=positions.to(device),
        use_cache=False,
        logits_to_keep=keep.to(device),
    ).logits
    tgt = targets[:, keep].to(device)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(tgt.shape)
    return (-nll).sum(dim=1).tolist(), [int(c) for c in (tgt != IGNORE).sum(dim=1).tolist()]


def aggregate(lls: Sequence[LogLikelihood]) -> tuple[float, float, int]:
    """Token-weighted (perplexity, mean NLL, tokens) of several examples."""
    tokens = sum(x.tokens for x in lls)
    if tokens == 0:
        return float("nan"), float("nan"), 0
    loss = -sum(x.logprob for x in lls) / tokens
    return math.exp(loss), loss, tokens


def render_all(conversations: Sequence[Conversation], tokenizer, options=None) -> list[Example]:
    """Render like training (`options` default: training's defaults); the first failure is raised."""
    from sftlab.data.render import RenderOptions, render_many

    out = render_many(list(conversations), tokenizer, options or RenderOptions())
    for item in out:
        if not isinstance(item, Example):
            raise item
    return out


def perplexity(
    model, tokenizer, conversations: Sequence[Conversation], *, batch_size: int = 8, progress: bool = True,
    options=None,
) -> PerplexityResult:
    """Perplexity of the reference answers: exp(token-weighted mean NLL of the trained tokens).

    `options` are the `RenderOptions` used in training (which turns are trained, truncation).
    """
    lls = sequence_logprobs(model, render_all(conversations, tokenizer, options), batch_size=batch_size,
                            progress=progress, desc="perplexity")
    ppl, loss, tokens = aggregate(lls)
    return PerplexityResult(ppl, loss, tokens, lls)
