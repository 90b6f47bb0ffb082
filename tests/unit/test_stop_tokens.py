"""Serving stops a reply where training taught the model to end a turn (serve/generation.py `end_of_turn_ids`,
read from data/render.py's trained spans): after a last answer, after an answer a question follows, after a
turn that calls a tool; never on a token training also teaches inside a turn."""

from __future__ import annotations

import copy

from sftlab.serve.generation import stop_token_ids
from conftest import tokenizer_for


def stops(tok) -> list[str]:
    return tok.convert_ids_to_tokens(stop_token_ids(tok))


# in the manner of GigaChat 3.5: the conversation's last answer ends with EOS, any other message with a marker
LAST_ENDS_OTHERWISE = (
    "{%- for m in messages -%}<|role_sep|>{{ m.role }}: {{ m.content }}"
    "{{ eos_token if loop.last and m.role == 'assistant' else '<|message_sep|>' }}{%- endfor -%}"
    "{%- if add_generation_prompt %}<|role_sep|>assistant: {% endif -%}")


def test_a_reply_stops_on_the_marker_that_ends_an_answer_a_question_follows(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|role_sep|>", "<|message_sep|>"]})
    tok.chat_template = LAST_ENDS_OTHERWISE
    assert stops(tok) == [tok.eos_token, "<|message_sep|>"]


def test_a_reply_stops_after_a_call_and_after_an_answer_but_not_after_a_reasoning(tokenizer):
    # gpt-oss ends its reasoning with <|end|>, as it ends an earlier answer: a reasoning reply would stop before its answer
    assert stops(tokenizer_for(tokenizer, "gptoss.jinja")) == ["<|return|>", "<|call|>", tokenizer.eos_token]
    # GLM writes no end-of-turn token: an answer ends where the model writes the next turn's <|user|> (its
    # generation config's stop tokens are these), a call turn at <|observation|>
    assert stops(tokenizer_for(tokenizer, "glm4moe.jinja")) == [tokenizer.eos_token, "<|user|>", "<|observation|>"]
