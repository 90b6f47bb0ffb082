"""Preference pairs from a model's mistakes: for each example the model answers wrongly, the
reference answer is chosen and the model's own answer rejected.

These are the most useful pairs for DPO after SFT: the rejected side is what the model really
produces (on-policy), so the loss pushes down the errors it makes, not made-up ones. An answer
counts as right when it equals the reference up to whitespace and case.

Mistake pairs alone are one-sided: when most mistakes go the same way (a classifier calling
neutral reviews positive or negative), every pair says "prefer neutral", and DPO learns to say
it everywhere. Anchor pairs balance them: a right answer is chosen, and another example's
reference answer from the same group (`task` by default, e.g. another label) is rejected, so the
model is also told to keep what it already gets right (docs/alignment.md shows both).
"""

from __future__ import annotations

import math
import random
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
    anchors: int = 0  # pairs from right answers (see the module docstring)

    def to_json(self) -> dict:
        return asdict(self)


def is_correct(prediction: str, reference: str) -> bool:
    return normalize(prediction, case_sensitive=False) == normalize(reference, case_sensitive=False)


def _pair(conv: Conversation, chosen: str, rejected: str, **extra) -> dict:
    return {"prompt": conv.prompt_messages(), "chosen": chosen, "rejected": rejected, "source": conv.source,
            **{k: v for k, v in conv.meta.items() if k != "rejected"}, **extra}


def mistake_pairs(conversations: Sequence[Conversation], predictions: Sequence[str], *, anchors: float = 0.0,
                  group: str = "task", seed: int = 0) -> tuple[list[dict], MistakeStats]:
    """Preference records ({prompt, chosen, rejected, source, ...meta}) from answers that miss the reference;
    then `anchors` x as many anchor pairs (marked `"anchor": true`) from right answers, drawn at random
    (`seed`) among those whose group (the `group` field; one group without it) has another reference."""
    stats = MistakeStats(examples=len(conversations))
    pairs, right = [], []
    for conv, pred in zip(conversations, predictions, strict=True):
        reference = conv.reference()
        if is_correct(pred, reference):
            stats.correct += 1
            right.append(conv)
        elif not pred.strip():
            stats.empty += 1
        else:
            pairs.append(_pair(conv, reference, pred))
    stats.pairs = len(pairs)
    if anchors > 0 and pairs:
        references: dict = {}
        for conv in conversations:
            references.setdefault(conv.meta.get(group), set()).add(conv.reference())
        rnd = random.Random(seed)
        candidates = [c for c in right if len(references[c.meta.get(group)]) > 1]
        for conv in rnd.sample(candidates, min(len(candidates), math.ceil(anchors * len(pairs)))):
            others = sorted(references[conv.meta.get(group)] - {conv.reference()})
            pairs.append(_pair(conv, conv.reference(), rnd.choice(others), anchor=True))
            stats.anchors += 1
    return pairs, stats


def pairs_from_model(model, tokenizer, conversations: Sequence[Conversation], *, max_new_tokens: int = 64,
                     batch_size: int = 16, progress: bool = True, **options) -> tuple[list[dict], MistakeStats]:
    """Answer every prompt greedily (as `sftlab eval` does) and pair up the wrong answers."""
    from sftlab.evaluation.generate import generate_batch

    predictions = generate_batch(model, tokenizer, [c.prompt_messages() for c in conversations],
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                                 sources=[c.source for c in conversations])
    return mistake_pairs(conversations, predictions, **options)
