"""The reasoning a reply holds before its answer, split off in the layout the model's own chat template
writes it: what evaluation scores and what the server sends as `content` is the answer alone.

The layout is read off the template as the tool-call layout is (serve/tool_calls.py): a probe answer,
with and without a probe reasoning, rendered as training renders it, its trained tokens decoded as
a reply is decoded. Qwen 3 writes `<think>\\nR\\n</think>\\n\\nA` (an empty block without reasoning),
gpt-oss `analysis` R `assistantfinal` A once its channel tokens are dropped by decoding (`final` A
without), most templates nothing: their replies are all answer. A generation prompt that ends inside a
`<think>` block (DeepSeek-R1 distills, Qwen 3.5, Nemotron 3) has the reply begin in the reasoning, with
no opener: the reasoning is what comes before `</think>`, all of the reply where it never comes. That is
read off what the template adds for the reply to each request (`reply_layout`), not the messages: after
a tool result DeepSeek's opens no block, and a user's own `<think>` is text. Special tokens that are all
that bounds the reasoning (Apertus' `<|inner_prefix|>`, a `<think>` a tokenizer has special) are kept in a
reply's text (`reasoning_markers`), so the layout reads as where they are text.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import NamedTuple

from sftlab.serve.generation import per_tokenizer, trained_ids, trained_reply

_ANSWER, _REASONING = "sftlab_probe_answer", "sftlab_probe_reasoning"
_OPEN, _CLOSE = "<think>", "</think>"  # the block every shipped template that opens one in its prompt writes


@dataclass(frozen=True)
class AnswerLayout:
    """`opener` R `closer` A with reasoning R (both '' when the template writes none); `lead` A without.
    `opened`: the generation prompt opens the reasoning, so a reply begins inside it, without the opener;
    `opening`: the generation prompts of the template that do (`reply_layout` reads a request's own)."""

    opener: str = ""
    closer: str = ""
    lead: str = ""
    opened: bool = False
    opening: tuple[str, ...] = ()

    def split(self, text: str) -> tuple[str | None, str]:
        """(the reasoning, None when there is none; the answer: the text as it is where nothing of the
        layout begins it). A reply cut off inside its reasoning has an empty answer."""
        if found := self._reasoning(text):
            start, end = found
            return text[start:end.start() if end else len(text)].strip() or None, text[end.end():].strip() if end else ""
        if self.lead.strip() and (m := template_pattern(self.lead).match(text)):
            return None, text[m.end():].strip()
        return None, text

    def settled(self, text: str, since: int = 0) -> _Settled | None:
        """For a reply still being generated: its reasoning so far and its answer so far, less a tail that
        may still become the closer; None while the text may still be the start of the template's own text.
        `since`: where the closer may begin at the earliest (`searched` of the same text, shorter)."""
        found = self._reasoning(text, since)
        if found:
            start, end = found
            if end is None:
                cut = closer_start(text, self.closer, start)
                return _Settled(text[start:cut].lstrip() or None, "", cut)
            return _Settled(text[start:end.start()].strip() or None, text[end.end():].lstrip(), end.start())
        if self.closer.strip() and self.opener.strip().startswith(text.strip()):
            return None
        if self.lead.strip():
            if self.lead.strip().startswith(text.strip()):
                return None
            if m := template_pattern(self.lead).match(text):
                return _Settled(None, text[m.end():].lstrip())
        return _Settled(None, text)

    def _reasoning(self, text: str, since: int = 0) -> tuple[int, re.Match | None] | None:
        """(where the reasoning begins, its closer or None) where the reply begins in a reasoning block (at
        its opener, or at once where the prompt opens it), else None; the closer is looked for from `since` on."""
        if not self.closer.strip():
            return None
        opened = None if self.opened else template_pattern(self.opener).match(text)
        if not (self.opened or opened):
            return None
        start = opened.end() if opened else 0
        return start, template_pattern(self.closer).search(text, max(start, since))


class _Settled(NamedTuple):
    reasoning: str | None
    answer: str
    searched: int = 0  # where the closer begins, or may begin at the earliest while the reasoning is open


class ReasoningStream:
    """A streamed reply's pieces as (reasoning, answer) deltas, each sent as it grows: text is held back only
    while it may still be the template's opener or lead, or the start of the reasoning's closer."""

    def __init__(self, layout: AnswerLayout):
        self.layout, self.text, self.reasoning, self.answer = layout, "", "", ""
        self.searched = 0  # the closer is not in the text before this (each piece is searched, not the whole text)

    def feed(self, piece: str) -> tuple[str | None, str]:
        self.text += piece
        settled = self.layout.settled(self.text, self.searched)
        if settled is None:
            return None, ""
        self.searched = settled.searched
        reasoning, answer = settled.reasoning or "", settled.answer
        if not (reasoning.startswith(self.reasoning) and answer.startswith(self.answer)):
            return None, ""
        thought, self.reasoning = reasoning[len(self.reasoning):], reasoning
        delta, self.answer = answer[len(self.answer):], answer
        return thought or None, delta


def closer_start(text: str, closer: str, start: int) -> int:
    """Where the reasoning in `text` (from `start`) ends for now: before the whitespace and the tail that
    `template_pattern(closer)` may still match once more text comes (`</th` of `</think>`)."""
    whole, tail, cut = "".join(closer.split()), "", len(text)
    for i in range(len(text) - 1, start - 1, -1):
        if not text[i].isspace():
            tail = text[i] + tail
            if len(tail) >= len(whole):
                break
            if whole.startswith(tail):
                cut = i
    return start + len(text[start:cut].rstrip())


def template_pattern(text: str) -> re.Pattern:
    """Template text, whitespace-tolerant, from the start of a reply's stripped text."""
    return re.compile(r"\s*" + r"\s*".join(re.escape(piece) for piece in text.split()))


@per_tokenizer
def answer_layout(tokenizer) -> AnswerLayout:
    """How the tokenizer's chat template writes an answer's reasoning (an empty layout where it writes
    none, or where the probe cannot be rendered), for a reply to its plain generation prompt."""
    lead = _generated(tokenizer, None)
    with_reasoning = _generated(tokenizer, _REASONING)
    lead, opening = lead.split(_ANSWER)[0] if lead and _ANSWER in lead else "", _opening_prompts(tokenizer)
    if not with_reasoning or _REASONING not in with_reasoning or _ANSWER not in with_reasoning:
        opened = bool(opening)
        return AnswerLayout(_OPEN if opened else "", _CLOSE if opened else "", lead, opened, opening)
    opener, rest = with_reasoning.split(_REASONING, 1)
    return AnswerLayout(opener if opener.strip() else _OPEN, rest.split(_ANSWER)[0], lead, not opener.strip(),
                        opening)


@per_tokenizer
def reasoning_markers(tokenizer) -> frozenset[int]:
    """The special tokens that bound an answer's reasoning, which a reply's text keeps (generation.py
    `kept_specials`) so that its layout reads as where they are text. Where the template writes special tokens
    and whitespace alone before the probe reasoning or between it and the probe answer (Apertus'
    `<|inner_prefix|>` R `<|inner_suffix|>`; `<think>` R `</think>` where a tokenizer has them special), the
    special tokens of both sides: Gemma 4's `<|channel>thought` R `<channel|>` keeps its opener's too, so an answer
    that begins with the word `thought` is not taken for reasoning. Where both sides have text besides, none
    (gpt-oss's `analysis` R `assistantfinal`, its channel tokens dropped). Where the prompt opens the block, its
    `<think>` and `</think>` (training may write no reasoning to probe: DeepSeek-R1 distills)."""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if not special:
        return frozenset()

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    markers = special.intersection(tokens(_OPEN + _CLOSE)) if _opening_prompts(tokenizer) else set()
    ids = trained_ids(tokenizer, _probe(_REASONING), "the reasoning marker probe")
    text = tokenizer.decode(ids, skip_special_tokens=False) if ids else ""
    if _REASONING in text and _ANSWER in text:
        opener, rest = text.split(_REASONING, 1)
        sides = [tokens(opener), tokens(rest.split(_ANSWER)[0])]
        if any(not tokenizer.decode(side, skip_special_tokens=True).strip() for side in sides):
            markers.update(special.intersection(sides[0] + sides[1]))
    return frozenset(markers)


def reply_layout(tokenizer, messages: list[dict], tools: list[dict] | None = None, *,
                 prompt: str | None = None) -> AnswerLayout:
    """The layout of a reply to these messages: whether it begins inside a `<think>` block is read off the
    end of their own prompt (`prompt`: its text, where the caller has rendered it already), as a template
    opens one after a user turn but not always after a tool result; a `<think>` in a message is text."""
    layout = answer_layout(tokenizer)
    if _CLOSE not in layout.closer:  # no think block in this template: a `<think>` in the prompt is text
        return layout
    if prompt is None:
        prompt = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return replace(layout, opened=prompt.endswith(layout.opening))


def opens_reasoning(prompt: str) -> bool:
    """Whether a prompt (its text) ends inside a `<think>` block: its last `<think>` after its last `</think>`."""
    return prompt.rfind(_OPEN) > prompt.rfind(_CLOSE)


def _opening_prompts(tokenizer) -> tuple[str, ...]:
    """The generation prompts (what the template writes with one past what it writes without) that end
    inside a `<think>` block, after a user turn and after a tool result: a prompt that ends with one opens
    the reply's reasoning, whatever its messages hold. Read where training writes no reasoning to probe
    too (DeepSeek-R1 distills drop it from every answer)."""
    call = {"id": "a1b2c3d4e", "type": "function", "function": {"name": "probe", "arguments": {}}}
    asked = [{"role": "user", "content": "Hi."}]
    found = []
    for messages in (asked, [*asked, {"role": "assistant", "content": "", "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": call["id"], "content": "ok"}]):
        try:
            whole, bare = (tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
                           for generation in (True, False))
        except Exception:  # no template, jinja errors, raise_exception() in the template: no prompt to read
            continue
        found.append(whole[len(os.path.commonprefix([whole, bare])):])
    return tuple(prompt for prompt in dict.fromkeys(found) if opens_reasoning(prompt))


def _generated(tokenizer, reasoning: str | None) -> str | None:
    """What training teaches a model to write for the probe answer (with the probe reasoning); None
    where the template cannot render it (no template, or one that writes no reasoning)."""
    return trained_reply(tokenizer, _probe(reasoning), "the answer probe")


def _probe(reasoning: str | None) -> list[dict]:
    """A question and the probe answer (with the probe reasoning)."""
    answer = {"role": "assistant", "content": _ANSWER} | ({"reasoning_content": reasoning} if reasoning else {})
    return [{"role": "user", "content": "Hi."}, answer]
