"""One module per CLI command; each exposes a typer `app` and only parses arguments."""
