"""Packing and padding-free collation.

`pack` groups examples into rows of at most `max_len` tokens (best-fit decreasing), so a
micro-batch holds a steady number of tokens with almost no padding. `collate` turns rows
into tensors: examples concatenated, `position_ids` restarting at 0 for each example, no
attention mask, so no example sees another: sftlab's varlen attention (train/attention.py)
and flash-attention read the resets directly, and transformers builds a block-diagonal mask
from them for SDPA/eager. With `flatten` all rows of a micro-batch become one row, so there is
no padding but `bucket`'s rounding (for the varlen attentions; SDPA/eager would attend over
the whole row).
Row-end padding forms its own "example" (positions restart at 0) and is never trained. It repeats
the row's first token rather than the pad token: nothing sees it, but its own forward and backward
run, and with a pad token whose embedding row is kept at zero (`padding_idx`, as in tiny random
models) its hidden states stay zero, where a norm of the form sqrt(mean(x^2)) (Gemma 3n's AltUp)
has an infinite derivative: NaN gradients for the whole step.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from sftlab.data.conversation import Example
from sftlab.data.render import IGNORE


def pack(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example lengths into bins of capacity `max_len`.

    Returns bins as lists of example indices. Deterministic: ties keep input order.
    Every index appears exactly once; an example longer than `max_len` is an error
    (render truncates or drops over-long examples first).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # free space of each bin, kept sorted as (free, bin_index) for best-fit lookups
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"example {i} has {n} tokens > max_len {max_len}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_len - n, len(bins) - 1))
    return bins


def shape_bucket(n: int) -> int:
    """`n` rounded up to one of 16 sizes per power of two (at most 6.25 % more).

    Training on a CPU, oneDNN builds and caches a kernel for every matmul shape it meets;
    bucketed widths make shapes repeat from step to step instead of being new each time."""
    step = max(8, 1 << max(0, n.bit_length() - 5))
    return -(-n // step) * step


def collate(rows: Sequence[Sequence[Example]], bucket: bool = False, flatten: bool = False,
            sources: bool = False) -> dict:
    """Rows of examples -> {input_ids, labels, position_ids} tensors of shape [rows, longest]
    (or [1, all tokens] with `flatten`); with `sources`, also the examples' `file:line` list
    (the loss ignores it; a training error names the batch with it)."""
    import torch

    names = [ex.source for row in rows for ex in row] if sources else None

    if flatten:
        rows = [[ex for row in rows for ex in row]]
    flat = [_concat(row) for row in rows]
    width = max(len(ids) for ids, _, _ in flat)
    if bucket:
        width = shape_bucket(width)
    input_ids, labels, position_ids = [], [], []
    for ids, labs, pos in flat:
        pad = width - len(ids)
        input_ids.append(ids + ids[:1] * pad)
        labels.append(labs + [IGNORE] * pad)
        position_ids.append(pos + list(range(pad)))
    batch = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
    }
    if names is not None:
        batch["sources"] = names
    return batch


def _concat(row: Sequence[Example]) -> tuple[list[int], list[int], list[int]]:
    if not row:
        return [], [], []
    lengths = [len(ex) for ex in row]
    ids = np.concatenate([ex.ids for ex in row])
    labels = np.concatenate([ex.label_ids for ex in row])
    starts = np.cumsum([0, *lengths[:-1]])
    # An example's first token has no predecessor inside the example: never a target.
    labels[starts[starts < len(ids)]] = IGNORE
    pos = np.arange(len(ids)) - np.repeat(starts, lengths)
    return ids.tolist(), labels.tolist(), pos.tolist()


def packing_stats(rows: Sequence[Sequence[Example]], batch_rows: int, flatten: bool = False,
                  bucket: bool = False) -> dict[str, float]:
    """Trained / real / computed token counts when rows are batched `batch_rows` at a time
    and collated as `collate(..., bucket, flatten)` does."""
    real = trained = computed = 0
    for start in range(0, len(rows), batch_rows):
        batch = rows[start : start + batch_rows]
        lengths = [sum(len(ex) for ex in row) for row in batch]
        real += sum(lengths)
        width = sum(lengths) if flatten else max(lengths)
        width = shape_bucket(width) if bucket else width
        computed += width * (1 if flatten else len(batch))
        trained += sum(ex.num_trained - (ex.labels[0] != IGNORE) for row in batch for ex in row)
    return {
        "rows": len(rows),
        "real_tokens": real,
        "computed_tokens": computed,
        "trained_tokens": trained,
        "padding_ratio": 1 - real / computed if computed else 0.0,
        "trained_per_computed": trained / computed if computed else 0.0,
    }
