"""render(conversation, tokenizer) -> Example: the one place that decides which tokens are trained.

Works with any chat template, including the many without `{% generation %}` tags: the
whole conversation is rendered once, and once more with each trained assistant content
replaced by a placeholder; that second rendering is the template's own text around the
answers, so each answer is located exactly where the template wrote it (never searched
for: a short answer that also occurs in the markup cannot be found there by mistake).
For each trained turn the conversation up to it is also rendered with the generation
prompt, which should be a text prefix of the whole (what inference sees); templates that
are not prefix-stable (some move the system prompt to the last user turn) get a warning
naming the template. The trained span is the assistant content plus the end-of-turn token
the template writes after it (e.g. `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`; both of
Cohere 2's `<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`, which end its answers in a row);
when a template writes none, the tokenizer's EOS is appended so the model learns to stop.
Char spans are mapped to tokens with the fast tokenizer's offsets, so the ids are exactly
the template's, but where a pre-tokenizer splits a generation prompt's last characters otherwise
once an answer follows (GPT-2's byte-level regex: `<|end_header_id|>\n\n` + answer gives '\n', '\n'):
there the prompt ends with the tokens inference sends, the prompt tokenized alone (`_prompt_as_sent`).
A turn that calls tools is written by the template in its own syntax, so it is
located otherwise (see `_call_span`): the conversation is rendered with its `tools`, and the
turn is trained from the end of the generation prompt through the token that ends it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Literal, NamedTuple

import numpy as np

from sftlab.data.conversation import Conversation, Example
from sftlab.data.tools import REASONING_PROBE, as_template_takes
from sftlab.errors import DataError, SftlabError

IGNORE = -100
CHUNK = 2048  # conversations per tokenizer batch (see iter_rendered)


@dataclass(frozen=True)
class RenderOptions:
    train_on: Literal["all", "last"] = "all"  # which assistant turns are trained
    max_seq_length: int | None = None
    truncation: Literal["drop", "truncate"] = "drop"  # policy for over-long examples
    split_text: bool = False  # raw text is returned whole, to be split into blocks (train/dataset.py)


class TooLong(DataError):
    """Raised for an over-long example under the `drop` policy (counted by the caller)."""


class TemplateFailed(SftlabError):
    """The chat template raised while rendering one conversation (its `raise_exception()`, a
    missing key): the caller names the record, and in skip mode rejects only that one."""


TEMPLATE_ORIGIN = "_sftlab_template_origin"  # set on a tokenizer whose template was given (models.use_chat_template)


def template_name(tokenizer) -> str:
    """The given template's name or file, else the tokenizer's (its template's origin)."""
    return getattr(tokenizer, TEMPLATE_ORIGIN, "") or getattr(tokenizer, "name_or_path", "") or tokenizer.__class__.__name__


def _template_error(name: str, e: Exception) -> SftlabError:
    """A syntax error breaks every conversation (one plain error naming the template line); anything
    else, this one conversation."""
    from jinja2 import TemplateSyntaxError

    if isinstance(e, TemplateSyntaxError):
        return SftlabError(f"chat template of '{name}' does not parse: {e.message} (template line {e.lineno})")
    return TemplateFailed(f"chat template of '{name}' failed: {e}")


def _apply(tokenizer, messages, *, add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(as_template_takes(tokenizer, messages), tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors, raise_exception() in templates
        raise _template_error(template_name(tokenizer), e) from e


def _end_markers(tokenizer) -> list[str]:
    """What may end a turn: EOS and the tokenizer's special tokens, longest first."""
    marks = {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
    marks |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    if tokenizer.eos_token:
        marks.add(tokenizer.eos_token)
    return sorted(marks, key=len, reverse=True)


def _end_marker_pattern(markers: list[str]) -> re.Pattern:
    """Matches an end-of-turn marker (after optional whitespace: any that `str.strip` takes off an
    answer, e.g. a trailing "\\r", "\\x1f" or no-break space, as `\\s` matches)."""
    alternatives = "|".join(re.escape(m) for m in markers)
    return re.compile(rf"\s*(?:{alternatives or '(?!)'})")


_PROBE = "\ue000sftlab-probe\ue001"  # an answer no template writes itself (private-use characters)


def _after_answer(tokenizer, *, then: tuple[dict, ...] = ()) -> str:
    """What the chat template writes after an answer to a first question, with the messages THEN after it."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}, *then]
    return _apply(tokenizer, messages, add_generation_prompt=False).partition(_PROBE)[2]


def answer_ending(tokenizer) -> tuple[str, ...]:
    """The markers the chat template writes in a row right after an answer that ends the conversation: one
    in most templates (`<|im_end|>`), two in Cohere 2's (`<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`, the second
    its EOS, the token inference stops on): the model emits them all, so all are trained (`_turn_end`), and a
    reply stops on the last (serve/generation.py `end_of_turn_ids`; this reading where training refuses the
    template). Text glued between them (no whitespace) is part of the row: Kimi K3 closes an answer with
    `<|close|>response<|sep|><|close|>message<|sep|><|end_of_msg|>`, each piece one item here (its first
    `<|close|>` also closes the reasoning)."""
    try:
        after = _after_answer(tokenizer)
    except TemplateFailed:
        return ()
    return _ending_in(after, _end_markers(tokenizer))


def _ending_in(after: str, markers: list[str]) -> tuple[str, ...]:
    """`answer_ending` read off AFTER, the text the template writes after an answer."""
    first = _end_marker_pattern(markers).match(after)
    if first is None:
        return ()
    ending, pos = [first.group().lstrip()], first.end()
    glued = re.compile(rf"\S*?(?:{'|'.join(map(re.escape, markers))})")
    while nxt := glued.match(after, pos):
        ending.append(nxt.group())
        pos = nxt.end()
    return tuple(ending)


def _check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise SftlabError(f"'{template_name(tokenizer)}' has no fast tokenizer: rendering needs token offsets")
    if not getattr(tokenizer, "chat_template", None):
        from sftlab.models import NAMED_TEMPLATES

        raise SftlabError(
            f"'{template_name(tokenizer)}' has no chat template: set model.chat_template to one of "
            f"{', '.join(NAMED_TEMPLATES)} or a .jinja file (--chat-template on the data commands), "
            "or train on raw text"
        )


def render(conversation: Conversation, tokenizer, options: RenderOptions = RenderOptions()) -> Example:
    """Tokenize a conversation with its chat template; labels are -100 outside trained spans."""
    result = render_many([conversation], tokenizer, options)[0]
    if isinstance(result, DataError):
        raise result
    return result


def render_many(
    conversations: list[Conversation], tokenizer, options: RenderOptions = RenderOptions()
) -> list[Example | DataError]:
    """Render many conversations, tokenizing them in batches (see `iter_rendered`).

    Returns one item per conversation: its Example, or the DataError (e.g. TooLong) that
    rejected it, so the caller can count and report rejects without losing order.
    """
    return [item for _, item in iter_rendered(conversations, tokenizer, options)]


def iter_rendered(
    conversations: Iterable[Conversation], tokenizer, options: RenderOptions = RenderOptions()
) -> Iterator[tuple[Conversation, Example | DataError]]:
    """Each conversation with its Example or the DataError that rejected it, in order.

    Conversations are taken CHUNK at a time and the work is pipelined: the fast tokenizer
    releases the GIL, so while a worker thread tokenizes one chunk (Rust), the next chunk is
    read (when `conversations` streams from a file) and its chat templates are rendered (Python).
    """
    template = backend = tails = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        previous = None
        for chunk in _chunks(conversations, CHUNK):
            if template is None and (chat := next((c for c in chunk if c.is_chat), None)):
                template, backend = _Template(tokenizer, chat.messages), _backend(tokenizer)
                tails = _Tails(backend)
            plans = [_plan_or_error(conv, tokenizer, template, options) for conv in chunk]
            texts = [p.text for p in plans if isinstance(p, _Plan)]
            job = (chunk, plans, pool.submit(backend.encode_batch, texts, add_special_tokens=False) if texts else None)
            if previous:
                yield from _finish(*previous, tokenizer, options, tails)
            previous = job
        if previous:
            yield from _finish(*previous, tokenizer, options, tails)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class _Plan(NamedTuple):
    """A conversation rendered to text, with the char spans to train."""

    text: str
    spans: list[tuple[int, int]]  # [start, end) of each trained turn, end-of-turn marker included
    open_ends: list[bool]  # per span: the template wrote no end-of-turn marker, so an EOS is inserted
    prompt_ends: list[int | None]  # per span: where its generation prompt ends in `text` (None: not a prefix)


def _plan_or_error(conv: Conversation, tokenizer, template: _Template | None, options: RenderOptions):
    try:
        if conv.is_raw_text:
            return _render_text(conv, tokenizer, options)
        if conv.is_segments:
            return _render_segments(conv, tokenizer, options)
        return _plan(conv, template, options)
    except DataError as e:
        return e
    except TemplateFailed as e:
        from sftlab.data.formats import RecordError

        return RecordError(conv.source, "chat template error", str(e))


def _finish(chunk, plans, encodings, tokenizer, options: RenderOptions, tails: _Tails | None
            ) -> Iterator[tuple[Conversation, Example | DataError]]:
    """Label a chunk once its tokenization is done (`tails`: None only where the chunk holds no chat)."""
    encoded = iter(encodings.result() if encodings else ())
    for conv, plan in zip(chunk, plans):
        if not isinstance(plan, _Plan):  # already an Example (raw text) or a DataError
            yield conv, plan
            continue
        try:
            item = _fit(_label(conv, tokenizer, plan, next(encoded), tails), options)
        except DataError as e:
            item = e
        yield conv, item


def _backend(tokenizer):
    """The fast tokenizer's Rust side, set up as `tokenizer(texts, add_special_tokens=False)` sets it
    up (no truncation, no padding, the tokenizer's `split_special_tokens`).

    Calling it directly skips transformers' conversion of every token's id, offsets and masks into
    Python lists, which costs about a third of the tokenization itself.
    """
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = tokenizer.split_special_tokens
    return backend


class _Template:
    """The tokenizer's chat template, rendered as `apply_chat_template(..., tokenize=False)` renders it.

    For messages that are plain `{role, content}` strings (what every loader produces),
    apply_chat_template's per-call work (deep copies that turn message objects into plain
    dicts, template lookup) takes longer than the template itself; such messages are passed
    straight to the compiled (sandboxed) template with the variables apply_chat_template
    passes: the special tokens, no tools, no documents. That shortcut is checked once against
    apply_chat_template on a sample conversation; other messages, or a transformers version
    where the two differ, go through apply_chat_template.
    """

    def __init__(self, tokenizer, sample: list[dict[str, str]]):
        _check_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.name = template_name(tokenizer)
        self.markers = _end_markers(tokenizer)
        self.added: dict[str, list[str]] = {}  # the tokenizer's added tokens by their first character
        for token in {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.content}:
            self.added.setdefault(token[0], []).append(token)
        self.longest_added = max((len(t) for tokens in self.added.values() for t in tokens), default=0)
        self.end_marker = _end_marker_pattern(self.markers)
        self.writes_tools: bool | None = None  # whether the template writes a `tools` list (checked once)
        self.writes_reasoning: bool | None = None  # whether it writes an answer's reasoning (checked once)
        try:
            after = _after_answer(tokenizer)
        except TemplateFailed:
            after = None
        self._warn_if_marker_is_text(after)
        self.ending = () if after is None else _ending_in(after, self.markers)
        self._refuse_a_prompt_after_every_conversation()
        self._compiled = self._compile()
        if self._compiled is not None and _plain(sample) and not self._same_as_slow(sample):
            self._compiled = None

    def _warn_if_marker_is_text(self, text: str | None) -> None:
        """A template from another model family ends an answer (TEXT follows it; None where the template
        failed) with a marker this tokenizer does not have as a token (`<|eot_id|>` on a ChatML tokenizer):
        it is split into plain pieces, the answer gets no end-of-turn token the model can learn to stop on,
        and an EOS lands inside the marker."""
        if text is None:
            return
        # <|eot_id|>, <end_of_turn>, [/INST], EXAONE's [|endofturn|], DeepSeek's full-width <｜end▁of▁sentence｜>
        after = re.match(r"\s*(<[|｜]?[A-Za-z_][\w.▁-]*[|｜]?>|\[/?[A-Z_]+\]|\[\|\w+\|\])", text)
        if after and after.group(1) not in self.markers and after.group(1) not in self.tokenizer.get_vocab():
            import warnings

            warnings.warn(f"the chat template of '{self.name}' ends an answer with '{after.group(1)}', which is not a "
                          "token of this tokenizer: the model cannot learn to stop on it (a template from another "
                          "model family? give the template of this model, or a named one, which adds its tokens)",
                          stacklevel=2)

    def _refuse_a_prompt_after_every_conversation(self) -> None:
        """Refuse a template that writes its generation prompt after every conversation, asked for or not (Command
        R7B's tool-use template ends each with `<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>`, GLM-Edge's with
        `<|assistant|>`): after a last answer that header follows (in a row with the end-of-turn tokens, where the
        template writes any), as the next turn's header does after an earlier answer, so no text says where a turn
        ends (the header was trained, and a tool-call turn through the tool's result). A template that ends every
        conversation with its EOS instead is fine: its EOS opens no answer."""
        if not self.ending:
            return
        hi = [{"role": "user", "content": "Hi"}]
        try:
            if self.slow(hi, add_generation_prompt=False) != self.slow(hi, add_generation_prompt=True):
                return
            after = _after_answer(self.tokenizer, then=({"role": "user", "content": "Again"},))
            answered = self.slow([*hi, {"role": "assistant", "content": _PROBE}], add_generation_prompt=False)
        except TemplateFailed:
            return
        header = answered.partition(_PROBE)[0].rpartition("Hi")[2]  # what the template writes to open an answer
        if not after.lstrip().startswith("".join(self.ending)) and self.ending[-1] in header:
            raise SftlabError(f"the chat template of '{self.name}' writes its generation prompt after every "
                              f"conversation, asked for or not (a last answer ends {''.join(self.ending)!r}, an "
                              "earlier one otherwise), so where an assistant turn ends cannot be told: give a template "
                              "that writes it only when asked (add_generation_prompt), not an inference-only one")

    def _same_as_slow(self, sample: list[dict[str, str]]) -> bool:
        try:
            return self._direct(sample, add_generation_prompt=False) == self.slow(sample, add_generation_prompt=False)
        except TemplateFailed:  # the template refuses this sample: the shortcut stays unchecked, so unused
            return False

    def _compile(self):
        """The template compiled in transformers' sandboxed environment, with its globals as a
        plain dict: jinja copies a template's ChainMap of globals on every render, which takes
        longer than rendering a short conversation."""
        from jinja2 import TemplateError

        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            source = self.tokenizer.get_chat_template()
            template = _compile_jinja_template(source).environment.from_string(source)
        except (ImportError, AttributeError, ValueError, TemplateError):  # the slow path works, or says why not
            return None
        template.globals = dict(template.globals)
        return partial(template.render, tools=None, documents=None, **self.tokenizer.special_tokens_map)

    def renderer(self, conversation: Conversation) -> Callable[..., str]:
        """The function that renders the conversation's messages and their prefixes (with its tools)."""
        if any("reasoning_content" in m for m in conversation.messages):
            self._check_writes_reasoning()
        if conversation.tools:
            self._check_writes_tools(conversation)
            return partial(self.slow, tools=conversation.tools)
        return self._direct if self._compiled is not None and _plain(conversation.messages) else self.slow

    def _check_writes_tools(self, conversation: Conversation) -> None:
        """A template that ignores `tools` (most without tool support) would train calls the prompt never offers."""
        if self.writes_tools is None:
            self.writes_tools = template_writes_tools(self.tokenizer, conversation.messages, conversation.tools)
        if not self.writes_tools:
            raise SftlabError(f"the chat template of '{self.name}' does not write the 'tools' list of the functions "
                              f"a conversation may call: {_TOOL_TEMPLATE}")

    def _check_writes_reasoning(self) -> None:
        """A template that ignores an answer's reasoning would train the answers without it. (apply_chat_template
        passes `reasoning_content` as `thinking` too, the name gpt-oss's template reads.)"""
        if self.writes_reasoning is None:
            try:
                self.writes_reasoning = REASONING_PROBE in self.slow(
                    [{"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello.", "reasoning_content": REASONING_PROBE}],
                    add_generation_prompt=False)
            except TemplateFailed:
                self.writes_reasoning = False
        if not self.writes_reasoning:
            raise SftlabError(f"the chat template of '{self.name}' does not write the reasoning of an answer "
                              "(reasoning_content / reasoning / thinking in the data), so it would not "
                              "be trained: set model.chat_template to a template that writes it (the model family's own, "
                              "e.g. Qwen 3's or gpt-oss's), or put the reasoning into the content yourself")

    def _direct(self, messages, *, add_generation_prompt: bool) -> str:
        try:
            return self._compiled(messages=messages, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja errors, raise_exception() in templates
            raise _template_error(self.name, e) from e

    def slow(self, messages, *, add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        return _apply(self.tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=tools)


def template_writes_tools(tokenizer, messages: list[dict], tools: list[dict]) -> bool:
    """Whether the tokenizer's chat template writes a `tools` list into these messages' prompt."""
    return _apply(tokenizer, messages, add_generation_prompt=False, tools=tools) != \
        _apply(tokenizer, messages, add_generation_prompt=False)


_TOOL_TEMPLATE = ("set model.chat_template (--chat-template on the data, eval and compare commands) to a template "
                  "with tool support, e.g. chatml, or the model family's own")


def _plain(messages: list) -> bool:
    return all(type(m) is dict and len(m) == 2 and type(m.get("role")) is str and type(m.get("content")) is str
               for m in messages)


def _plan(conversation: Conversation, template: _Template, options: RenderOptions) -> _Plan:
    """Render the text once and find the trained char spans (and turns lacking an end marker)."""
    messages = conversation.messages
    render = template.renderer(conversation)
    full = render(messages, add_generation_prompt=False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(conversation.source, "no assistant turn to train on")
    turns = [i for i in turns if messages[i].get("weight", 1)]  # OpenAI's weight 0: context, not trained
    if not turns:
        raise DataError(conversation.source, "every assistant turn has weight 0: nothing to train on")
    if options.train_on == "last":
        turns = turns[-1:]
    # The conversation up to each trained turn with the generation prompt (what inference sees) should
    # be a prefix of the whole. Some templates are not (e.g. those that move the system prompt to the
    # last user turn): earlier turns are then trained in another context.
    prompts = {i: render(messages[:i], add_generation_prompt=True) for i in turns}
    prompt_ends = {i: len(p) if full.startswith(p) else None for i, p in prompts.items()}  # None: not a prefix
    if unstable := [i for i in turns if prompt_ends[i] is None]:
        _warn_unstable(template.name, prompts[unstable[-1]], full, last=unstable[-1] == turns[-1])
    spans: dict[int, tuple[int, int]] = {}
    open_ends: dict[int, bool] = {}
    answers = [i for i in turns if "tool_calls" not in messages[i]]
    for i, start in zip(answers, _answer_starts(conversation, template.name, render, answers, full) if answers else ()):
        end = start + len(messages[i]["content"].strip())
        prompt_end = prompt_ends[i] if prompt_ends[i] is not None else _aligned_prompt_end(render, messages, i,
                                                                                           prompts[i], full)
        if prompt_end is not None and prompt_end <= start:
            # what the template writes between the generation prompt and the answer is generated too: the
            # answer's reasoning (Qwen 3's <think> block, gpt-oss's analysis channel), a header the prompt
            # leaves open (gpt-oss's <|channel|>final<|message|>), whitespace (Mistral's "[/INST] " + answer:
            # a space that is a token of its own before "2019")
            start = prompt_end
        marker = template.end_marker.match(full, end)
        open_ends[i] = marker is None
        spans[i] = (start, _turn_end(full, marker, template.ending) if marker else end)
    for i in turns:
        if i not in spans:
            spans[i], open_ends[i] = _call_span(conversation, template, render, i, prompts[i], full)
    return _Plan(full, [spans[i] for i in turns], [open_ends[i] for i in turns], [prompt_ends[i] for i in turns])


def _aligned_prompt_end(render, messages: list[dict], i: int, prompt: str, full: str) -> int | None:
    """Where turn I's generation prompt ends in `full` when the prompt is not a prefix of it because the template
    writes the turns before otherwise with a prompt (a default system message only when one is asked for): the
    turns before as the conversation has them, then the prompt's own last characters (its header, `<|start|>
    assistant`); None where the two do not line up so. What follows is the turn's, as in a prefix-stable template:
    the answer's reasoning and its header are trained, not only its content."""
    before = render(messages[:i], add_generation_prompt=False)
    if not full.startswith(before):
        return None
    tail = full[len(before):len(before) + min(len(prompt), 256)]
    k = next((k for k in range(len(tail), 0, -1) if prompt.endswith(tail[:k])), 0)
    return len(before) + k if tail[:k].strip() else None


def _turn_end(full: str, marker: re.Match, ending: tuple[str, ...]) -> int:
    """Where an answer's trained span ends: after its end-of-turn marker and, where the template ends an
    answer with several markers in a row (`ending`), after those of them that follow it in `full`: an earlier
    turn's marker is followed by the next turn's header instead (Llama 3's `<|eot_id|><|start_header_id|>`)."""
    pos = marker.end()
    if ending and marker.group().lstrip() == ending[0]:
        for m in ending[1:]:
            if not full.startswith(m, pos):
                break
            pos += len(m)
    return pos


def _call_span(conversation: Conversation, template: _Template, render, i: int, prompt: str, full: str
               ) -> tuple[tuple[int, int], bool]:
    """A turn that calls tools: everything the model generates for it, from the end of the generation
    prompt through the end-of-turn token the template writes after such a turn (`<|im_end|>`,
    `<|eot_id|>`, gpt-oss's `<|call|>`, Gemma 4's `<|tool_response>`, GLM's `<|observation|>`, ...),
    and whether that token is missing (an EOS is then added, as after an answer).

    Its text is not located through a placeholder, as an answer is: templates write the calls in
    their own syntax (JSON in tags, Python-style calls) and some drop the content beside them. The
    turn is what the template writes for it as the last message; where a template ends the last
    message with a marker of its own (GigaChat 3.5's EOS, `<|message_sep|>` after any other), the turn
    ends at the marker written after it in the conversation; where it writes the last turn otherwise
    (an empty think block), at the first of the end-of-turn tokens it ends with there, never past the
    next message's text. Where the generation prompt differs from the turn's own header (a thinking
    template's open `<think>`), the turn starts where the two part."""
    messages, name = conversation.messages, template.name
    before = render(messages[:i], add_generation_prompt=False)
    start = len(os.path.commonprefix([prompt, full]))
    if not full.startswith(before) or start < len(before):
        raise _unlocatable(conversation, name, f"renders the turns before tool-call turn {i} differently once "
                                               "it follows")
    start = max(len(before), _before_token(start, (prompt, full), template))
    alone = _own_end(render(messages[: i + 1], add_generation_prompt=False).rstrip(), template)
    closing = next((m for m in template.markers if alone.endswith(m)), None)
    if alone.startswith(before) and full.startswith(alone[len(before):], len(before)):
        end = len(alone)
        marker = None if closing else template.end_marker.match(full, end)
        span, open_end = (start, marker.end() if marker else end), not closing and marker is None
    elif closing and alone.startswith(before) and full.startswith(
            body := alone[len(before):len(alone) - len(closing)].rstrip(), len(before)) and (
            marker := template.end_marker.match(full, len(before) + len(body))):
        # the template ends the conversation's last message with a token of its own (GigaChat 3.5: its EOS, any
        # other message `<|message_sep|>`): followed, the turn ends at the marker the template writes there
        span, open_end = (start, marker.end()), False
    elif closing and (end := full.find(closing, start)) >= 0:
        span, open_end = (start, end + len(closing)), False
        if _runs_into_next(full[start:end], alone[len(before):], messages[i + 1:i + 2]):
            raise _unlocatable(conversation, name, f"ends tool-call turn {i} otherwise once a message follows it")
    else:
        raise _unlocatable(conversation, name, f"writes tool-call turn {i} otherwise as the last message")
    written = full[span[0]:span[1]]
    calls = Counter(c["function"]["name"] for c in messages[i]["tool_calls"])
    ids = [c["id"] for c in messages[i]["tool_calls"] if c.get("id")]
    if not any(f in written for f in calls) and ids and all(c in written for c in ids):
        raise DataError(conversation.source, f"the chat template of '{name}' writes each call's id where the function "
                                             f"name belongs (turn {i}: {', '.join(ids)}): give the calls ids in the "
                                             "form the model family expects (Kimi K2: functions.NAME:0)")
    if not any(f in written for f in calls):
        raise SftlabError(f"the chat template of '{name}' does not write assistant tool calls ({conversation.source}: "
                          f"turn {i} calls {', '.join(calls)}): {_TOOL_TEMPLATE}")
    if any(written.count(f) < n for f, n in calls.items()):  # e.g. gpt-oss writes only a turn's first call
        raise DataError(conversation.source, f"the chat template of '{name}' writes only some of the "
                                             f"{calls.total()} calls of turn {i}, so the turn cannot be trained "
                                             "as the data has it")
    if messages[i]["content"].strip() not in written:
        raise _unlocatable(conversation, name, f"drops the text of tool-call turn {i}")
    return span, open_end


def _runs_into_next(found: str, own: str, following: list[dict]) -> bool:
    """Whether a call turn found up to its closing marker holds the next message's text more often than the turn
    itself does as the last message: the marker found is a later message's (a tool's result was trained)."""
    nxt = next((m["content"].strip() for m in following if isinstance(m.get("content"), str)), "")
    return bool(nxt) and found.count(nxt) > own.count(nxt)


def _before_token(pos: int, texts: tuple[str, ...], template: _Template) -> int:
    """`pos`, or the start of an added token that straddles it in one of `texts`: where a generation prompt's
    `<think>` and a call's `<TOOLCALL>` part after their common '<', the call starts at that '<' (the prompt's
    token is whole, none of its characters is the call's context). Added tokens are looked up by their first
    character: a tokenizer with thousands of them costs a few comparisons per character before `pos`."""
    for j in range(max(0, pos - template.longest_added + 1), pos):
        if any(j + len(t) > pos and text.startswith(t, j) for text in texts if j < len(text)
               for t in template.added.get(text[j], ())):
            return j
    return pos


def _own_end(alone: str, template: _Template) -> str:
    """A turn's text as the last message, without the marker the template writes after whitespace past the row that
    ends its answers (Apriel 1.5's `\\n<|end|>\\n` + EOS): as after an answer, what follows the whitespace is not
    the turn's (the model stops on the row's token)."""
    row = "".join(template.ending)
    head, sep, tail = alone.rpartition(row) if row else ("", "", "")
    return head + sep if sep and tail[:1].isspace() and tail.strip() in template.markers else alone


_HOLE = "\ue000sftlab-answer-{}\ue001"  # private-use characters: in no answer, no template
_HOLES = re.compile("\ue000sftlab-answer-([0-9]+)\ue001")


def _answer_starts(conversation: Conversation, name: str, render, turns: list[int], full: str) -> list[int]:
    """Where each trained turn's (stripped) content begins in `full`, anchored, never searched for.

    The conversation is rendered again with those contents replaced by placeholders: that rendering
    is the template's own text around the answers. Walking it along `full` puts each answer exactly
    where the template wrote it, so a short answer ("T", "[", "Yes") that also occurs in the template's
    markup cannot be located there. The only slack allowed is the answer's own surrounding whitespace,
    which templates may trim.
    """
    messages = conversation.messages
    holed = list(messages)
    for k, i in enumerate(turns):
        holed[i] = {**messages[i], "content": _HOLE.format(k)}
    pieces = _HOLES.split(render(holed, add_generation_prompt=False))  # text, "0", text, "1", ..., text
    found = pieces[1::2]
    if found != [str(k) for k in range(len(turns))]:  # a content dropped, repeated or rewritten
        missing = next((k for k, hole in enumerate(found) if hole != str(k)), len(found))
        raise _unlocatable(conversation, name, _VERBATIM.format(turns[min(missing, len(turns) - 1)]))
    starts, pos, trail = [], 0, ""
    for k, i in enumerate(turns):
        pos = _after_kept(full, pos, [trail[:j] for j in range(len(trail), -1, -1)], pieces[2 * k])
        if pos is None:
            raise _unlocatable(conversation, name, _CHANGES.format(i))
        pos += len(pieces[2 * k])
        content = messages[i]["content"]
        core = content.strip()
        lead = content[: len(content) - len(content.lstrip())]
        pos = _after_kept(full, pos, [lead[j:] for j in range(len(lead) + 1)], core)
        if pos is None:
            raise _unlocatable(conversation, name, _VERBATIM.format(i))
        starts.append(pos)
        pos += len(core)
        trail = content[len(content.rstrip()):]
    end = _after_kept(full, pos, [trail[:j] for j in range(len(trail), -1, -1)], pieces[-1])
    if end is None or end + len(pieces[-1]) != len(full):
        raise _unlocatable(conversation, name, _CHANGES.format(turns[-1]))
    return starts


def _after_kept(full: str, pos: int, kept: list[str], then: str) -> int | None:
    """Position after whichever part of the answer's own whitespace the template kept (`kept`, most
    first), such that `then` follows it in `full`; None when none does."""
    return next((pos + len(w) for w in kept if full.startswith(w + then, pos)), None)


_VERBATIM = "does not render assistant turn {}'s content verbatim"
_CHANGES = "writes other text around assistant turn {} depending on its content"


def _unlocatable(conversation: Conversation, name: str, problem: str) -> DataError:
    return DataError(conversation.source, f"the chat template of '{name}' {problem}, so its tokens cannot be located")


_warned: set[str] = set()


def _warn_unstable(name: str, prompt: str, full: str, last: bool) -> None:
    """A generation prompt is not a prefix of the conversation: say where the two part. Where the last
    trained turn's own prompt differs (DeepSeek-R1's and Nemotron's templates prompt with "<think>\\n" but
    write the answer without it), every answer is trained after text inference does not give, not only
    earlier ones."""
    if name not in _warned:
        _warned.add(name)
        import warnings

        k = len(os.path.commonprefix([prompt, full]))
        scope = ("the answers, the last one included, are" if last else "earlier assistant turns are")
        warnings.warn(
            f"the chat template of '{name}' is not prefix-stable (the generation prompt has "
            f"{prompt[k:k + 40]!r} where the conversation has {full[k:k + 40]!r}): {scope} trained in a context "
            "that inference does not show",
            stacklevel=2,
        )


def _warn_prompt_joins_answer(name: str, text: str, chars: tuple[int, int], prompt_end: int) -> None:
    """The generation prompt ends inside a token of the rendered conversation: the tokenizer joins its
    last characters with the answer's first (GPT-2-style tokenizers join a trailing space with the next
    word: "Assistant: " + "Hello" -> " Hello"). At inference the prompt is tokenized alone and ends with
    tokens of its own ("Ġ"), which no trained answer follows: the model is trained in one context and
    asked to answer in another, without an error."""
    key = f"{name}\0prompt-joins-answer"
    if key in _warned:
        return
    _warned.add(key)
    import warnings

    warnings.warn(f"the chat template of '{name}' ends its generation prompt with text the tokenizer joins with the "
                  f"answer's first characters ({text[chars[0]:prompt_end]!r} + {text[prompt_end:chars[1]]!r} are one "
                  f"token, {text[chars[0]:chars[1]]!r}): at inference the prompt is tokenized alone and ends with "
                  "tokens no trained answer follows; a template whose generation prompt does not end in whitespace "
                  "(write the space before each answer instead) avoids it", stacklevel=2)


class _Tails:
    """The tokens of a generation prompt's tail tokenized alone, as inference tokenizes the prompt.

    Added tokens (`<|end_header_id|>`, `<|im_start|>`) are split out of the text before it is
    pre-tokenized, so what lies between two of them is tokenized independently: a prompt tokenized
    alone has the tokens of the whole text up to its last added token, and differs at most after
    it. The tail from that token to the prompt's end is tokenized alone (starting it with the added
    token keeps a Metaspace `prepend_scheme="first"` from giving its text a prefix space), with the
    backend and settings of the whole text, and cached by its text (the tails of a template repeat).
    """

    LIMIT = 4096  # tails kept (a template whose tails hold the user's text would make each one new)

    def __init__(self, backend):
        self.encode = backend.encode
        split = backend.encode_special_tokens  # special tokens then are plain text, no boundary
        self.bounds = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if not (split and t.special))
        self.cache: dict[str, list[int]] = {}

    def ids(self, tail: str, keep: bool = True) -> list[int]:
        ids = self.cache.get(tail)
        if ids is None:
            ids = self.encode(tail, add_special_tokens=False).ids
            if keep:
                if len(self.cache) >= self.LIMIT:
                    self.cache.clear()
                self.cache[tail] = ids
        return ids


def _prompt_as_sent(plan: _Plan, encoding, ids: list[int], ranges: list[tuple[int, int]], tails: _Tails,
                    name: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Make the ids before each answer end as its generation prompt tokenized alone ends.

    The whole conversation is tokenized in one pass, and a pre-tokenizer may split the prompt's last
    characters otherwise when the answer follows them (GPT-2's `\\s+(?!\\S)`: `<|end_header_id|>\\n\\n`
    + "Paris" gives '\\n', '\\n', 'Paris', the prompt alone ends with the one token '\\n\\n'). Inference
    sends the prompt tokenized alone, so for each answer that starts at its prompt's end and at a token
    boundary, the in-context tokens after the prompt's last added token are replaced by the tail's own
    tokens where the two differ (they stay untrained); the answer's tokens are kept as in context.
    Where the answer's first token also holds the prompt's last characters (Qwen 3.5's "<think>\\n" +
    "\\n</think>" as '\\n\\n'; GPT-2's "Assistant: " + "Hello" as ' Hello'), the prompt alone ends with
    tokens no answer in context follows: there the answer, up to its next added token, is tokenized alone
    too and trained from its own first token, as a prompt and a completion are tokenized apart. With no
    added token before the prompt's end to start both from, the ids stay the template's and rendering
    warns (`_warn_prompt_joins_answer`)."""
    pieces: list[list[int]] = []
    moved: list[tuple[int, int]] = []
    done = shift = lower = 0
    for j, ((first, stop), (start, _), prompt_end) in enumerate(zip(ranges, plan.spans, plan.prompt_ends)):
        lo = lower
        lower = stop - 1  # the next prompt's boundary may be this turn's end-of-turn token, not before it
        chars = encoding.token_to_chars(first) if start == prompt_end and first > 0 else None
        joined = chars is not None and chars[0] < start
        if chars is None or not (joined or ((before := encoding.token_to_chars(first - 1)) is not None
                                            and before[1] == start)):
            moved.append((first + shift, stop + shift))
            continue
        k = first - 1
        while k >= lo and ids[k] not in tails.bounds:
            k -= 1
        if k >= lo:  # the tail starts with an added token: compare what follows it
            tail = tails.ids(plan.text[encoding.token_to_chars(k)[0]:prompt_end])
            a, alone = k + 1, tail[1:] if tail and tail[0] == ids[k] else None
        elif j == 0 and not joined:  # no added token before the first answer: the whole prompt is the tail
            a, alone = 0, tails.ids(plan.text[:prompt_end], keep=False)
        else:
            a, alone = first, None
        if joined:
            found = _answer_alone(plan.text, encoding, ids, tails, k, start, first, stop) if alone is not None else None
            if found is None:
                _warn_prompt_joins_answer(name, plan.text, chars, start)
                moved.append((first + shift, stop + shift))
                continue
            answer, end = found
            pieces += (ids[done:a], alone, answer)
            trained = a + shift + len(alone)
            shift += len(alone) + len(answer) - (end - a)
            done = end
            moved.append((trained, stop + shift))
            continue
        if alone is not None and ids[a:first] != alone:
            pieces += (ids[done:a], alone)
            shift += len(alone) - (first - a)
            done = first
        moved.append((first + shift, stop + shift))
    if not pieces:
        return ids, ranges
    return [t for piece in pieces for t in piece] + ids[done:], moved


def _answer_alone(text: str, encoding, ids: list[int], tails: _Tails, k: int, start: int, first: int,
                  stop: int) -> tuple[list[int], int] | None:
    """The tokens of an answer that begins at char `start`, inside token `first`, up to its next added token
    (or the end of its span, token `stop`), tokenized alone after the added token `k` before it (so a Metaspace
    tokenizer gives it no prefix space); and the index of the in-context token they end before. None where
    that added token does not come back first."""
    end = next((i for i in range(first + 1, stop) if ids[i] in tails.bounds), stop)
    upto = encoding.token_to_chars(end)[0] if end < stop else encoding.token_to_chars(stop - 1)[1]
    lead, after = encoding.token_to_chars(k)
    alone = tails.ids(text[lead:after] + text[start:upto], keep=False)
    return (alone[1:], end) if alone and alone[0] == ids[k] else None


def _label(conversation: Conversation, tokenizer, plan: _Plan, encoding, tails: _Tails) -> Example:
    """ids from the tokenizer; labels = ids on the tokens of each trained span, -100 elsewhere."""
    ids = encoding.ids
    ranges = [_token_range(encoding, s, e, conversation.source) for s, e in plan.spans]
    ids, ranges = _prompt_as_sent(plan, encoding, ids, ranges, tails, template_name(tokenizer))
    if any(plan.open_ends):
        ids, ranges = _insert_eos(tokenizer, ids, ranges, plan.open_ends)
    ids = np.array(ids, dtype=np.int32)
    labels = np.full(len(ids), IGNORE, dtype=np.int32)
    for a, b in ranges:
        labels[a:b] = ids[a:b]
    return Example(ids, labels, conversation.source)


def _token_range(encoding, start: int, end: int, source: str) -> tuple[int, int]:
    """The tokens [first, stop) of the char span [start, end): from the token holding its first
    char to the last token that begins before `end` (several tokens can hold one char, e.g. the
    bytes of an emoji). A token straddling an edge is trained: the model has to produce it.
    Token offsets run in text order, so a few lookups replace a scan over every token."""
    first = _token_at(encoding, range(start, end))
    last = _token_at(encoding, range(end - 1, start - 1, -1))
    if first is None or last is None:
        raise DataError(source, "an assistant turn's text produced no tokens")
    stop = last + 1
    while stop < len(encoding) and (chars := encoding.token_to_chars(stop)) is not None and chars[0] < end:
        stop += 1
    return first, stop


def _token_at(encoding, chars: range) -> int | None:
    """The token holding the first of `chars` that a token holds (a normalizer may drop chars)."""
    for c in chars:
        k = encoding.char_to_token(c)
        if k is not None:
            return k
    return None


def _insert_eos(tokenizer, ids: list[int], ranges: list[tuple[int, int]], open_ends: list[bool]):
    """The template ends some assistant turns with no marker: add a trained EOS after each."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SftlabError(f"'{template_name(tokenizer)}' has no EOS token and its template writes no end of turn")
    out: list[int] = []
    moved: list[tuple[int, int]] = []
    done = 0
    for (a, b), open_end in zip(ranges, open_ends):
        shift = len(out) - done  # EOS tokens inserted so far
        out += ids[done:b]
        done = b
        if open_end:
            out.append(eos)
        moved.append((a + shift, len(out)))
    return out + ids[done:], moved


def _render_text(conversation: Conversation, tokenizer, options: RenderOptions) -> Example:
    """Raw-text mode (continued pre-training): BOS? + text + EOS, every token trained."""
    ids = tokenizer(conversation.text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    labels = list(ids)
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        labels[0] = IGNORE
    example = Example(ids, labels, conversation.source)
    return example if options.split_text else _fit(example, options)


def _render_segments(conversation: Conversation, tokenizer, options: RenderOptions) -> Example:
    """Template-free segments (Axolotl's `input_output`), as Axolotl renders them: each segment
    tokenized on its own, with no BOS or EOS added (what the text writes is all there is), and the
    ids concatenated; labels = ids on label-true segments, IGNORE elsewhere. Tokenized apart, a
    segment's tokens never straddle a boundary, so the trained tokens are exactly the label-true
    segments' own. Special-token strings in the text ("<|im_start|>", "</s>") become those tokens,
    whatever the tokenizer's `split_special_tokens`. Over-long examples follow `max_seq_length` and
    `truncation` as chats do (never split into blocks as raw text is)."""
    texts = [text for text, _ in conversation.segments]
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=False)["input_ids"]
    ids: list[int] = []
    labels: list[int] = []
    for seg_ids, (_, trained) in zip(encoded, conversation.segments):
        ids += seg_ids
        labels += seg_ids if trained else [IGNORE] * len(seg_ids)
    example = Example(ids, labels, conversation.source)
    if example.num_trained == 0:
        raise DataError(conversation.source, "the label-true segments produced no tokens")
    return _fit(example, options)


def _fit(example: Example, options: RenderOptions) -> Example:
    limit = options.max_seq_length
    if limit is None or len(example) <= limit:
        return example
    if options.truncation == "drop":
        raise TooLong(example.source, f"{len(example)} tokens > max_seq_length {limit} (policy: drop)")
    cut = Example(example.ids[:limit], example.label_ids[:limit], example.source, truncated=True)
    if cut.num_trained == 0:
        raise TooLong(example.source, f"no trained token left after truncating to {limit} tokens")
    return cut
