"""`sftlab export RUN_OR_MODEL --to merged|onnx|triton|gguf OUT`."""

from __future__ import annotations

import typer

from sftlab.errors import SftlabError

app = typer.Typer(add_completion=False, no_args_is_help=True)
TARGETS = ("merged", "onnx", "triton", "gguf")


@app.command()
def export(
    source: str = typer.Argument(..., help="A training run folder, a model folder, a .gguf file, or 'default'."),
    out: str = typer.Argument(..., help="Output folder (must not exist or be empty)."),
    to: str = typer.Option(..., "--to", help="merged | onnx | triton | gguf"),
    precision: str = typer.Option("fp32", help="ONNX precision: fp32 | fp16 | int4 (onnx, and triton --engine onnx)."),
    engine: str = typer.Option("torch", help="Triton: what the Python-backend model runs: torch | onnx."),
    name: str = typer.Option("sftlab", help="Triton: model name in the repository."),
    max_batch_size: int = typer.Option(8, help="Triton: dynamic batching maximum batch size."),
    queue_delay_us: int = typer.Option(5000, help="Triton: dynamic batching queue delay (microseconds)."),
    quant: str = typer.Option("f16", "--quant", help="GGUF: f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1; k-quants "
                               "(q4_k_m ...) with llama.cpp's llama-quantize on PATH."),
) -> None:
    """Export and verify: merged safetensors, an ONNX KV-cache model, a Triton model repository, or GGUF."""
    if to not in TARGETS:
        raise SftlabError(f"unknown export target '{to}'; choose one of {', '.join(TARGETS)}")
    if to == "merged":
        from sftlab.export.merge import merge_run

        result = merge_run(source, out)
    elif to == "onnx":
        from sftlab.export.onnx import export_onnx

        result = export_onnx(source, out, precision=precision)
    elif to == "gguf":
        from sftlab.export.gguf import export_gguf

        result = export_gguf(source, out, quant=quant)
    else:
        from sftlab.export.triton import export_triton

        result = export_triton(source, out, engine=engine, name=name, max_batch_size=max_batch_size,
                               queue_delay_us=queue_delay_us, precision=precision)
    print("\n".join(result.lines()))
    if not result.ok:
        raise SftlabError(f"the {to} export in {out} did not pass verification (see above): it is kept there to "
                          "inspect; do not deploy it")
