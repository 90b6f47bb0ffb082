"""Preference records -> token ids for TRL's trainers, through the SFT renderer.

Each side of a pair (prompt + chosen, prompt + rejected) is rendered by `render` exactly as SFT
renders it, training on the last assistant turn only. The prompt is every token before the
first trained one; the completion is the trained span (the answer and its end-of-turn token),
so preference losses score the very tokens SFT trains on. Both sides must yield the same
prompt tokens. TRL's collators take these ids as they are (`prompt_ids` + `chosen_ids` /
`rejected_ids` for DPO and ORPO, `prompt_ids` + `completion_ids` + `label` for KTO).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sftlab.data.conversation import Conversation, Example
from sftlab.data.render import RenderOptions, TooLong, iter_rendered
from sftlab.errors import DataError, RecordError, SftlabError


# why two sides of one prompt render different prompt tokens: almost always whitespace at the start of one
# answer, which the tokenizer merges with the template's own text before it
PROMPTS_DIFFER = ("chosen and rejected render different prompt tokens: the template's text before an answer merges "
                  "with the start of one of them (whitespace or a newline at the start of an answer?)")


def split_prompt(example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of an example rendered with train_on="last"."""
    trained = np.flatnonzero(example.label_ids != -100)
    if not len(trained):
        raise DataError(example.source, "no trained answer tokens left (truncated away?)")
    first, last = int(trained[0]), int(trained[-1])
    return example.ids[:first].tolist(), example.ids[first:last + 1].tolist()


@dataclass
class PreferenceStats:
    path: str
    records: int = 0
    rows: int = 0
    rejected: int = 0
    too_long: int = 0
    dropped: list[str] = field(default_factory=list)
    rejected_kinds: dict[str, int] = field(default_factory=dict)
    rejects_path: str | None = None
    desirable: int | None = None  # KTO rows labelled true (the rest are undesirable)

    def summary(self) -> str:
        parts = [f"{self.rows} rows from {self.records} records"]
        if self.desirable is not None:
            parts[0] += f" ({self.desirable} desirable, {self.rows - self.desirable} undesirable)"
        if self.rejected:
            kinds = ", ".join(f"{n} {kind}" for kind, n in self.rejected_kinds.items())
            where = f"; {self.rejects_path}" if self.rejects_path else ""
            parts.append(f"{self.rejected} rejected" + (f" ({kinds}{where})" if kinds or where else ""))
        if self.too_long:
            parts.append(f"{self.too_long} over max_seq_length dropped")
        return f"{self.path}: " + ", ".join(parts)


def _sides(conv: Conversation, paired: bool) -> list[tuple[list[dict], object]]:
    """The conversations to render for one record, each with what it is: "chosen"/"rejected" for
    pairs, or True/False (desirable or not) for KTO rows."""
    rejected = conv.meta.get("rejected")
    if rejected is not None and not isinstance(rejected, list):  # a column beside a mapped (data.columns) record
        raise RecordError(conv.source, "not a pair", "'rejected' is a plain column of a record read through "
                                                     "data.columns, which maps SFT columns: read preference files "
                                                     "without it (prompt | question | instruction, chosen, rejected)")
    if paired:
        if rejected is None:
            hint = " (an unpaired record with a true/false label is KTO's: align.loss: kto)" \
                if isinstance(conv.meta.get("label"), bool) else ""
            raise RecordError(conv.source, "not a pair", f"needs 'chosen' and 'rejected'{hint}")
        return [(conv.messages, "chosen"), (rejected, "rejected")]
    if rejected is not None:  # a pair gives KTO one desirable and one undesirable row
        return [(conv.messages, True), (rejected, False)]
    if not isinstance(conv.meta.get("label"), bool):
        label = conv.meta.get("label")
        got = "" if label is None else f"; its 'label' is {label!r}, not true or false (write 1/0 as true/false)"
        raise RecordError(conv.source, "no KTO label", f"KTO needs pairs or 'completion' + 'label' (true/false) "
                                                        f"records{got}")
    return [(conv.messages, conv.meta["label"])]


def render_preferences(conversations, tokenizer, *, paired: bool, max_seq_length: int | None = None,
                       on_error: str = "raise", rejects=None, stats: PreferenceStats | None = None) -> list[dict]:
    """Rows of token ids for TRL: paired -> {prompt_ids, chosen_ids, rejected_ids};
    unpaired -> {prompt_ids, completion_ids, label}. Over-long records are dropped and counted;
    bad records raise (on_error="raise") or go to `rejects`."""
    stats = stats or PreferenceStats(path="<memory>")
    options = RenderOptions(train_on="last", max_seq_length=max_seq_length, truncation="drop")
    records: list[tuple[Conversation, list]] = []
    flat: list[Conversation] = []
    for conv in conversations:
        stats.records += 1
        try:
            sides = _sides(conv, paired)
        except DataError as e:
            _reject(e, conv, on_error, rejects, stats)
            continue
        records.append((conv, [what for _, what in sides]))
        flat += [Conversation(messages=m, source=conv.source, meta={"tools": conv.tools} if conv.tools else {})
                 for m, _ in sides]
    rendered = iter(item for _, item in iter_rendered(flat, tokenizer, options))
    rows: list[dict] = []
    for conv, whats in records:
        items = [next(rendered) for _ in whats]
        try:
            rows += _rows(conv, items, whats, paired)
        except TooLong as e:
            stats.too_long += 1
            stats.dropped.append(f"{e.source}: {e.reason}")
        except DataError as e:
            _reject(e, conv, on_error, rejects, stats)
    stats.rows = len(rows)
    return rows


def _rows(conv: Conversation, items: list, whats: list, paired: bool) -> list[dict]:
    for item in items:
        if isinstance(item, Exception):
            raise item
    splits = [split_prompt(e) for e in items]
    if paired:
        (prompt, chosen), (other_prompt, rejected) = splits
        if prompt != other_prompt:
            raise RecordError(conv.source, "prompt tokens differ", PROMPTS_DIFFER)
        return [{"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}]
    return [{"prompt_ids": p, "completion_ids": c, "label": label} for (p, c), label in zip(splits, whats)]


def _reject(err: DataError, conv: Conversation, on_error: str, rejects, stats: PreferenceStats) -> None:
    if on_error == "raise":
        raise err
    stats.rejected += 1
    rejects.add_error(err, conv.to_json())


def load_preferences(path: str, tokenizer, data, *, paired: bool, rejects_path: Path | None = None):
    """Read and render one preference file as the config's `data:` section says."""
    from sftlab.data.formats import schema
    from sftlab.data.load import Reading

    stats = PreferenceStats(path=path)
    with Reading(path, format=schema(data.format, data.columns), split=data.split, skip=data.on_error == "skip",
                 rejects_path=rejects_path) as reading:
        rows = render_preferences(reading, tokenizer, paired=paired, max_seq_length=data.max_seq_length,
                                  on_error=data.on_error, rejects=reading.rejects, stats=stats)
    stats.records += reading.rejected - stats.rejected  # those rejected while reading never reached render_preferences
    stats.rejected = reading.rejected
    if reading.rejects is not None and stats.rejected:
        stats.rejected_kinds, stats.rejects_path = reading.rejects.summary(), str(rejects_path)
    if not paired:
        stats.desirable = sum(bool(r["label"]) for r in rows)
    if not rows:
        raise SftlabError(f"{path}: no usable preference record ({stats.summary()})")
    return rows, stats
