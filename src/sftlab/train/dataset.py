"""From data files to packed rows of Examples, with the render cache and honest counts."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sftlab.config import DataConfig
from sftlab.data.cache import file_digest, fingerprint, load_examples, save_examples
from sftlab.data.conversation import Example
from sftlab.data.pack import pack
from sftlab.data.render import RenderOptions, TooLong, render_many


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
    fingerprint: str = ""
    rejects_file: str | None = None
    curated: dict | None = None  # the curation report, when data.curate is set
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.examples} examples from {self.records} records", f"{self.tokens} tokens ({self.trained_tokens} trained)"]
        if self.rejected:
            parts.append(f"{self.rejected} rejected -> {self.rejects_file}")
        if self.too_long:
            parts.append(f"{self.too_long} over max_seq_length dropped")
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.curated:
            parts.append(f"{self.curated['removed_total']} removed by curation {self.curated['removed']}")
        parts.append(f"{'cache hit' if self.cached else 'rendered'} in {self.seconds:.2f}s")
        return f"{self.path}: " + ", ".join(parts)


CACHED_STATS = ("records", "rejected", "too_long", "truncated", "dropped", "curated")


def _data_digest(path: str, data: DataConfig) -> str:
    p = Path(path)
    return file_digest(p) if p.exists() else f"hub:{path}:{data.split}"


def prepare_examples(path: str, tokenizer, data: DataConfig, cache_root: Path, rejects_path: Path | None = None):
    """Load, validate, render (or load from cache) the examples of one data file."""
    from sftlab.data.load import RejectLog, load_conversations

    t0 = time.perf_counter()
    opts = RenderOptions(train_on=data.train_on, max_seq_length=data.max_seq_length, truncation=data.truncation)
    key_opts = {**asdict(opts), "format": data.format, "split": data.split, "on_error": data.on_error,
                "curate": data.curate.model_dump(mode="json") if data.curate else None,
                "decontaminate": [file_digest(f) for f in data.curate.decontaminate] if data.curate else []}
    fp = fingerprint(_data_digest(path, data), tokenizer, key_opts)
    cache_file = cache_root / f"{fp}.npz"
    stats = PrepStats(path=path, fingerprint=fp)
    if cache_file.exists():
        examples, meta = load_examples(cache_file)
        for k in CACHED_STATS:
            setattr(stats, k, meta.get(k, getattr(stats, k)))
        stats.cached = True
    else:
        rejects = RejectLog(rejects_path) if data.on_error == "skip" else None
        conversations = load_conversations(path, format=data.format, split=data.split, on_error=data.on_error, rejects=rejects)
        stats.records = len(conversations) + (rejects.total if rejects else 0)
        if data.curate is not None:
            from sftlab.data.curate import curate

            conversations, report = curate(conversations, data.curate, tokenizer=tokenizer)
            stats.curated = report.to_json()
        rendered = render_many(conversations, tokenizer, opts)
        examples = []
        for conv, item in zip(conversations, rendered):
            if isinstance(item, TooLong):
                stats.too_long += 1
                stats.dropped.append(f"{item.source}: {item.reason}")
            elif isinstance(item, Exception):
                if rejects is None:
                    raise item
                rejects.add_error(item, conv.to_json())
            else:
                examples.append(item)
                stats.truncated += item.truncated
        stats.rejected = rejects.total if rejects else 0
        if rejects:
            rejects.close()
        save_examples(cache_file, examples, {k: getattr(stats, k) for k in CACHED_STATS})
    if rejects_path and stats.rejected:
        stats.rejects_file = str(rejects_path)
    stats.examples = len(examples)
    stats.tokens = sum(len(e) for e in examples)
    stats.trained_tokens = sum(e.num_trained for e in examples)
    stats.seconds = time.perf_counter() - t0
    return examples, stats


def make_rows(examples: list[Example], max_len: int, packing: bool) -> list[list[Example]]:
    """Rows for the Trainer: bins of examples (packing) or one example per row."""
    if not packing:
        return [[e] for e in examples]
    bins = pack([len(e) for e in examples], max_len)
    return [[examples[i] for i in b] for b in bins]

