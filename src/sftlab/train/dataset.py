"""From data files to packed rows of Examples, with the render cache and honest counts."""

from __future__ import annotations

import gc
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sftlab.config import DataConfig
from sftlab.data.cache import examples_digest, file_digest, fingerprint, load_examples, save_examples
from sftlab.data.conversation import Example
from sftlab.data.pack import pack
from sftlab.data.render import IGNORE, RenderOptions, TooLong, iter_rendered
from sftlab.errors import SftlabError


@dataclass
class PrepStats:
    path: str
    records: int = 0
    examples: int = 0
    rejected: int = 0
    too_long: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    cached: bool = False
    seconds: float = 0.0
    fingerprint: str = ""  # the render cache key (inputs + code)
    digest: str = ""  # hash of the rendered examples (what training sees)
    rejects_file: str | None = None
    curated: dict | None = None  # the curation report, when data.curate is set
    text_documents: int = 0  # raw-text records ...
    text_blocks: int = 0  # ... and the blocks of at most max_seq_length tokens they were split into
    undesirable: int = 0  # unpaired preference (KTO) records labelled false: answers not to learn
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.examples} examples from {self.records} records", f"{self.tokens} tokens ({self.trained_tokens} trained)"]
        if self.rejected:
            parts.append(f"{self.rejected} rejected -> {self.rejects_file}")
        if self.undesirable:
            parts.append(f"{self.undesirable} labelled undesirable (label: false) left out")
        if self.too_long:
            parts.append(f"{self.too_long} over max_seq_length dropped")
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.text_documents:
            parts.append(f"{self.text_blocks} text blocks from {self.text_documents} documents")
        if self.curated:
            parts.append(f"{self.curated['removed_total']} removed by curation {self.curated['removed']}")
        parts.append(f"{'cache hit' if self.cached else 'rendered'} in {self.seconds:.2f}s")
        return f"{self.path}: " + ", ".join(parts)


def no_usable_examples(stats: PrepStats, role: str) -> str:
    """The error for a data file that gave no example; where records were over max_seq_length, the
    first one's reason and the way out (the counts alone read as a data problem)."""
    message = f"{stats.path}: no usable {role} example (see the counts above)"
    if stats.too_long:
        message += f"; {stats.too_long} too long, e.g. {stats.dropped[0]}: raise data.max_seq_length"
    return message


REJECTS = "rejects.jsonl"  # the rejects log kept in a cache entry
CACHED_STATS = ("records", "rejected", "undesirable", "too_long", "truncated", "dropped", "curated", "tokens", "trained_tokens",
                "digest", "text_documents", "text_blocks")


def _data_digest(path: str, data: DataConfig) -> str:
    p = Path(path)
    return file_digest(p) if p.exists() else f"hub:{path}:{data.split}"


def prepare_examples(path: str, tokenizer, data: DataConfig, cache_root: Path, rejects_path: Path | None = None):
    """Load, validate, render (or load from cache) the examples of one data file."""
    t0 = time.perf_counter()
    opts = RenderOptions(train_on=data.train_on, max_seq_length=data.max_seq_length, truncation=data.truncation,
                         split_text=True)
    key_opts = {**asdict(opts), "format": data.format, "split": data.split, "on_error": data.on_error,
                "columns": data.columns.model_dump() if data.columns else None, "stride": data.stride,
                "curate": data.curate.model_dump(mode="json") if data.curate else None,
                "decontaminate": [file_digest(f) for f in data.curate.decontaminate] if data.curate else []}
    fp = fingerprint(_data_digest(path, data), tokenizer, key_opts)
    entry = cache_root / fp
    stats = PrepStats(path=path, fingerprint=fp)
    if rejects_path:  # an earlier attempt's, from other data: this preparation writes its own, or none
        rejects_path.unlink(missing_ok=True)
    if entry.exists():
        examples, meta = load_examples(entry)
        for k in CACHED_STATS:
            setattr(stats, k, meta.get(k, getattr(stats, k)))
        stats.cached = True
        if rejects_path and (entry / REJECTS).exists():  # this run's folder gets the rejects too
            rejects_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(entry / REJECTS, rejects_path)
    else:
        with _gc_paused():
            examples = _render_file(path, tokenizer, data, opts, stats, rejects_path)
        stats.digest = examples_digest(examples)
        kept = {REJECTS: rejects_path} if rejects_path and stats.rejected and rejects_path.exists() else {}
        save_examples(entry, examples, {k: getattr(stats, k) for k in CACHED_STATS}, files=kept)
    if rejects_path and stats.rejected:
        stats.rejects_file = str(rejects_path)
    stats.examples = len(examples)
    stats.seconds = time.perf_counter() - t0
    return examples, stats


def _render_file(path: str, tokenizer, data: DataConfig, opts: RenderOptions, stats: PrepStats,
                 rejects_path: Path | None) -> list[Example]:
    """Read, validate, curate and render one data file, counting every record in `stats`.
    Without curation the file streams into the renderer, so reading overlaps tokenization."""
    from sftlab.data.formats import schema
    from sftlab.data.load import Reading

    reading = Reading(path, format=schema(data.format, data.columns), split=data.split,
                      skip=data.on_error == "skip", rejects_path=rejects_path)
    conversations = _desirable(reading, stats)
    if data.curate is not None:
        from sftlab.data.curate import curate

        conversations, report = curate(list(conversations), data.curate, tokenizer=tokenizer)
        stats.curated = report.to_json()
    examples = []
    with reading:
        for conv, item in iter_rendered(conversations, tokenizer, opts):
            if isinstance(item, TooLong):
                stats.too_long += 1
                stats.dropped.append(f"{item.source}: {item.reason}")
            elif isinstance(item, Exception):
                reading.reject(item, conv.to_json())
            elif conv.is_raw_text:
                blocks = text_blocks(item, data.max_seq_length, data.stride)
                stats.text_documents += 1
                stats.text_blocks += len(blocks)
                examples += blocks
            else:
                examples.append(item)
                stats.truncated += item.truncated
    stats.rejected = reading.rejected
    stats.records = reading.records_in  # curation's removals included: they were read
    stats.tokens = sum(len(e) for e in examples)
    stats.trained_tokens = sum(e.num_trained for e in examples)
    return examples


def _desirable(conversations, stats: PrepStats):
    """The conversations to learn from: an unpaired preference (KTO) record labelled false holds
    an answer the model should not give, so supervised training leaves it out and counts it."""
    for conv in conversations:
        if conv.meta.get("label") is False:
            stats.undesirable += 1
        else:
            yield conv


def text_blocks(example: Example, size: int, overlap: int) -> list[Example]:
    """A raw-text example split into blocks of at most `size` tokens, so no token is cut away.

    Each block after the first starts with the last `overlap` tokens of the block before, as
    context that is not trained again (a row's first token is never a target, since nothing
    precedes it: `overlap` >= 1 keeps that token trained in the previous block). So every
    token of the document is trained exactly once.
    """
    n = len(example)
    if n <= size:
        return [example]
    if not 1 <= overlap < size:
        raise SftlabError(f"data.stride must be at least 1 and below data.max_seq_length ({size}), got {overlap}")
    starts = range(0, n - overlap, size - overlap)
    blocks = []
    for k, a in enumerate(starts):
        labels = example.label_ids[a:a + size].copy()
        if k:
            labels[:overlap] = IGNORE
        blocks.append(Example(example.ids[a:a + size], labels, f"{example.source} block {k + 1}/{len(starts)}"))
    return blocks


@contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector. Preparing a dataset allocates millions of
    short-lived objects (records, template contexts, token lists) while tens of thousands of
    examples pile up, so the collector keeps rescanning the survivors (a tenth of the time or
    more) and finds nothing to free: reading and rendering create no reference cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def make_rows(examples: list[Example], max_len: int, packing: bool) -> list[list[Example]]:
    """Rows for the Trainer: bins of examples (packing) or one example per row."""
    if not packing:
        return [[e] for e in examples]
    bins = pack([len(e) for e in examples], max_len)
    return [[examples[i] for i in b] for b in bins]

