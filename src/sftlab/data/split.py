"""Deterministic seeded train/validation/test splits, optionally stratified by a field.

Sizes use largest-remainder rounding, so they sum exactly to the input and follow the ratios
overall; when stratified, every value of the field is spread over the splits as close to the
ratios as whole rows allow. Exact duplicates (curate's exact-dedup key), and records with the same
value of a `group` field, go to the same split, so a record cannot leak from train into test through
a copy of itself or another part of its conversation. Each group takes its place in the shuffled
order from a seeded hash of itself, not from a shuffle of the whole list: records added later move
few others to another split.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict

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


def _field(conv: Conversation, field: str, use: str) -> str:
    if field not in conv.meta:
        raise DataError(conv.source, f"no field '{field}' to {use} by (fields: {', '.join(conv.meta) or 'none'})")
    value = conv.meta[field]
    return value if isinstance(value, str) else repr(value)


def _refuse_augmented(convs: list[Conversation]) -> None:
    made = [c for c in convs if "augmented_from" in c.meta]
    if made:
        raise SftlabError(f"{len(made)} records were made by `sftlab data augment` (first: {made[0].source}), and a "
                          "variant in train of a validation or test record trains on its answer: split the original "
                          "data, then augment the train split")


def _groups(convs: list[Conversation], keys: list[bytes], group: str | None, seed: int) -> list[tuple[bytes, list[int]]]:
    """(key, indices) of the records that must share a split: those with the same exact-dedup key
    (`keys`) or the same `group` value (union-find, as a chain of such links joins groups). The key is
    the group value when there is one, so a record added to a group does not move it."""
    links = [keys[i] if group is None else f"group\x1f{_field(c, group, 'group')}".encode() for i, c in enumerate(convs)]
    parent = list(range(len(convs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[object, int] = {}
    for i in range(len(convs)):
        for link in {keys[i], links[i]}:
            parent[root(i)] = root(first.setdefault(link, i))
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(len(convs)):
        members[root(i)].append(i)
    return [(_place(min(links[i] for i in idx), seed), idx) for idx in members.values()]


def _place(key: bytes, seed: int) -> bytes:
    """A group's place in the shuffled order (and its draw among splits): a hash of its key, keyed by the seed."""
    return hashlib.blake2b(key, digest_size=8, key=str(seed).encode()[:64]).digest()


def split_conversations(convs: list[Conversation], names: list[str], ratios: list[float], *, seed: int = 0,
                        stratify: str | None = None,
                        group: str | None = None) -> tuple[dict[str, list[Conversation]], int]:
    """({name: conversations}, duplicate groups kept together); the same input, ratios and seed always
    give the same split. A group counts in the stratum of its first record; a split can miss its size
    by up to a group's size when a group fits in none of its stratum's remaining quotas."""
    if len(names) != len(ratios):
        raise SftlabError(f"{len(names)} split names but {len(ratios)} ratios")
    if len(set(names)) != len(names):
        raise SftlabError(f"split names must differ, got {', '.join(names)}")
    _refuse_augmented(convs)
    strata = [_field(conv, stratify, "stratify") if stratify else "" for conv in convs]
    dedup_keys = [exact_key(conv) for conv in convs]
    units: dict[str, list[tuple[bytes, list[int]]]] = defaultdict(list)
    for place, members in sorted(_groups(convs, dedup_keys, group, seed)):
        units[strata[members[0]]].append((place, members))
    keys = sorted(units)
    rng = random.Random(seed)
    rank = list(range(len(keys)))
    rng.shuffle(rank)
    quotas = _quotas([sum(len(g) for _, g in units[key]) for key in keys], ratios, rank)
    out: list[list[int]] = [[] for _ in names]
    for key, left in zip(keys, quotas):
        groups = units[key]
        for place, members in ((p, g) for p, g in groups if len(g) > 1):  # first, while the quotas have room
            fits = [j for j in range(len(names)) if left[j] >= len(members)]
            j = (random.Random(place).choices(fits, [left[j] for j in fits])[0] if fits
                 else max(range(len(names)), key=left.__getitem__))
            out[j].extend(members)
            left[j] -= len(members)
        singles = [g[0] for _, g in groups if len(g) == 1]
        start = 0
        for j, size in enumerate(left):
            out[j].extend(singles[start:start + max(size, 0)])
            start += max(size, 0)
    together = sum(n > 1 for n in Counter(dedup_keys).values())
    return {name: [convs[i] for i in sorted(idx)] for name, idx in zip(names, out)}, together
