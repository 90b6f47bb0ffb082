"""Cache of rendered examples, keyed by a fingerprint of everything that decides them:
the data files' content, the tokenizer (vocab + special tokens), the chat template and
the render options. A second run with the same inputs loads in well under a second."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from sftlab.data.conversation import Example

CACHE_VERSION = "1"


def file_digest(path: str | Path) -> str:
    """Content hash of a file or (recursively, sorted) a folder."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def fingerprint(data_digest: str, tokenizer, options: dict) -> str:
    payload = json.dumps(
        {"v": CACHE_VERSION, "data": data_digest, "tok": tokenizer_digest(tokenizer), "opts": options}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def save_examples(path: Path, examples: list[Example], extra: dict) -> None:
    """Flat int32 arrays + offsets in one .npz, written atomically."""
    lengths = np.array([len(e) for e in examples], dtype=np.int64)
    ids = np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int32, count=int(lengths.sum()))
    labels = np.fromiter((t for e in examples for t in e.labels), dtype=np.int32, count=int(lengths.sum()))
    meta = json.dumps({"sources": [e.source for e in examples], **extra})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, ids=ids, labels=labels, lengths=lengths, meta=np.array(meta))
    os.replace(tmp, path)


def load_examples(path: Path) -> tuple[list[Example], dict]:
    with np.load(path) as z:
        ids, labels, lengths = z["ids"].tolist(), z["labels"].tolist(), z["lengths"]
        meta = json.loads(str(z["meta"]))
    sources = meta.pop("sources")
    out, start = [], 0
    for n, src in zip(lengths.tolist(), sources):
        out.append(Example(ids[start : start + n], labels[start : start + n], src))
        start += n
    return out, meta
