"""Log-likelihood multiple choice, as evaluation harnesses score it.

Each option is rendered as the assistant's answer to the prompt (masked like training, so
the option's tokens and the end-of-turn are scored), and the option with the highest
log-probability per UTF-8 byte of its text wins: dividing by length removes the bias
towards short options (lm-evaluation-harness calls this `acc_norm`).

A conversation is a multiple-choice item when `meta["choices"]` lists the options; the
right one is `meta["answer"]` (its index from 0, its text, or its letter from A), else the reference answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sftlab.data.conversation import Conversation
from sftlab.errors import DataError


@dataclass
class ChoiceResult:
    scores: list[float]  # length-normalised log-prob of each option
    predicted: int
    answer: int

    @property
    def correct(self) -> bool:
        return self.predicted == self.answer


def answer_index(conversation: Conversation) -> int:
    choices = conversation.meta.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(conversation.source, "'choices' must be a list of at least two strings")
    answer = conversation.meta.get("answer", conversation.reference())
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return answer
    if isinstance(answer, str) and answer in choices:
        return choices.index(answer)
    letter = answer.strip().upper() if isinstance(answer, str) else ""
    if len(letter) == 1 and "A" <= letter < chr(ord("A") + len(choices)):  # MMLU / ARC answer keys
        return ord(letter) - ord("A")
    raise DataError(conversation.source, f"answer {answer!r} is not one of the choices, their index or their letter")


def score_choices(
    model, tokenizer, conversations: Sequence[Conversation], *, batch_size: int = 8, progress: bool = True
) -> list[ChoiceResult]:
    from sftlab.data.render import RenderOptions
    from sftlab.evaluation.perplexity import render_all, sequence_logprobs

    options: list[Conversation] = []
    for conv in conversations:
        answer_index(conv)  # validate before spending compute
        prompt = conv.prompt_messages()
        options += [
            Conversation(messages=[*prompt, {"role": "assistant", "content": c}], source=conv.source)
            for c in conv.meta["choices"]
        ]
    examples = render_all(options, tokenizer, RenderOptions(train_on="last"))  # score the option only
    lls = sequence_logprobs(model, examples, batch_size=batch_size, progress=progress,
                            desc="choices")
    results, pos = [], 0
    for conv in conversations:
        choices = conv.meta["choices"]
        scores = [ll.logprob / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls[pos : pos + len(choices)], choices)]
        pos += len(choices)
        results.append(ChoiceResult(scores, max(range(len(scores)), key=scores.__getitem__), answer_index(conv)))
    return results
