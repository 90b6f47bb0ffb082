"""Deterministic seeded train/validation/test splits, optionally stratified by a field.

Sizes use largest-remainder rounding, so they sum exactly to the input and (when stratified)
every value of the field is spread over the splits in the requested proportions.
"""

from __future__ import annotations

import random
from collections import defaultdict

from sftlab.data.conversation import Conversation
from sftlab.errors import DataError, SftlabError


def allocate(n: int, ratios: list[float]) -> list[int]:
    """Split n items in proportion to `ratios` (largest remainder; ties go to earlier splits)."""
    total = sum(ratios)
    exact = [n * r / total for r in ratios]
    sizes = [int(x) for x in exact]
    for i in sorted(range(len(ratios)), key=lambda i: (-(exact[i] - sizes[i]), i))[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


def parse_ratios(text: str, names: list[str]) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(",")]
    except ValueError:
        raise SftlabError(f"--ratios must be numbers separated by commas, got '{text}'") from None
    if len(ratios) != len(names) or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise SftlabError(f"--ratios needs {len(names)} non-negative numbers (for {', '.join(names)}), got '{text}'")
    return ratios


def _stratum(conv: Conversation, field: str) -> str:
    if field not in conv.meta:
        raise DataError(conv.source, f"no field '{field}' to stratify by (fields: {', '.join(conv.meta) or 'none'})")
    value = conv.meta[field]
    return value if isinstance(value, str) else repr(value)


def split_conversations(convs: list[Conversation], names: list[str], ratios: list[float], *, seed: int = 0,
                        stratify: str | None = None) -> dict[str, list[Conversation]]:
    """{name: conversations}; the same input, ratios and seed always give the same split."""
    if len(names) != len(ratios):
        raise SftlabError(f"{len(names)} split names but {len(ratios)} ratios")
    if len(set(names)) != len(names):
        raise SftlabError(f"split names must differ, got {', '.join(names)}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, conv in enumerate(convs):
        groups[_stratum(conv, stratify) if stratify else ""].append(i)
    rng = random.Random(seed)
    out: dict[str, list[int]] = {name: [] for name in names}
    for key in sorted(groups):
        idx = groups[key]
        rng.shuffle(idx)
        start = 0
        for name, size in zip(names, allocate(len(idx), ratios)):
            out[name].extend(idx[start:start + size])
            start += size
    return {name: [convs[i] for i in sorted(idx)] for name, idx in out.items()}
