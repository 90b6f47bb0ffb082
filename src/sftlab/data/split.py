"""Deterministic seeded train/validation/test splits, optionally stratified by a field.

Sizes use largest-remainder rounding, so they sum exactly to the input and follow the ratios
overall; when stratified, every value of the field is spread over the splits as close to the
ratios as whole rows allow. Exact duplicates (curate's exact-dedup key) go to the same split, so
a record cannot leak from train into test through a copy of itself.
"""

from __future__ import annotations

import random
from collections import defaultdict

from sftlab.data.conversation import Conversation
from sftlab.data.curate import exact_key
from sftlab.errors import DataError, SftlabError


def allocate(n: int, ratios: list[float]) -> list[int]:
    """Split n items in proportion to `ratios` (largest remainder; ties go to earlier splits)."""
    total = sum(ratios)
    exact = [n * r / total for r in ratios]
    sizes = [int(x) for x in exact]
    for i in sorted(range(len(ratios)), key=lambda i: (-(exact[i] - sizes[i]), i))[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


def _quotas(sizes: list[int], ratios: list[float], rank: list[int]) -> list[list[int]]:
    """Rows per stratum and split. The split totals are allocate(sum(sizes), ratios), so they follow
    the ratios even when every stratum is small (rounding each stratum on its own puts nothing in a
    10 % split of a stratum under 5 rows). Each stratum gets the floor of its exact share in every
    split plus at most one more row, by largest remainder (ties in `rank` order), so its own
    proportions stay within a row of the ratios."""
    total = sum(ratios)
    exact = [[n * r / total for r in ratios] for n in sizes]
    quotas = [[int(x) for x in row] for row in exact]
    row_need = [n - sum(q) for n, q in zip(sizes, quotas)]
    col_need = [t - sum(q[j] for q in quotas) for j, t in enumerate(allocate(sum(sizes), ratios))]
    extra: set[tuple[int, int]] = set()  # the (stratum, split) cells given their one more row

    def add(s: int, seen: set[int]) -> bool:
        """Give stratum s one more row, moving other strata's extra rows to other splits if need be."""
        for j in range(len(ratios)):
            if (s, j) in extra or j in seen:
                continue
            seen.add(j)
            if col_need[j]:
                col_need[j] -= 1
            else:
                t = next((t for t in range(len(sizes)) if (t, j) in extra and add(t, seen)), None)
                if t is None:
                    continue
                extra.remove((t, j))
            extra.add((s, j))
            return True
        return False

    for s, j in sorted(((s, j) for s in range(len(sizes)) for j in range(len(ratios))),
                       key=lambda c: (quotas[c[0]][c[1]] - exact[c[0]][c[1]], rank[c[0]], c[1])):
        if row_need[s] and col_need[j]:
            extra.add((s, j))
            row_need[s] -= 1
            col_need[j] -= 1
    for s, need in enumerate(row_need):  # when the greedy pass used up a stratum's cells in the splits still short
        for _ in range(need):
            add(s, set())
    for s, j in extra:
        quotas[s][j] += 1
    return quotas


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
                        stratify: str | None = None) -> tuple[dict[str, list[Conversation]], int]:
    """({name: conversations}, duplicate groups kept together); the same input, ratios and seed always
    give the same split. A duplicate group counts in the stratum of its first record; a split can miss
    its size by up to a group's size when a group fits in none of its stratum's remaining quotas."""
    if len(names) != len(ratios):
        raise SftlabError(f"{len(names)} split names but {len(ratios)} ratios")
    if len(set(names)) != len(names):
        raise SftlabError(f"split names must differ, got {', '.join(names)}")
    dups: dict[bytes, list[int]] = defaultdict(list)
    strata = [_stratum(conv, stratify) if stratify else "" for conv in convs]
    for i, conv in enumerate(convs):
        dups[exact_key(conv)].append(i)
    units: dict[str, list[list[int]]] = defaultdict(list)
    for group in dups.values():
        units[strata[group[0]]].append(group)
    keys = sorted(units)
    rng = random.Random(seed)
    rank = list(range(len(keys)))
    rng.shuffle(rank)
    quotas = _quotas([sum(len(g) for g in units[key]) for key in keys], ratios, rank)
    out: list[list[int]] = [[] for _ in names]
    for key, left in zip(keys, quotas):
        groups = units[key]
        rng.shuffle(groups)
        for group in (g for g in groups if len(g) > 1):  # placed first, while the quotas have room
            fits = [j for j in range(len(names)) if left[j] >= len(group)]
            j = rng.choices(fits, [left[j] for j in fits])[0] if fits else max(range(len(names)), key=left.__getitem__)
            out[j].extend(group)
            left[j] -= len(group)
        singles = [g[0] for g in groups if len(g) == 1]
        start = 0
        for j, size in enumerate(left):
            out[j].extend(singles[start:start + max(size, 0)])
            start += max(size, 0)
    together = sum(len(g) > 1 for g in dups.values())
    return {name: [convs[i] for i in sorted(idx)] for name, idx in zip(names, out)}, together
