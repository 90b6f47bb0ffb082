"""Curate conversations: PII scrubbing, quality filters, token-length filters, exact dedup,
decontamination against eval sets, and near-duplicate removal (MinHash LSH, `datasketch`).

`curate(conversations, CurateOptions) -> (kept, CurateReport)` is what `sftlab data curate`
and the train config's `data.curate: {...}` both call. Every removed record is listed in
the report with its source, the step that removed it and, for duplicates, the source of the
record it duplicated (the first occurrence is the one kept).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sftlab.data.conversation import Conversation, message_text
from sftlab.errors import SftlabError

EXAMPLES_PER_REASON = 5
# Fewer records than this sharing a shingle are a near-duplicate cluster, not a template.
TEMPLATE_MIN_RECORDS = 20


class CurateOptions(BaseModel):
    """Curation steps; each can be switched off. Embeddable in the train config as `data.curate`."""

    model_config = ConfigDict(extra="forbid")

    exact_dedup: bool = Field(True, description="Drop conversations whose normalised text repeats an earlier one.")
    near_dedup: bool = Field(True, description="Drop near-duplicates (MinHash LSH over word n-grams).")
    near_dedup_threshold: float = Field(0.7, gt=0, le=1, description="Estimated Jaccard similarity counted as near-duplicate.")
    near_dedup_ngram: int = Field(2, ge=1, description="Word n-gram size of the MinHash shingles.")
    near_dedup_template_share: float = Field(0.1, gt=0, le=1, description=(
        f"Shingles found in this share of the records (and in at least {TEMPLATE_MIN_RECORDS}) are template text "
        "(a shared instruction, boilerplate) and left out of the near-duplicate comparison."))
    num_perm: int = Field(128, ge=16, description="MinHash permutations (more: slower, more precise).")
    min_tokens: int | None = Field(None, ge=1, description="Drop conversations shorter than this (needs a tokenizer).")
    max_tokens: int | None = Field(None, ge=1, description="Drop conversations longer than this (needs a tokenizer).")
    empty_answer: bool = Field(True, description="Drop answers with fewer than min_answer_chars letters/digits.")
    min_answer_chars: int = Field(1, ge=1)
    prompt_echo: bool = Field(True, description="Drop answers that mostly repeat their prompt.")
    repetition: bool = Field(True, description="Drop answers with heavy word 3-gram repetition.")
    max_repeated_ngrams: float = Field(0.3, gt=0, lt=1, description="Fraction of repeated word 3-grams above which an answer is dropped.")
    refusal: bool = Field(True, description="Drop boilerplate refusals ('As an AI language model, ...').")
    pii: bool = Field(False, description="Replace emails, phone numbers and API-key-like strings with placeholders.")
    decontaminate: list[str] = Field(default_factory=list, description="Eval/test files (PATH:SPLIT for one split of several): drop training conversations overlapping them.")
    decontam_ngram: int = Field(8, ge=3, description="Word n-gram size for decontamination (an eval text shorter than this is one n-gram).")
    decontam_min_overlap: float = Field(0.5, gt=0, le=1, description="Share of an eval example's n-grams a training conversation must contain to be dropped.")
    decontam_template_df: int = Field(3, ge=2, description="N-grams found in this many eval examples are template text and ignored.")


@dataclass
class CurateReport:
    records_in: int = 0
    kept: int = 0
    removed: Counter = field(default_factory=Counter)  # reason -> count
    pii: Counter = field(default_factory=Counter)  # kind -> replacements
    removals: list[dict[str, Any]] = field(default_factory=list)  # every removed record
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # a few per reason, with text

    def to_json(self, with_removals: bool = False) -> dict[str, Any]:
        out = {"records_in": self.records_in, "kept": self.kept, "removed": dict(self.removed.most_common()),
               "removed_total": sum(self.removed.values()), "pii_replacements": dict(self.pii), "examples": self.examples}
        if with_removals:
            out["removals"] = self.removals
        return out


# ------------------------------------------------------------------ text helpers

_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")
_MIX = np.uint64(0x9E3779B97F4A7C15)


def normalize(text: str) -> str:
    """Text as compared by exact dedup: NFKC, case-folded, whitespace collapsed."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def conversation_text(conv: Conversation, *, system: bool = True) -> str:
    if not conv.is_chat:  # raw text, or segments as written
        return conv.written_text
    return "\n".join(message_text(m) for m in conv.messages if system or m["role"] != "system")


def preference_label(conv: Conversation) -> bool | None:
    """An unpaired preference (KTO) record's label. Records are duplicates only under the same
    label: one prompt's desirable and undesirable answers are the data, not repeats of it."""
    label = conv.meta.get("label")
    return label if isinstance(label, bool) else None


def rejected_answer(conv: Conversation) -> str | None:
    """A preference pair's rejected answer. Pairs are duplicates only with the same rejected answer too:
    one prompt and chosen answer against several rejected ones are several pairs, not repeats."""
    rejected = conv.meta.get("rejected")
    return message_text(rejected[-1]) if isinstance(rejected, list) and rejected else None


def exact_key(conv: Conversation) -> bytes:
    if conv.segments is not None:  # the same text trained elsewhere is another example
        parts = [f"{'trained' if trained else 'context'}\x1f{text}" for text, trained in conv.segments]
    elif conv.text is not None:
        parts = [conv.text]
    else:
        parts = [f"{m['role']}\x1f{message_text(m)}" for m in conv.messages]
    label, rejected = preference_label(conv), rejected_answer(conv)
    parts += [] if label is None else [f"label\x1f{label}"]
    parts += [] if rejected is None else [f"rejected\x1f{rejected}"]
    return hashlib.blake2b(normalize("\x1e".join(parts)).encode(), digest_size=12).digest()


class WordHasher:
    """Stable 64-bit hashes of words (cached) and of word n-grams (vectorised)."""

    def __init__(self):
        self._cache: dict[str, int] = {}

    def words(self, text: str) -> np.ndarray:
        cache = self._cache
        out = []
        for w in _WORD.findall(text.casefold()):
            h = cache.get(w)
            if h is None:
                h = cache[w] = (zlib.crc32(w.encode()) * 0x100000001B3 + len(w)) % (1 << 64)
            out.append(h)
        return np.array(out, dtype=np.uint64)

    def ngrams(self, text: str, n: int) -> np.ndarray:
        """Hashes of the word n-grams; a text shorter than n words is one gram."""
        w = self.words(text)
        n = min(n, len(w))
        if n == 0:
            return w
        m = len(w) - n + 1
        h = np.zeros(m, dtype=np.uint64)
        for k in range(n):
            h = h * _MIX + w[k:k + m]
        return h


def answer_pairs(conv: Conversation) -> list[tuple[str | None, str]]:
    """(prompt, answer) per assistant turn; raw text is one answer with no prompt; segments give each
    run of label-true segments as an answer, the label-false run before it as its prompt."""
    if conv.text is not None:
        return [(None, conv.text)]
    if conv.segments is not None:
        runs: list[tuple[bool, str]] = []
        for text, trained in conv.segments:
            if runs and runs[-1][0] == trained:
                runs[-1] = (trained, runs[-1][1] + text)
            else:
                runs.append((trained, text))
        return [(runs[k - 1][1] if k else None, text) for k, (trained, text) in enumerate(runs) if trained]
    pairs, prompt = [], None
    for m in conv.messages:
        if m["role"] == "user":
            prompt = m["content"]
        elif m["role"] == "assistant":
            pairs.append((prompt, message_text(m)))
    return pairs


# ------------------------------------------------------------------ quality filters: (prompt, answer, opts) -> detail | None

_ALNUM = re.compile(r"[^\W_]", re.UNICODE)
_REFUSALS = re.compile(
    r"\bas an ai(?: language)? model\b|\bas a large language model\b|"
    r"\bi(?:'m| am) sorry,? but i (?:can(?:'|no)t|am (?:not able|unable)|won't)\b|"
    r"\bi (?:can(?:'|no)t|am unable to|am not able to|won't) (?:help|assist|provide|fulfill|comply|do that)\b",
    re.IGNORECASE,
)


def _too_short(prompt: str | None, answer: str, opts: CurateOptions) -> str | None:
    n = len(_ALNUM.findall(answer))
    return f"answer has {n} letters/digits (< {opts.min_answer_chars})" if n < opts.min_answer_chars else None


def _trigrams(words: list[str]) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + 3]) for i in range(len(words) - 2)]


def _echo(prompt: str | None, answer: str, opts: CurateOptions) -> str | None:
    if prompt is None:
        return None
    a, p = _WORD.findall(answer.casefold()), _WORD.findall(prompt.casefold())
    if len(a) < 3:
        return "answer equals the prompt" if a and a == p else None
    grams, in_prompt = _trigrams(a), set(_trigrams(p))
    overlap = sum(g in in_prompt for g in grams) / len(grams)
    # An extracted span is short next to its prompt; an echo repeats most of it.
    if overlap >= 0.8 and len(a) >= 0.8 * len(p):
        return f"{overlap:.0%} of the answer's 3-grams repeat the prompt"
    return None


def _repetitive(prompt: str | None, answer: str, opts: CurateOptions) -> str | None:
    grams = _trigrams(_WORD.findall(answer.casefold()))
    if len(grams) < 8:
        return None
    repeated = 1 - len(set(grams)) / len(grams)
    return f"{repeated:.0%} of word 3-grams are repeats" if repeated > opts.max_repeated_ngrams else None


def _refusal(prompt: str | None, answer: str, opts: CurateOptions) -> str | None:
    m = _REFUSALS.search(answer[:300])
    return f"boilerplate refusal: '{m.group(0)}'" if m else None


# option name -> (reason reported, check)
QUALITY_FILTERS: dict[str, tuple[str, Callable[[str | None, str, CurateOptions], str | None]]] = {
    "empty_answer": ("empty or too-short answer", _too_short),
    "prompt_echo": ("answer repeats the prompt", _echo),
    "repetition": ("repetitive answer", _repetitive),
    "refusal": ("boilerplate refusal", _refusal),
}


# ------------------------------------------------------------------ PII

_PII: dict[str, tuple[re.Pattern, str]] = {
    "email": (re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}"), "[EMAIL]"),
    "api_key": (re.compile(
        r"\b(?:sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|"
        r"xox[abpr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{32,})\b"),
        "[API_KEY]"),
    "phone": (re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?)?\d{2,4}[\s.-]\d{3,4}(?:[\s.-]?\d{3,4})?(?![\w-])"),
              "[PHONE]"),
}


def scrub_pii(text: str, counts: Counter) -> str:
    """Replace emails, API-key-like strings and phone numbers (9+ digits) with placeholders."""
    for kind, (pattern, placeholder) in _PII.items():
        def repl(m: re.Match, kind=kind, placeholder=placeholder) -> str:
            if kind == "phone" and sum(c.isdigit() for c in m.group(0)) < 9:
                return m.group(0)
            counts[kind] += 1
            return placeholder

        text = pattern.sub(repl, text)
    return text


def _scrubbed(conv: Conversation, counts: Counter) -> Conversation:
    if conv.text is not None:
        return Conversation(source=conv.source, text=scrub_pii(conv.text, counts), meta=conv.meta)
    if conv.segments is not None:
        return Conversation(source=conv.source, meta=conv.meta,
                            segments=[(scrub_pii(text, counts), trained) for text, trained in conv.segments])
    messages = [{**m, "content": scrub_pii(m["content"], counts)} for m in conv.messages]
    return Conversation(messages=messages, source=conv.source, meta=conv.meta)


# ------------------------------------------------------------------ decontamination and near-dup indexes

class EvalNgrams:
    """Word n-grams of eval conversations, to find training conversations that contain them.

    A training conversation is contaminated by an eval example when it contains at least
    `min_overlap` of that example's informative n-grams (an eval text shorter than n words is
    one n-gram). N-grams found in `template_df` or more eval examples are instruction
    templates or boilerplate, not evidence of contamination, and are ignored.
    """

    def __init__(self, evals: Iterable[Conversation], n: int, template_df: int, min_overlap: float,
                 hasher: WordHasher):
        self.n, self.min_overlap, self.hasher = n, min_overlap, hasher
        self.sources: list[str] = []
        per_eval: list[list[int]] = []
        df: Counter = Counter()
        self.short_sizes: set[int] = set()  # word counts of eval texts shorter than n
        for conv in evals:
            text = conversation_text(conv, system=False)
            words = len(hasher.words(text))
            if 0 < words < n:
                self.short_sizes.add(words)
            grams = np.unique(hasher.ngrams(text, n)).tolist()
            self.sources.append(conv.source)
            per_eval.append(grams)
            df.update(grams)
        self.owners: dict[int, list[int]] = {}
        self.sizes: list[int] = []
        for i, grams in enumerate(per_eval):
            informative = [g for g in grams if df[g] < template_df]
            self.sizes.append(len(informative))
            for g in informative:
                self.owners.setdefault(g, []).append(i)

    def match(self, conv: Conversation) -> tuple[str, float] | None:
        """(eval source, share of its n-grams found) for the most overlapped eval example, if contaminated."""
        text = conversation_text(conv, system=False)
        hits: Counter = Counter()
        for size in (self.n, *self.short_sizes):
            for g in np.unique(self.hasher.ngrams(text, size)).tolist():
                hits.update(self.owners.get(g, ()))
        best = max(((h / self.sizes[i], i) for i, h in hits.items()), default=None)
        if best is None or best[0] < self.min_overlap:
            return None
        return self.sources[best[1]], best[0]


def _identity(x):
    return x


def template_shingles(texts: Iterable[str], share: float, ngram: int, hasher: WordHasher) -> np.ndarray:
    """Shingles that many distinct texts share: a fixed instruction or boilerplate. Left in, a long
    shared instruction makes records with different inputs and answers near-duplicates of each other."""
    grams = [np.unique(hasher.ngrams(t, ngram)) for t in set(texts)]
    if not grams:
        return np.zeros(0, dtype=np.uint64)
    values, counts = np.unique(np.concatenate(grams), return_counts=True)  # values come sorted
    return values[counts >= max(TEMPLATE_MIN_RECORDS, share * len(grams))]


class NearDupIndex:
    """MinHash LSH over word n-gram shingles; `add` returns the key of an earlier near-duplicate.
    `template` shingles are left out of a text's signature unless they are all it has."""

    def __init__(self, threshold: float, num_perm: int, ngram: int, hasher: WordHasher,
                 template: np.ndarray | None = None):
        from datasketch import MinHash, MinHashLSH

        self.threshold, self.ngram, self.hasher = threshold, ngram, hasher
        self.template = np.zeros(0, dtype=np.uint64) if template is None else template
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._template = MinHash(num_perm=num_perm, hashfunc=_identity, scheme="affine32")
        self.signatures: dict[Any, Any] = {}

    def minhash(self, text: str):
        h = self.hasher.ngrams(text, self.ngram)
        if len(self.template):  # sorted: np.searchsorted is several times faster than np.isin on short arrays
            at = np.minimum(np.searchsorted(self.template, h), len(self.template) - 1)
            informative = h[self.template[at] != h]
            h = informative if len(informative) else h
        m = self._template.copy()
        if len(h):
            m.update_batch(np.unique(((h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)))
        return m

    def add(self, key: Any, text: str) -> Any | None:
        """Index `text` under `key` unless it near-duplicates an indexed text; then return that key."""
        m = self.minhash(text)
        candidates = [(self.signatures[k].jaccard(m), k) for k in self.lsh.query(m)]
        best = max((c for c in candidates if c[0] >= self.threshold), default=None, key=lambda c: c[0])
        if best is not None:
            return best[1]
        self.lsh.insert(key, m)
        self.signatures[key] = m
        return None


# ------------------------------------------------------------------ the pipeline

def near_dup_text(conv: Conversation) -> str:
    """The text near-duplicates are judged on: the conversation without its system prompt (one prompt
    shared by every record is no likeness), and a preference pair's rejected answer."""
    rejected = rejected_answer(conv)
    return conversation_text(conv, system=False) + ("" if rejected is None else f"\n{rejected}")


def _snippet(text: str, n: int = 160) -> str:
    text = _SPACE.sub(" ", text).strip()
    return text if len(text) <= n else text[: n - 1] + "…"


def curate(conversations: Iterable[Conversation], options: CurateOptions | None = None, *, tokenizer=None,
           reference: Sequence[Conversation] = (), progress: bool = False) -> tuple[list[Conversation], CurateReport]:
    """Filter `conversations` in order; the first of each duplicate group is kept.

    `reference` conversations seed the duplicate indexes (their duplicates are removed) but
    are neither filtered nor returned: augmentation uses it so it never re-adds a source.
    `tokenizer` is needed only for `min_tokens` / `max_tokens`.
    """
    from tqdm import tqdm

    from sftlab.data.load import eval_source, load_conversations

    opts = options or CurateOptions()
    convs = list(conversations)
    report = CurateReport(records_in=len(convs))
    lengths = _token_lengths(convs, opts, tokenizer)
    hasher = WordHasher()
    evals = (eval_source(spec) for spec in opts.decontaminate)
    contamination = EvalNgrams((c for path, split in evals for c in load_conversations(path, split=split)),
                               opts.decontam_ngram, opts.decontam_template_df, opts.decontam_min_overlap,
                               hasher) if opts.decontaminate else None
    indexes: dict[bool | None, NearDupIndex] = {}  # one near-dup index per preference label
    template = template_shingles(map(near_dup_text, [*reference, *convs]), opts.near_dedup_template_share,
                                 opts.near_dedup_ngram, hasher) if opts.near_dedup else None

    def near_duplicate(key: Any, conv: Conversation) -> Any | None:
        label = preference_label(conv)
        if label not in indexes:
            indexes[label] = NearDupIndex(opts.near_dedup_threshold, opts.num_perm, opts.near_dedup_ngram, hasher,
                                          template)
        return indexes[label].add(key, near_dup_text(conv))

    seen: dict[bytes, Conversation] = {}
    first: dict[Any, Conversation] = {}  # near-dup index key -> the conversation kept under it
    for j, ref in enumerate(reference):
        seen.setdefault(exact_key(ref), ref)
        if opts.near_dedup and near_duplicate(("ref", j), ref) is None:
            first[("ref", j)] = ref
    quality = [(name, *QUALITY_FILTERS[name]) for name in QUALITY_FILTERS if getattr(opts, name)]

    def remove(conv: Conversation, reason: str, detail: str, duplicate_of: Conversation | None = None) -> None:
        report.removed[reason] += 1
        entry: dict[str, Any] = {"source": conv.source, "reason": reason, "detail": detail}
        if duplicate_of is not None:
            entry["duplicate_of"] = duplicate_of.source
        report.removals.append(entry | {"record": conv.to_json()})
        shown = report.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            ex = {**entry, "text": _snippet(conversation_text(conv))}
            if duplicate_of is not None:
                ex["duplicate_of_text"] = _snippet(conversation_text(duplicate_of))
            shown.append(ex)

    kept = []
    for i, conv in enumerate(tqdm(convs, desc="curate", unit="conv", disable=not progress)):
        if opts.pii:
            conv = _scrubbed(conv, report.pii)
        bad = next(((reason, d) for _, reason, check in quality for p, a in answer_pairs(conv)
                    if (d := check(p, a, opts))), None)
        if bad:
            remove(conv, *bad)
            continue
        if lengths is not None:
            n = lengths[i]
            if opts.min_tokens and n < opts.min_tokens:
                remove(conv, "too few tokens", f"{n} tokens < {opts.min_tokens}")
                continue
            if opts.max_tokens and n > opts.max_tokens:
                remove(conv, "too many tokens", f"{n} tokens > {opts.max_tokens}")
                continue
        if opts.exact_dedup:
            key = exact_key(conv)
            if key in seen:
                remove(conv, "exact duplicate", "same normalised text", seen[key])
                continue
            seen[key] = conv
        if contamination is not None:
            hit = contamination.match(conv)
            if hit is not None:
                remove(conv, "contaminated", f"contains {hit[1]:.0%} of the {opts.decontam_ngram}-grams of {hit[0]}")
                continue
        if opts.near_dedup:
            dup = near_duplicate(i, conv)
            if dup is not None:
                remove(conv, "near duplicate", f"estimated Jaccard ≥ {opts.near_dedup_threshold}", first[dup])
                continue
            first[i] = conv
        kept.append(conv)
    report.kept = len(kept)
    return kept, report


def _token_lengths(convs: list[Conversation], opts: CurateOptions, tokenizer) -> list[int] | None:
    if opts.min_tokens is None and opts.max_tokens is None:
        return None
    if tokenizer is None:
        raise SftlabError("min_tokens / max_tokens need a tokenizer: pass --model (or set the model in the config)")
    from sftlab.data.validate import token_lengths

    return token_lengths(convs, tokenizer)
