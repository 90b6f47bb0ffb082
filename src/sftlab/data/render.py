"""render(conversation, tokenizer) -> Example: the one place that decides which tokens are trained.

Works with any chat template, including the many without `{% generation %}` tags: the
whole conversation is rendered once; for each trained assistant turn the conversation up
to that turn is rendered with the generation prompt, which must be a text prefix of the
whole, and the turn's content is found right after it. Templates that are not
prefix-stable (some move the system prompt to the last user turn) fall back, with a
warning naming the template, to finding the turns in order in the full text. The trained
span is the assistant content plus the end-of-turn token the template writes after it
(e.g. `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`); when a template writes none,
the tokenizer's EOS is appended so the model learns to stop. Char spans are mapped to
tokens with the fast tokenizer's offsets, so the ids are exactly the template's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sftlab.data.conversation import Conversation, Example
from sftlab.errors import DataError, SftlabError

IGNORE = -100


@dataclass(frozen=True)
class RenderOptions:
    train_on: Literal["all", "last"] = "all"  # which assistant turns are trained
    max_seq_length: int | None = None
    truncation: Literal["drop", "truncate"] = "drop"  # policy for over-long examples


class TooLong(DataError):
    """Raised for an over-long example under the `drop` policy (counted by the caller)."""


def template_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or tokenizer.__class__.__name__


def _apply(tokenizer, messages, *, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors, raise_exception() in templates
        raise SftlabError(f"chat template of '{template_name(tokenizer)}' failed: {e}") from e


def _end_markers(tokenizer) -> list[str]:
    """Strings that can end an assistant turn: EOS and the tokenizer's special tokens."""
    marks = {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
    marks |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    if tokenizer.eos_token:
        marks.add(tokenizer.eos_token)
    return sorted(marks, key=len, reverse=True)


def _turn_end(tail: str, markers: list[str]) -> int | None:
    """Length of the end-of-turn marker at the start of `tail` (after optional spaces), or None."""
    stripped = tail.lstrip(" \t\n")
    offset = len(tail) - len(stripped)
    for m in markers:
        if stripped.startswith(m):
            return offset + len(m)
    return None


def _check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise SftlabError(f"'{template_name(tokenizer)}' has no fast tokenizer: rendering needs token offsets")
    if not getattr(tokenizer, "chat_template", None):
        raise SftlabError(
            f"'{template_name(tokenizer)}' has no chat template: pass one with chat_template "
            "(a .jinja file), or train on raw text"
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
    """Render many conversations, tokenizing them in one batch (the fast tokenizer runs in parallel).

    Returns one item per conversation: its Example, or the DataError (e.g. TooLong) that
    rejected it, so the caller can count and report rejects without losing order.
    """
    plans: list[tuple[str, list[tuple[int, int]], list[int]] | DataError] = []
    for conv in conversations:
        try:
            plans.append(_render_text(conv, tokenizer, options) if conv.is_raw_text else _plan(conv, tokenizer, options))
        except DataError as e:
            plans.append(e)
    texts = [p[0] for p in plans if isinstance(p, tuple)]
    encodings = _encode(tokenizer, texts) if texts else iter(())
    out: list[Example | DataError] = []
    for conv, plan in zip(conversations, plans):
        if isinstance(plan, (Example, DataError)):
            out.append(plan)
            continue
        ids, offsets = next(encodings)
        try:
            out.append(_fit(_label(conv, tokenizer, plan, ids, offsets), options))
        except DataError as e:
            out.append(e)
    return out


def _encode(tokenizer, texts: list[str]):
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return zip(enc["input_ids"], enc["offset_mapping"])


def _plan(conversation: Conversation, tokenizer, options: RenderOptions):
    """Render the text once and find the trained char spans (and turns lacking an end marker)."""
    _check_tokenizer(tokenizer)
    messages = conversation.messages
    full = _apply(tokenizer, messages, add_generation_prompt=False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(conversation.source, "no assistant turn to train on")
    if options.train_on == "last":
        turns = turns[-1:]
    starts = _prefix_starts(tokenizer, messages, turns, full)
    if starts is None:
        _warn_unstable(tokenizer)
        starts = _sequential_starts(messages, turns, full)
    markers = _end_markers(tokenizer)
    spans: list[tuple[int, int]] = []
    missing_eos: list[int] = []  # char positions after which EOS must be inserted
    for i, search_from in zip(turns, starts):
        content = messages[i]["content"].strip()
        start = full.find(content, search_from) if search_from is not None else -1
        if start < 0:
            raise SftlabError(
                f"{conversation.source}: the chat template of '{template_name(tokenizer)}' does not render "
                f"assistant turn {i}'s content verbatim, so its tokens cannot be located"
            )
        end = start + len(content)
        eot = _turn_end(full[end:], markers)
        if eot is None:
            missing_eos.append(end)
        spans.append((start, end + (eot or 0)))
    return full, spans, missing_eos


def _prefix_starts(tokenizer, messages, turns, full) -> list[int] | None:
    """Where each trained turn begins: the end of its generation prompt, as inference sees it.

    None when the template is not prefix-stable (rendering messages[:i] with the generation
    prompt is not a prefix of the whole, e.g. templates that move the system prompt to the
    last user turn).
    """
    starts = []
    for i in turns:
        prefix = _apply(tokenizer, messages[:i], add_generation_prompt=True)
        if not full.startswith(prefix):
            return None
        starts.append(len(prefix))
    return starts


def _sequential_starts(messages, turns, full) -> list[int | None]:
    """Fallback for templates that are not prefix-stable: find user/assistant contents in
    order in the full text; each trained turn is searched for after the message before it.
    System prompts are skipped because such templates move them."""
    cursor, starts, wanted = 0, {}, set(turns)
    for j, m in enumerate(messages):
        if m["role"] == "system":
            continue
        pos = full.find(m["content"].strip(), cursor)
        if j in wanted:
            starts[j] = cursor if pos >= 0 else None
        if pos >= 0:
            cursor = pos + len(m["content"].strip())
    return [starts[i] for i in turns]


_warned: set[str] = set()


def _warn_unstable(tokenizer) -> None:
    name = template_name(tokenizer)
    if name not in _warned:
        _warned.add(name)
        import warnings

        warnings.warn(
            f"the chat template of '{name}' is not prefix-stable (earlier turns render differently once later "
            "turns exist); assistant turns are located in order in the full rendering instead",
            stacklevel=3,
        )


def _label(conversation, tokenizer, plan, input_ids, offsets) -> Example:
    _, spans, missing_eos = plan
    input_ids = list(input_ids)
    labels = [IGNORE] * len(input_ids)
    for s, e in spans:
        for k, (a, b) in enumerate(offsets):
            if b > s and a < e and b > a:
                labels[k] = input_ids[k]
    if missing_eos:
        input_ids, labels = _insert_eos(tokenizer, conversation, input_ids, labels, offsets, missing_eos)
    return Example(input_ids, labels, conversation.source)


def _insert_eos(tokenizer, conversation, input_ids, labels, offsets, positions):
    """The template ends an assistant turn with no marker: add a trained EOS after it."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SftlabError(f"'{template_name(tokenizer)}' has no EOS token and its template writes no end of turn")
    ids, labs = [], []
    pending = sorted(positions)
    for k, (tok, lab) in enumerate(zip(input_ids, labels)):
        while pending and offsets[k][0] >= pending[0]:
            ids.append(eos), labs.append(eos)
            pending.pop(0)
        ids.append(tok), labs.append(lab)
    for _ in pending:
        ids.append(eos), labs.append(eos)
    return ids, labs


def _render_text(conversation: Conversation, tokenizer, options: RenderOptions) -> Example:
    """Raw-text mode (continued pre-training): BOS? + text + EOS, every token trained."""
    ids = tokenizer(conversation.text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    labels = list(ids)
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        labels[0] = IGNORE
    return _fit(Example(ids, labels, conversation.source), options)


def _fit(example: Example, options: RenderOptions) -> Example:
    limit = options.max_seq_length
    if limit is None or len(example) <= limit:
        return example
    if options.truncation == "drop":
        raise TooLong(example.source, f"{len(example)} tokens > max_seq_length {limit} (policy: drop)")
    cut = Example(example.input_ids[:limit], example.labels[:limit], example.source, truncated=True)
    if cut.num_trained == 0:
        raise TooLong(example.source, f"no trained token left after truncating to {limit} tokens")
    return cut
