"""`sftlab data inspect`: show rendered examples with the trained tokens highlighted, or as JSON."""

from __future__ import annotations

import json
import sys

from sftlab.data.render import IGNORE, RenderOptions, render


def inspect_file(
    path: str,
    *,
    model: str = "default",
    chat_template: str | None = None,
    as_json: bool = False,
    limit: int | None = 3,
    format: str | None = None,
    train_on: str = "all",
) -> None:
    from sftlab.data.load import load_conversations
    from sftlab.models import load_tokenizer

    tokenizer = load_tokenizer(model, chat_template=chat_template)
    conversations = load_conversations(path, format=format)
    if limit is not None:
        conversations = conversations[:limit]
    options = RenderOptions(train_on=train_on)
    for conv in conversations:
        ex = render(conv, tokenizer, options)
        if as_json:
            print(json.dumps({"source": ex.source, "input_ids": ex.input_ids, "labels": ex.labels}))
        else:
            _print_example(ex, tokenizer)


def token_pieces(ex, tokenizer) -> list[tuple[str, bool]]:
    """The example's tokens as (decoded text, trained) pairs, in order."""
    return [(tokenizer.decode([tok]), lab != IGNORE) for tok, lab in zip(ex.input_ids, ex.labels)]


def _print_example(ex, tokenizer) -> None:
    from rich.console import Console
    from rich.text import Text

    console = Console(file=sys.stdout, highlight=False)
    text = Text()
    for piece, trained in token_pieces(ex, tokenizer):
        text.append(piece, style="bold green on grey15" if trained else "dim")
    console.rule(ex.source)
    console.print(text)
    console.print(f"[dim]{len(ex)} tokens, {ex.num_trained} trained (highlighted green)[/]")
