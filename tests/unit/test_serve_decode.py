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


def test_stop_text_cuts_at_the_first_stop_wherever_the_pieces_split():
    """Pieces in any split give the text before the first stop string, and nothing of a stop
    string is ever sent, even when it arrives across pieces."""
    from itertools import combinations

    from sftlab.serve.generation import StopText

    text, stops = "Hello world. Goodbye.", ["o w", "bye", "zz"]
    for cuts in combinations(range(1, len(text)), 2):
        a, b = cuts
        stop = StopText(stops)
        sent = [stop.feed(p) for p in (text[:a], text[a:b], text[b:])]
        assert "".join(sent) + stop.flush() == "Hell" and stop.hit, cuts
        assert all("o w" not in s and not s.endswith("o") for s in sent[1:] if s), cuts
    nothing = StopText(["zz"])
    assert nothing.feed("ab z") == "ab " and nothing.flush() == "z" and not nothing.hit
