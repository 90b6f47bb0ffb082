"""`sftlab data inspect`: show rendered examples with the trained tokens highlighted, or as JSON."""

from __future__ import annotations

import json
import sys
from itertools import islice

from sftlab.data.conversation import Conversation, Example
from sftlab.data.formats import Columns
from sftlab.data.load import Reading, as_reading
from sftlab.data.render import IGNORE, RenderOptions, iter_rendered, render
from sftlab.errors import DataError

SCREEN_LIMIT = 3  # examples shown on screen when no limit is given; JSON prints every one


def inspect_file(
    path: str | Reading,
    *,
    model: str = "default",
    chat_template: str | None = None,
    as_json: bool = False,
    limit: int | None = None,
    format: str | Columns | None = None,
    train_on: str = "all",
) -> int:
    """Print the examples of `path` rendered as training renders them; returns how many were shown.

    `limit` None means every example with `as_json`, and the first SCREEN_LIMIT on screen
    (saying how to see more), so a script reading the JSON never loses rows. Given a Reading
    in skip mode, a conversation the chat template cannot render is rejected, not fatal.
    """
    from sftlab.models import load_tokenizer

    tokenizer = load_tokenizer(model, chat_template=chat_template)
    reading = as_reading(path, format)
    shown_limit = limit if limit is not None or as_json else SCREEN_LIMIT
    with reading:
        return _show(reading, tokenizer, as_json, limit, shown_limit, train_on)


def _show(reading: Reading, tokenizer, as_json: bool, limit: int | None, shown_limit: int | None, train_on: str) -> int:
    conversations = iter(reading)
    if shown_limit is not None:
        conversations = islice(conversations, shown_limit + (limit is None))  # one more: is there more?
    shown = 0
    for conv, ex in iter_rendered(conversations, tokenizer, RenderOptions(train_on=train_on)):
        if isinstance(ex, DataError):
            reading.reject(ex, conv.to_json())
            continue
        if shown_limit is not None and shown == shown_limit:
            print(f"(first {shown} examples shown; --limit N shows more, --json prints all)")
            break
        shown += 1
        rejected = _rejected_side(conv, tokenizer)
        if as_json:
            record = {"source": ex.source, "input_ids": ex.input_ids, "labels": ex.labels}
            if isinstance(rejected, Example):
                record["rejected"] = {"input_ids": rejected.input_ids, "labels": rejected.labels}
            print(json.dumps(record))
            continue
        _print_example(ex, tokenizer, "chosen" if rejected is not None else _label_note(conv))
        if isinstance(rejected, Example):
            _print_example(rejected, tokenizer, "rejected: its last answer is scored")
        elif rejected is not None:
            print(f"rejected side: {rejected}")
    return shown


def _rejected_side(conv: Conversation, tokenizer) -> Example | DataError | None:
    """A preference pair's rejected conversation, rendered as alignment scores it (its last answer)."""
    rejected = conv.meta.get("rejected")
    if not isinstance(rejected, list):
        return None
    try:
        return render(Conversation(rejected, source=conv.source, meta={"tools": conv.tools} if conv.tools else {}),
                      tokenizer, RenderOptions(train_on="last"))
    except DataError as e:
        return e


def _label_note(conv: Conversation) -> str | None:
    """What becomes of an unpaired preference (KTO) record: its label decides."""
    label = conv.meta.get("label")
    if label is False:
        return "label: false: not trained by sftlab train"
    return "label: true" if label is True else None


def token_pieces(ex, tokenizer) -> list[tuple[str, bool]]:
    """The example's tokens as (decoded text, trained) pairs, in order."""
    return [(tokenizer.decode([tok]), lab != IGNORE) for tok, lab in zip(ex.input_ids, ex.labels)]


def _print_example(ex, tokenizer, note: str | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.text import Text

    console = Console(file=sys.stdout, highlight=False)
    text = Text()
    for piece, trained in token_pieces(ex, tokenizer):
        text.append(piece, style="bold green on grey15" if trained else "dim")
    source = escape(ex.source)  # user text: a saved DatasetDict's "ds[train]:row 1" is not markup
    console.rule(f"{source} ({note})" if note else source)
    console.print(text)
    console.print(f"[dim]{len(ex)} tokens, {ex.num_trained} trained (highlighted green)[/]")
