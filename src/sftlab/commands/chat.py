"""`sftlab chat RUN_OR_MODEL`: a terminal chat."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.command()
def chat(
    source: str = typer.Argument(..., help="A training run folder, a model folder, a .gguf file, or 'default'."),
    system: str = typer.Option(None, help="System message at the start of the conversation."),
    max_tokens: int = typer.Option(256, help="Longest reply, in tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
) -> None:
    """Chat with history and streaming; /reset clears the history, /exit quits."""
    from sftlab.serve.chat import chat_loop

    chat_loop(source, system=system, max_tokens=max_tokens, temperature=temperature)
