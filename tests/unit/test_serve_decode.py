"""Streaming text deltas (DecodeStream) add up to the full decode and never split a character."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("text", ["Hello wörld — 你好 🙂 ok", "  spaces\n\nnew lines é", "2021-03-05"])
def test_deltas_add_up_to_the_full_decode(tokenizer, text):
    from sftlab.serve.generation import IncrementalDecoder

    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.add(i) for i in ids]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)
