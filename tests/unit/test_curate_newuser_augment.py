"""augment's `system` strategy keeps the answers true: a conversation's own system prompt stays."""

from __future__ import annotations

from sftlab.data.augment import SYSTEM_PROMPTS, AugmentOptions, augment
from sftlab.data.conversation import Conversation


def chat(user: str, answer: str, source: str, system: str | None = None) -> Conversation:
    messages = [{"role": "system", "content": system}] if system else []
    return Conversation(messages=[*messages, {"role": "user", "content": user},
                                  {"role": "assistant", "content": answer}], source=source)


def test_a_system_prompt_the_answer_follows_is_not_replaced():
    """Before: 'Answer in French.' was replaced by 4 generic prompts, each variant still answering in French."""
    own = chat("Good morning", "Bonjour", "own", system="Answer in French.")
    none = chat("What is the capital of Peru?", "Lima.", "none")
    generic = chat("Name a prime number.", "7", "generic", system=SYSTEM_PROMPTS[0])
    new, report = augment([own, none, generic], AugmentOptions(strategies=["system"], copies=10))
    assert {c.meta["augmented_from"] for c in new} == {"none", "generic"}
    assert sum(c.meta["augmented_from"] == "none" for c in new) == len(SYSTEM_PROMPTS)
    assert all(c.messages[0]["content"] in SYSTEM_PROMPTS and c.messages[-1]["content"] in ("Lima.", "7") for c in new)
