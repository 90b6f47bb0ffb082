"""`sftlab serve RUN_OR_MODEL`: an OpenAI-compatible HTTP server."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.command()
def serve(
    source: str = typer.Argument(..., help="Run, model folder, .gguf, 'default', ONNX export or Triton repository."),
    backend: str = typer.Option("torch", help="torch | onnx | triton"),
    host: str = typer.Option("127.0.0.1", help="Address to bind; the default accepts local connections only."),
    port: int = typer.Option(8000, help="Port."),
    api_key: str = typer.Option(None, envvar="SFTLAB_API_KEY", help="Require 'Authorization: Bearer KEY'."),
    api_key_file: Path = typer.Option(None, envvar="SFTLAB_API_KEY_FILE",
                                      help="Read the API key from this file's first line (not shown in `ps`)."),
    max_body_bytes: int = typer.Option(1_000_000, help="Reject larger request bodies (413), while they stream in."),
    max_concurrent: int = typer.Option(64, min=1, help="Requests in flight at once (streams included); more get 429."),
    body_timeout: float = typer.Option(30.0, min=0.1, help="Seconds a request body may take to arrive (408 after)."),
    keep_alive_timeout: int = typer.Option(5, min=1, help="Seconds an idle keep-alive connection stays open."),
    header_timeout: float = typer.Option(10.0, min=0.1, help="Seconds a request's headers may take to arrive "
                                                                "(the connection is closed after)."),
    max_connections: int = typer.Option(512, min=1, help="Open connections served at once; requests on more get 503."),
    max_prompt_tokens: int = typer.Option(4096, help="Reject longer prompts (400)."),
    max_tokens_limit: int = typer.Option(1024, help="Largest max_tokens a request may ask for (400 above)."),
    default_max_tokens: int = typer.Option(256, help="max_tokens when a request gives none."),
    max_batch_size: int = typer.Option(8, help="Requests decoded together (torch/onnx)."),
    batch_wait_ms: float = typer.Option(5.0, help="How long to collect requests into a batch (torch/onnx)."),
    batching: str = typer.Option("auto", help="continuous: a request joins the running batch at the next decode "
                                              "step and leaves it when done (torch); static: a batch is decoded "
                                              "to its end before the next starts; auto: continuous where the "
                                              "model allows it."),
    model_name: str = typer.Option(None, help="Model id reported by /v1/models (default: the source's name)."),
) -> None:
    """Serve /v1/chat/completions (SSE streaming too), /v1/completions, /v1/models and /health."""
    from sftlab.serve.backends import load_backend
    from sftlab.serve.guard import read_api_key
    from sftlab.serve.openai_api import Limits, create_app, run_server

    api_key = read_api_key(api_key, api_key_file)
    limits = Limits(max_body_bytes=max_body_bytes, max_concurrent=max_concurrent, body_timeout=body_timeout,
                    max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
                    default_max_tokens=default_max_tokens)
    be = load_backend(source, backend, max_batch_size=max_batch_size, max_wait_ms=batch_wait_ms, batching=batching)
    name = model_name or Path(source).name or source
    try:
        run_server(create_app(be, name, api_key=api_key, limits=limits), host=host, port=port, api_key=api_key,
                   keep_alive_timeout=keep_alive_timeout, header_timeout=header_timeout, max_connections=max_connections)
    finally:
        be.close()
