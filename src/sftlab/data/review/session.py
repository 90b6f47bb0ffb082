"""A review session: a dataset read through the common loaders, its flags from the
validate/curate checks, and the review log that holds every decision.

Examples are keyed by a hash of their content (plus an occurrence number for exact
repeats), not by their line, so decisions follow the records when lines are inserted
into or removed from the file between sessions. Edits never touch the dataset: they live
in the log and are applied when the reviewed records are exported.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Any

from sftlab.data.conversation import Conversation
from sftlab.data.load import Reading, as_reading
from sftlab.data.review.log import STATUSES, ItemState, ReviewLog
from sftlab.errors import SftlabError

LOG_NAME = "log.jsonl"
MAX_LABEL = 64
MAX_REASON = 1000
_LABEL_BAD = re.compile(r"[\x00-\x1f\x7f]")


class UnknownExample(SftlabError):
    """An id that names no example of this dataset."""


class Conflict(SftlabError):
    """An edit based on text that another tab (or server) has changed since."""

    def __init__(self, current: str):
        self.current = current
        super().__init__("this message was changed elsewhere since you opened it")


def review_dir_for(data: str | Path) -> Path:
    """The review folder of a dataset: `<file>.review/` beside a file or saved dataset,
    `./<id>.review/` for a Hugging Face dataset id."""
    p = Path(data)
    if p.exists():
        return p.with_name(f"{p.name}.review")
    return Path.cwd() / (re.sub(r"[^\w.-]+", "_", str(data)) + ".review")


def item_ids(convs: list[Conversation]) -> list[str]:
    """Stable ids from content: the same record gets the same id wherever it moves in the file."""
    seen: Counter[str] = Counter()
    ids = []
    for conv in convs:
        body = json.dumps(conv.to_json(), sort_keys=True, ensure_ascii=False, default=str)
        key = hashlib.blake2b(body.encode(), digest_size=8).hexdigest()
        seen[key] += 1
        ids.append(key if seen[key] == 1 else f"{key}-{seen[key]}")
    return ids


def own_flags(conv: Conversation) -> list[dict[str, str]]:
    """The flags an example raises on its own (curate's quality heuristics, PII, augmentation
    provenance): recomputed on the edited text after an edit."""
    from sftlab.data.curate import QUALITY_FILTERS, CurateOptions, answer_pairs, scrub_pii

    opts = CurateOptions()
    flags = []
    quality = [(reason, check) for name, (reason, check) in QUALITY_FILTERS.items() if getattr(opts, name)]
    bad = next(((reason, d) for reason, check in quality for p, a in answer_pairs(conv) if (d := check(p, a, opts))),
               None)
    if bad:
        flags.append({"kind": bad[0], "detail": bad[1]})
    found: Counter[str] = Counter()
    for text in _texts(conv):
        scrub_pii(text, found)
    if found:
        flags.append({"kind": "PII", "detail": ", ".join(f"{k} x{n}" for k, n in found.items())})
    if conv.meta.get("augmented_from"):
        origin = conv.meta["augmented_from"]
        origin = ", ".join(origin) if isinstance(origin, list) else str(origin)
        flags.append({"kind": "augmented", "detail": f"from {origin} ({conv.meta.get('augmentation', '?')})"})
    return flags


def compared_flags(convs: list[Conversation]) -> list[list[dict[str, str]]]:
    """Per example, the flags that compare it with the others (exact or near duplicate *of* an
    earlier record), from `sftlab data curate`'s checks."""
    from sftlab.data.curate import QUALITY_FILTERS, CurateOptions, curate

    own = {reason for reason, _ in QUALITY_FILTERS.values()}
    flags: list[list[dict[str, str]]] = [[] for _ in convs]
    by_source = {c.source: i for i, c in enumerate(convs)}
    _, report = curate(convs, CurateOptions())
    for r in report.removals:
        if r["reason"] in own:
            continue
        detail = f"of {r['duplicate_of']} ({r['detail']})" if r.get("duplicate_of") else r["detail"]
        flags[by_source[r["source"]]].append({"kind": r["reason"], "detail": detail})
    return flags


def length_flags(rendered, max_seq_length: int | None) -> tuple[list[dict[str, str]], int | None]:
    """Flags of one rendered example (or the DataError that rejected it), and its token count."""
    if isinstance(rendered, SftlabError):
        return [{"kind": "cannot render", "detail": str(rendered)}], None
    n = len(rendered)
    return ([{"kind": "too long", "detail": f"{n} tokens > {max_seq_length}"}] if max_seq_length and n > max_seq_length
            else []), n


def _render(convs: list[Conversation], tokenizer) -> list:
    """Each conversation's Example (as training renders it) or the DataError that rejected it."""
    from sftlab.data.render import render_many

    return render_many(convs, tokenizer)


def edited(conv: Conversation, state: ItemState) -> Conversation:
    """The conversation with the review's edits applied (raw text is message 0; segment i, message i,
    its label kept)."""
    if not state.edits:
        return conv
    if conv.text is not None:
        return Conversation(source=conv.source, text=state.edits.get(0, conv.text), meta=conv.meta)
    if conv.segments is not None:
        return Conversation(source=conv.source, meta=conv.meta,
                            segments=[(state.edits.get(i, text), trained) for i, (text, trained) in enumerate(conv.segments)])
    messages = [{**m, "content": state.edits.get(i, m["content"])} for i, m in enumerate(conv.messages)]
    return Conversation(messages=messages, source=conv.source, meta=conv.meta)


def review_stats(convs: list[Conversation], log: ReviewLog) -> dict[str, Any]:
    """Review statistics of a dataset (what `sftlab data report` shows)."""
    ids = item_ids(convs)
    states = [log.state(i) for i in ids]
    status = Counter(s.status for s in states)
    labels: Counter[str] = Counter(label for s in states for label in s.labels)
    scores = Counter(s.score for s in states if s.score is not None)
    reasons = Counter(s.reason or "(no reason)" for s in states if s.status == "rejected")
    suggested = [s for s in states if s.suggestion]
    both = [s for s in suggested if s.score is not None and s.suggestion.get("score") is not None]
    return {
        "log": str(log.path), "total": len(convs), "reviewed": len(convs) - status["pending"],
        **{name: status[name] for name in STATUSES},
        "edited": sum(bool(s.edits) for s in states), "labelled": sum(bool(s.labels) for s in states),
        "labels": dict(labels.most_common()), "scores": {str(k): scores[k] for k in sorted(scores)},
        "reject_reasons": dict(reasons.most_common()), "suggested": len(suggested),
        "suggestion_score_agreement": round(sum(s.score == s.suggestion["score"] for s in both) / len(both), 3) if both else None,
        "decisions_not_in_data": len(set(log.states) - set(ids)),
        "log_lines": log.seq, "unreadable_log_lines": len(log.skipped),
    }


class ReviewSession:
    """The examples of one dataset and their review state."""

    def __init__(self, data: str | Path | Reading, *, review_dir: str | Path | None = None, format: str | None = None,
                 split: str | None = None, tokenizer=None, max_seq_length: int | None = None,
                 labels: list[str] | tuple[str, ...] = ()):
        """`data`: a dataset path, read strictly, or a Reading (e.g. in skip mode)."""
        reading = as_reading(data, format, split)
        self.data = reading.path
        self.convs = reading.load()
        if not self.convs:
            raise SftlabError(f"{self.data}: no records to review")
        self.ids = item_ids(self.convs)
        self.index = {item_id: i for i, item_id in enumerate(self.ids)}
        self.dir = Path(review_dir) if review_dir else review_dir_for(self.data)
        self.log = ReviewLog(self.dir / LOG_NAME)
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.labels = [check_label(label) for label in labels]
        self.suggest_status: dict[str, Any] = {"state": "off"}
        self._rechecked: dict[tuple, tuple[list[dict[str, str]], int | None]] = {}  # see checked()

    # ---------------------------------------------------------------- reading

    @cached_property
    def _checked(self) -> tuple[list[tuple[list[dict[str, str]], int | None]], list[list[dict[str, str]]]]:
        """Every example's (flags, token count) as read from the file, and its flags that
        compare it with the other records."""
        compared = compared_flags(self.convs)
        rendered = _render(self.convs, self.tokenizer) if self.tokenizer is not None else [None] * len(self.convs)
        return [self._check(*args) for args in zip(self.convs, compared, rendered)], compared

    def _check(self, conv: Conversation, compared: list[dict[str, str]], rendered) -> tuple[list[dict[str, str]], int | None]:
        flags = own_flags(conv) + compared
        if rendered is None:
            return flags, None
        more, tokens = length_flags(rendered, self.max_seq_length)
        return flags + more, tokens

    @property
    def flags(self) -> list[list[dict[str, str]]]:
        return [flags for flags, _ in self._checked[0]]

    @property
    def tokens(self) -> list[int | None]:
        return [tokens for _, tokens in self._checked[0]]

    def position(self, item_id: str) -> int:
        if item_id not in self.index:
            raise UnknownExample(f"no example with id {item_id!r} in {self.data}")
        return self.index[item_id]

    def current(self, i: int) -> Conversation:
        return edited(self.convs[i], self.log.state(self.ids[i]))

    def checked(self, i: int) -> tuple[list[dict[str, str]], int | None]:
        """Example i's flags and token count as it reads now: after an edit, its own checks
        (quality, PII, length) run on the edited text, and the flags that compared the original
        with other records are kept, marked "(before edit)"."""
        edits = self.log.state(self.ids[i]).edits
        if not edits:
            return self._checked[0][i]
        key = (i, tuple(sorted(edits.items())))
        if key not in self._rechecked:
            conv = self.current(i)
            compared = [{**f, "detail": f"{f['detail']} (before edit)"} for f in self._checked[1][i]]
            rendered = _render([conv], self.tokenizer)[0] if self.tokenizer is not None else None
            self._rechecked[key] = self._check(conv, compared, rendered)
        return self._rechecked[key]

    def item(self, item_id: str) -> dict[str, Any]:
        i = self.position(item_id)
        conv, state = self.convs[i], self.log.state(item_id)
        shown = self.current(i)
        messages = _shown_messages(shown)
        originals = _texts(conv)
        flags, tokens = self.checked(i)
        return {"id": item_id, "index": i, "source": conv.source, "flags": flags, "tokens": tokens,
                "messages": [{**m, **({"original": originals[j]} if j in state.edits else {})}
                             for j, m in enumerate(messages)],
                "meta": conv.meta, **state.to_json()}

    def token_view(self, item_id: str) -> dict[str, Any]:
        """The rendered example as (text, trained) pieces: `sftlab data inspect`'s view."""
        from sftlab.data.inspect import token_pieces

        if self.tokenizer is None:
            raise SftlabError("no tokenizer: start the review with --model to see the trained tokens")
        ex = _render([self.current(self.position(item_id))], self.tokenizer)[0]
        if isinstance(ex, SftlabError):
            raise ex
        return {"tokens": len(ex), "trained": ex.num_trained, "pieces": token_pieces(ex, self.tokenizer)}

    def matching(self, *, status: str | None = None, flag: str | None = None, label: str | None = None,
                 q: str | None = None) -> list[str]:
        """Ids of the examples that pass every given filter, in file order."""
        needle = q.casefold() if q else None
        out = []
        for i, item_id in enumerate(self.ids):
            state = self.log.state(item_id)
            if status and state.status != status:
                continue
            if flag and not any(f["kind"] == flag for f in self.checked(i)[0]):
                continue
            if label and label not in state.labels:
                continue
            if needle:
                conv = self.current(i)
                texts = _texts(conv)
                if not any(needle in t.casefold() for t in [conv.source, *texts]):
                    continue
            out.append(item_id)
        return out

    def progress(self) -> dict[str, int]:
        status = Counter(self.log.state(i).status for i in self.ids)
        return {"total": len(self.ids), "reviewed": len(self.ids) - status["pending"],
                **{name: status[name] for name in STATUSES}, "seq": self.log.seq}

    def flag_counts(self) -> dict[str, int]:
        return dict(Counter(f["kind"] for fl in self.flags for f in fl).most_common())

    def known_labels(self) -> list[str]:
        used = {label for s in self.log.states.values() for label in s.labels}
        return [*self.labels, *sorted(used - set(self.labels))]

    def stats(self) -> dict[str, Any]:
        self.log.refresh()
        return review_stats(self.convs, self.log)

    # ---------------------------------------------------------------- acting

    def act(self, item_id: str, action: dict[str, Any], by: str = "page") -> ItemState:
        """Validate one person's action on an example and append it to the log."""
        i = self.position(item_id)
        kind = action.get("action")
        entry: dict[str, Any] = {"id": item_id, "source": self.convs[i].source, "action": kind, "by": by}
        check = None
        if kind == "reject":
            reason = (action.get("reason") or "").strip()
            if len(reason) > MAX_REASON:
                raise SftlabError(f"the reason is {len(reason)} characters; the limit is {MAX_REASON}")
            entry["reason"] = reason or None
        elif kind == "edit":
            n = len(_texts(self.convs[i]))
            j, content = action.get("message"), action.get("content")
            if not isinstance(j, int) or not 0 <= j < n:
                raise SftlabError(f"edit needs 'message', an index from 0 to {n - 1}")
            if not isinstance(content, str):
                raise SftlabError("edit needs 'content', the new text")
            entry.update(message=j, content=content)
            base = action.get("base")
            if base is not None:
                original = _texts(self.convs[i])[j]

                def check(state: ItemState) -> None:
                    now = state.edits.get(j, original)
                    if now != base and now != content:
                        raise Conflict(now)
        elif kind in ("label", "unlabel"):
            entry["label"] = check_label(action.get("label"))
        elif kind == "score":
            score = action.get("score")
            if score is not None and (not isinstance(score, int) or not 1 <= score <= 5):
                raise SftlabError("score must be an integer from 1 to 5, or null to clear it")
            entry["score"] = score
        elif kind not in ("accept", "reset"):
            raise SftlabError(f"unknown action {kind!r}: accept, reject, reset, edit, label, unlabel or score")
        return self.log.append(entry, check)

    def suggest(self, item_id: str, suggestion: dict[str, Any]) -> ItemState:
        """Record a model's suggestion (shown to the person, who confirms it or not)."""
        entry = {"id": item_id, "source": self.convs[self.position(item_id)].source, "action": "suggest",
                 "by": f"model:{suggestion.get('by', '?')}", "suggestion": suggestion}
        return self.log.append(entry)

    # ---------------------------------------------------------------- export

    def check_export(self, out: str | Path, *also: str | Path) -> None:
        """Refuse to export (`out` and the `also` files written with it) onto the dataset being
        reviewed or into its review folder: either would destroy what the review is based on."""
        data, folder = Path(self.data).resolve(), self.dir.resolve()
        for path in (Path(out), *map(Path, also)):
            target = path.resolve()
            if target == data or (data.is_dir() and data in target.parents):
                raise SftlabError(f"--export {out}: {path} would overwrite the dataset being reviewed; "
                                  "export to a new file")
            if target == folder or folder in target.parents:
                raise SftlabError(f"--export {out}: {path} is inside the review folder {self.dir}; export elsewhere")

    def approved(self) -> list[Conversation]:
        """The accepted examples, edits applied, with provenance and labels under `meta["review"]`
        (a record's own earlier `review` goes under `review.previous`)."""
        self.log.refresh()
        out = []
        for i, item_id in enumerate(self.ids):
            state = self.log.state(item_id)
            if state.status != "accepted":
                continue
            conv = self.current(i)
            review = {"id": item_id, "source": conv.source, "labels": state.labels, "score": state.score,
                      "edited_messages": sorted(state.edits), "reviewed_at": state.reviewed_at}
            if "review" in conv.meta:  # reviewed before (an earlier export): keep that as history
                review["previous"] = conv.meta["review"]
            out.append(Conversation(messages=conv.messages, text=conv.text, source=conv.source,
                                    meta={**conv.meta, "review": review}, segments=conv.segments))
        return out


def _shown_messages(conv: Conversation) -> list[dict[str, Any]]:
    """What the page shows as messages: the chat's, raw text as one "text" message, each segment as a
    "trained" or "context" message (Axolotl's label true / false), in the order edits index them."""
    if conv.text is not None:
        return [{"role": "text", "content": conv.text}]
    if conv.segments is not None:
        return [{"role": "trained" if trained else "context", "content": text} for text, trained in conv.segments]
    return conv.messages


def _texts(conv: Conversation) -> list[str]:
    """The editable texts, indexed as edits index them (see `_shown_messages`)."""
    return [m["content"] for m in _shown_messages(conv)]


def check_label(label: Any) -> str:
    if not isinstance(label, str) or not label.strip():
        raise SftlabError("a label must be a non-empty string")
    label = label.strip()
    if len(label) > MAX_LABEL or _LABEL_BAD.search(label):
        raise SftlabError(f"a label must be at most {MAX_LABEL} characters, without control characters")
    return label
