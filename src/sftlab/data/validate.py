"""Validate a dataset file, streaming: every record ends up kept, rejected (with its source
and reason) or removed as an exact duplicate, and the three counts add up to the records read.

Strict mode (`on_error="raise"`) stops at the first bad record with a `DataError` naming
file and line; skip mode writes each bad record to a rejects JSONL and counts it by kind.
With a tokenizer, each conversation is rendered exactly as training renders it
(`sftlab.data.render`): one the chat template cannot render is rejected, so training meets no
surprise; with `max_seq_length` too, over-long ones are rejected (`drop`) or kept and counted
(`truncate`: training cuts them at the limit).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sftlab.data.conversation import Conversation
from sftlab.data.curate import exact_key
from sftlab.data.formats import Columns, RecordError, schema, to_conversation
from sftlab.data.load import ConversationWriter, RejectLog, iter_records, refuse_if_no_record_fits
from sftlab.errors import DataError, SftlabError

BATCH = 512
EXAMPLES = 5


class ValidateOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str | None = Field(None, description="Input schema; detected per record when unset.")
    columns: Columns | None = Field(None, description="Column mapping for data in no detected schema.")
    split: str | None = Field(None, description="Split of a multi-split input (HF dataset, JSON object of lists).")
    on_error: Literal["raise", "skip"] = Field("raise", description="raise: stop at the first bad record; skip: reject it and go on.")
    dedup: bool = Field(True, description="Remove exact duplicates (normalised text), keeping the first.")
    max_seq_length: int | None = Field(None, ge=2, description="Token limit (needs a tokenizer).")
    length_policy: Literal["drop", "truncate"] = Field("drop", description="What to do with conversations over max_seq_length.")


@dataclass
class ValidateReport:
    input: str
    records_in: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)  # kind -> count
    duplicates: int = 0
    truncated: int = 0
    duplicate_examples: list[dict[str, str]] = field(default_factory=list)
    output: str | None = None
    rejects_file: str | None = None

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def to_json(self) -> dict[str, Any]:
        return {"input": self.input, "records_in": self.records_in, "kept": self.kept,
                "rejected": self.rejected_total, "rejected_by_reason": dict(self.rejected.most_common()),
                "duplicates": self.duplicates, "truncated": self.truncated,
                "duplicate_examples": self.duplicate_examples, "output": self.output, "rejects_file": self.rejects_file}


def token_lengths(convs: list[Conversation], tokenizer) -> list[int]:
    """Lengths in tokens as training renders them (chat template, end-of-turn/EOS included)."""
    from sftlab.data.render import render_many

    out = []
    for item in render_many(convs, tokenizer):
        if isinstance(item, DataError):
            raise item
        out.append(len(item))
    return out


class _Validator:
    def __init__(self, opts: ValidateOptions, report: ValidateReport, rejects: RejectLog,
                 writer: ConversationWriter | None, tokenizer):
        self.opts, self.report, self.rejects, self.writer, self.tokenizer = opts, report, rejects, writer, tokenizer
        self.seen: dict[bytes, str] = {}
        self.own_rejects = 0  # rejects added here (the rest come from unreadable records)

    def reject(self, err: RecordError, raw: Any) -> None:
        if self.opts.on_error == "raise":
            raise err
        self.rejects.add_error(err, raw)
        self.own_rejects += 1

    def process(self, batch: list[tuple[Conversation, Any]]) -> None:
        if self.tokenizer is not None:
            batch = self._render(batch)
        for conv, _ in batch:
            if self.opts.dedup:
                key = exact_key(conv)
                if key in self.seen:
                    self.report.duplicates += 1
                    if len(self.report.duplicate_examples) < EXAMPLES:
                        self.report.duplicate_examples.append({"source": conv.source, "duplicate_of": self.seen[key]})
                    continue
                self.seen[key] = conv.source
            self.report.kept += 1
            if self.writer is not None:
                self.writer.write(conv)

    def _render(self, batch):
        """Render as training will: a conversation the template cannot render is rejected; over-long ones
        are rejected (drop) or counted (truncate: training cuts them at max_seq_length)."""
        from sftlab.data.render import RenderOptions, TooLong, render_many

        options = RenderOptions(max_seq_length=self.opts.max_seq_length, truncation=self.opts.length_policy,
                                split_text=True)  # raw text is split into blocks by training, not cut
        out = []
        for (conv, raw), result in zip(batch, render_many([c for c, _ in batch], self.tokenizer, options)):
            if isinstance(result, DataError):
                kind = "too long" if isinstance(result, TooLong) else getattr(result, "kind", "cannot render")
                self.reject(RecordError(result.source, kind, result.reason), raw)
                continue
            self.report.truncated += result.truncated
            out.append((conv, raw))
        return out


def validate(path: str | Path, options: ValidateOptions | None = None, *, out: str | Path | None = None,
             rejects_path: str | Path | None = None, tokenizer=None, progress: bool = False) -> ValidateReport:
    """Stream `path` through the loaders and checks; write the kept records to `out` (if given)."""
    from tqdm import tqdm

    opts = options or ValidateOptions()
    fmt = schema(opts.format, opts.columns)
    if opts.max_seq_length and tokenizer is None:
        raise SftlabError("max_seq_length needs a tokenizer: pass --model")
    report = ValidateReport(input=str(path), output=str(out) if out else None,
                            rejects_file=str(rejects_path) if rejects_path and opts.on_error == "skip" else None)
    writer = ConversationWriter(out) if out else None
    records = 0
    with RejectLog(rejects_path if opts.on_error == "skip" else None) as rejects:
        try:
            v = _Validator(opts, report, rejects, writer, tokenizer)
            batch: list[tuple[Conversation, Any]] = []
            reader = iter_records(path, split=opts.split, on_error=opts.on_error, rejects=rejects, trees=fmt is None)
            for source, raw in tqdm(reader, desc="validate", unit="rec", disable=not progress):
                records += 1
                try:
                    batch.append((to_conversation(raw, source, fmt), raw))
                except RecordError as e:
                    v.reject(e, raw)
                if len(batch) >= BATCH:
                    v.process(batch)
                    batch = []
            v.process(batch)
            if opts.on_error == "skip":
                refuse_if_no_record_fits(path, records - v.own_rejects, rejects)
        except BaseException:
            if writer is not None:
                writer.close(ok=False)
            raise
        if writer is not None:
            writer.close()
        report.rejected = Counter(rejects.counts)
        if not rejects.total:  # the file is made at the first reject
            report.rejects_file = None
        report.records_in = records + (rejects.total - v.own_rejects)
    return report
