"""The render cache: a hit on the second run, a miss when any input changes."""

from __future__ import annotations

import copy

import pytest

from sftlab.config import DataConfig
from sftlab.train.dataset import prepare_examples


@pytest.fixture()
def data_file(tmp_path):
    from sftlab.demo.dataset import write_demo_dataset

    return write_demo_dataset(tmp_path / "demo", sizes={"train": 5})["train"]


def prep(path, tokenizer, cache, **overrides):
    return prepare_examples(str(path), tokenizer, DataConfig(train=str(path), **overrides), cache)


def test_second_run_hits_and_returns_identical_examples(data_file, tokenizer, tmp_path):
    first, s1 = prep(data_file, tokenizer, tmp_path / "cache")
    second, s2 = prep(data_file, tokenizer, tmp_path / "cache")
    assert not s1.cached and s2.cached
    assert [(e.input_ids, e.labels, e.source) for e in first] == [(e.input_ids, e.labels, e.source) for e in second]
    assert (s2.records, s2.examples, s2.trained_tokens) == (s1.records, s1.examples, s1.trained_tokens)


def test_any_input_change_misses(data_file, tokenizer, tmp_path):
    cache = tmp_path / "cache"
    _, base = prep(data_file, tokenizer, cache)
    # render option
    assert not prep(data_file, tokenizer, cache, train_on="last")[1].cached
    assert not prep(data_file, tokenizer, cache, max_seq_length=512)[1].cached
    # chat template
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tok.chat_template.replace("You are a helpful AI assistant", "You are a terse assistant")
    assert not prep(data_file, tok, cache)[1].cached
    # data content (same file name)
    data_file.write_text(data_file.read_text().replace("Convert", "Turn"), encoding="utf-8")
    changed = prep(data_file, tokenizer, cache)[1]
    assert not changed.cached and changed.fingerprint != base.fingerprint


def test_every_record_is_counted_cold_and_cached(tokenizer, tmp_path):
    """records in = examples + rejected + over-long + removed by curation, on both paths."""
    import json

    def chat(q, a):
        return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})

    lines = [chat(f"Question {i}?", f"Answer {i}.") for i in range(4)]
    lines += [chat("Question 0?", "Answer 0."), "{not json", chat("Long? " * 300, "Yes.")]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    opts = dict(on_error="skip", max_seq_length=256, curate={"near_dedup": False})
    for cached in (False, True):
        examples, s = prep(path, tokenizer, tmp_path / "cache", **opts)
        assert s.cached == cached
        assert (s.records, s.examples, s.rejected, s.too_long, s.curated["removed_total"]) == (7, 4, 1, 1, 1)
        assert len(examples) == 4 and s.tokens == sum(len(e) for e in examples)


@pytest.mark.parametrize("package", ["transformers", "tokenizers", "datasketch"])
def test_a_changed_library_version_misses(data_file, tokenizer, tmp_path, monkeypatch, package):
    import importlib.metadata

    from sftlab.data import cache as cache_mod

    cache = tmp_path / "cache"
    assert not prep(data_file, tokenizer, cache)[1].cached
    assert prep(data_file, tokenizer, cache)[1].cached
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda pkg: "99.0" if pkg == package else real(pkg))
    cache_mod.render_code_digest.cache_clear()
    try:
        assert not prep(data_file, tokenizer, cache)[1].cached
    finally:
        monkeypatch.undo()
        cache_mod.render_code_digest.cache_clear()
    assert prep(data_file, tokenizer, cache)[1].cached


@pytest.mark.parametrize("module", ["render.py", "dataset.py", "validate.py", "curate.py"])
def test_a_changed_render_module_misses(data_file, tokenizer, tmp_path, monkeypatch, module):
    """A fix in any module on the cached path (same sftlab version) must re-render: the source of
    train/dataset.py and of every sftlab module it imports is in the key."""
    from pathlib import Path

    from sftlab.data import cache as cache_mod

    cache = tmp_path / "cache"
    prep(data_file, tokenizer, cache)
    real_read = Path.read_bytes

    def patched(self):
        data = real_read(self)
        return data + b"\n# a fix" if self.name == module else data

    monkeypatch.setattr(Path, "read_bytes", patched)
    cache_mod.render_code_digest.cache_clear()
    try:
        assert not prep(data_file, tokenizer, cache)[1].cached
    finally:
        monkeypatch.undo()
        cache_mod.render_code_digest.cache_clear()


def test_supervised_training_leaves_out_undesirable_answers(tokenizer, tmp_path):
    """A KTO file given to `sftlab train`: the answers labelled false are not learned, and the
    count says so (on a cache hit too)."""
    path = tmp_path / "kto.csv"  # as pandas writes it: True/False strings
    path.write_text("prompt,completion,label\nIs the sky blue?,Yes.,True\nIs the sky blue?,\"No, green.\",False\n"
                    "Is grass green?,Yes.,True\n")
    for cached in (False, True):
        examples, stats = prep(path, tokenizer, tmp_path / "cache")
        assert stats.cached is cached
        assert (stats.records, stats.examples, stats.undesirable) == (3, 2, 1)
        assert "1 labelled undesirable (label: false) left out" in stats.summary()
        assert [e.source for e in examples] == [f"{path}:2", f"{path}:4"]
