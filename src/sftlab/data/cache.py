"""Cache of rendered examples, keyed by a fingerprint of everything that decides them:
the data files' content, the tokenizer (vocab + special tokens), the chat template, the
render options, and the code that renders (the source of every sftlab module on the cached
path and the transformers / tokenizers / jinja2 / datasketch versions), so a fix in any of them
re-renders. A second run with the same inputs loads in well under a second: the token arrays
are memory-mapped, not read."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np

from sftlab.data.conversation import Example

CACHE_VERSION = "2"


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


# The cached examples are what sftlab.train.dataset makes of a file, through every sftlab module it
# imports (loading, schema conversion, validation, curation, rendering, text blocks, error texts that
# go into the rejects log): the source of all of them is in the key. They are found by following the
# imports, so a module that joins the path later is covered without a list to keep up to date.
RENDER_ENTRY = "sftlab.train.dataset"
RENDER_PACKAGES = ("transformers", "tokenizers", "jinja2", "datasketch")  # datasketch: near-dup removal


def _module_file(name: str) -> Path | None:
    """The source file of sftlab module NAME (a package's __init__.py), None if not one."""
    base = Path(__file__).parents[1].joinpath(*name.split(".")[1:])
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def _sftlab_imports(source: bytes) -> set[str]:
    """sftlab modules that SOURCE imports anywhere (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return {m for m in out if m.split(".")[0] == "sftlab" and _module_file(m)}


def render_sources(entry: str = RENDER_ENTRY) -> dict[str, bytes]:
    """Module name -> source of ENTRY and every sftlab module it imports, at any depth."""
    sources, todo = {}, [entry]
    while todo:
        name = todo.pop()
        if name not in sources:
            sources[name] = _module_file(name).read_bytes()
            todo += _sftlab_imports(sources[name])
    return sources


@lru_cache(maxsize=1)
def render_code_digest() -> dict[str, str]:
    """Versions of the libraries that tokenize, apply chat templates and find near-duplicates, and a
    hash of the source of sftlab's own render path (a version string does not change with each fix)."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    for name, source in sorted(render_sources().items()):
        h.update(name.encode() + b"\0" + source)
    out = {"sftlab_render_code": h.hexdigest()}
    for pkg in RENDER_PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def fingerprint(data_digest: str, tokenizer, options: dict) -> str:
    payload = json.dumps(
        {"v": CACHE_VERSION, "data": data_digest, "tok": tokenizer_digest(tokenizer), "opts": options,
         "code": render_code_digest()}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def examples_digest(examples: list[Example]) -> str:
    """Hash of what training sees: every example's token ids and labels, in order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(len(e).to_bytes(8, "little"))
        h.update(np.ascontiguousarray(e.ids, dtype=np.int32).tobytes())
        h.update(np.ascontiguousarray(e.label_ids, dtype=np.int32).tobytes())
    return h.hexdigest()


def save_examples(path: Path, examples: list[Example], meta: dict, files: dict[str, Path] | None = None) -> None:
    """Write a cache entry: a folder of flat int32 .npy arrays (ids, labels) + example
    lengths, and meta.json (sources and `meta`), plus copies of `files` (name -> path; e.g. the
    rejects log, which a cache hit hands out again). Written to a temporary folder and renamed,
    so an entry that exists is complete."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    for name, src in (files or {}).items():
        shutil.copyfile(src, tmp / name)
    np.save(tmp / "ids.npy", _flat([e.ids for e in examples]))
    np.save(tmp / "labels.npy", _flat([e.label_ids for e in examples]))
    np.save(tmp / "lengths.npy", np.array([len(e) for e in examples], dtype=np.int64))
    (tmp / "meta.json").write_text(json.dumps({"sources": [e.source for e in examples], **meta}), encoding="utf-8")
    try:
        os.replace(tmp, path)
    except OSError:  # another process wrote the same entry first
        shutil.rmtree(tmp)


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)


def load_examples(path: Path) -> tuple[list[Example], dict]:
    """Examples that are views of the entry's memory-mapped arrays: loading reads no tokens."""
    # plain ndarray views of the memmaps: slicing an np.memmap is ~30x slower
    ids = np.asarray(np.load(path / "ids.npy", mmap_mode="r"))
    labels = np.asarray(np.load(path / "labels.npy", mmap_mode="r"))
    ends = np.cumsum(np.load(path / "lengths.npy")).tolist()
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    sources = meta.pop("sources")
    starts = [0, *ends[:-1]]
    return [Example(ids[a:b], labels[a:b], src) for a, b, src in zip(starts, ends, sources)], meta
