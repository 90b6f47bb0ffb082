"""Preference pairs from a model's mistakes: for each example the model answers wrongly, the
reference answer is chosen and the model's own answer rejected.

These are the most useful pairs for DPO after SFT: the rejected side is what the model really
produces (on-policy), so the loss pushes down the errors it makes, not made-up ones. An answer
counts as right when it equals the reference up to whitespace and case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sftlab.data.conversation import Conversation
from sftlab.evaluation.metrics import normalize


@dataclass
class MistakeStats:
    examples: int = 0
    correct: int = 0
    empty: int = 0  # answers with no text: no usable rejected side
    pairs: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def is_correct(prediction: str, reference: str) -> bool:
    return normalize(prediction, case_sensitive=False) == normalize(reference, case_sensitive=False)


def mistake_pairs(conversations: Sequence[Conversation], predictions: Sequence[str]) -> tuple[list[dict], MistakeStats]:
    """Preference records ({prompt, chosen, rejected, source, ...meta}) from answers that miss the reference."""
    stats = MistakeStats(examples=len(conversations))
    pairs = []
    for conv, pred in zip(conversations, predictions, strict=True):
        reference = conv.reference()
        if is_correct(pred, reference):
            stats.correct += 1
        elif not pred.strip():
            stats.empty += 1
        else:
            pairs.append({"prompt": conv.prompt_messages(), "chosen": reference, "rejected": pred,
                          "source": conv.source, **{k: v for k, v in conv.meta.items() if k != "rejected"}})
    stats.pairs = len(pairs)
    return pairs, stats


def pairs_from_model(model, tokenizer, conversations: Sequence[Conversation], *, max_new_tokens: int = 64,
                     batch_size: int = 16, progress: bool = True) -> tuple[list[dict], MistakeStats]:
    """Answer every prompt greedily (as `sftlab eval` does) and pair up the wrong answers."""
    from sftlab.evaluation.generate import generate_batch

    predictions = generate_batch(model, tokenizer, [c.prompt_messages() for c in conversations],
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                                 sources=[c.source for c in conversations])
    return mistake_pairs(conversations, predictions)
