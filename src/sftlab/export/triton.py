"""A Triton Inference Server model repository for a run or model (Python backend).

    OUT/<name>/config.pbtxt        text in (BYTES), text out, dynamic batching
    OUT/<name>/1/model.py          the Python-backend model (sftlab/export/triton_model.py)
    OUT/<name>/1/sftlab/           sftlab's own source, which it imports: the batched engines
                                   (serve/generation.py) and the chat-template reading they share with
                                   training (stop tokens, tool-call arguments), so Triton needs only
                                   torch + transformers installed, not sftlab
    OUT/<name>/1/weights/          merged safetensors (engine "torch") or the ONNX export (engine "onnx")

The weights are verified on the way (merge: logits vs adapter model; ONNX: vs PyTorch).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from sftlab.errors import SftlabError
from sftlab.export.merge import finish_out_dir, prepare_out_dir
from sftlab.export.verify import VerifyResult, verify_saved

ENGINES = ("torch", "onnx")

CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [
  {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }}
]
output [
  {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "finish_reason" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "prompt_tokens" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "completion_tokens" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "logprobs" data_type: TYPE_STRING dims: [ 1 ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {queue_delay_us}
}}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters {{ key: "engine" value: {{ string_value: "{engine}" }} }}
parameters {{ key: "default_max_tokens" value: {{ string_value: "{default_max_tokens}" }} }}
parameters {{ key: "max_tokens_limit" value: {{ string_value: "{max_tokens_limit}" }} }}
"""


def write_model_code(version: Path) -> None:
    """The Python-backend model and the sftlab source it imports, into a model version folder."""
    here = Path(__file__).resolve().parent
    shutil.copy(here / "triton_model.py", version / "model.py")
    shutil.copytree(here.parent, version / "sftlab", ignore=shutil.ignore_patterns("__pycache__"))


def export_triton(source: str, out_dir: str | Path, *, engine: str = "torch", name: str = "sftlab",
                  max_batch_size: int = 8, queue_delay_us: int = 5000, default_max_tokens: int = 256,
                  max_tokens_limit: int = 4096, precision: str = "fp32") -> VerifyResult:
    """Write a Triton model repository serving SOURCE (run, HF folder, GGUF or `default`)."""
    from sftlab.export.merge import merge_run
    from sftlab.export.onnx import export_onnx, hf_folder
    from sftlab.models import is_run_dir

    if engine not in ENGINES:
        raise SftlabError(f"unknown Triton engine '{engine}'; choose one of {', '.join(ENGINES)}")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise SftlabError(f"model name '{name}' must be letters, digits, '-' or '_'")
    out, tmp = prepare_out_dir(out_dir)
    version = tmp / name / "1"
    version.mkdir(parents=True)
    try:
        if engine == "onnx":
            result = export_onnx(source, version / "weights", precision=precision)
        elif is_run_dir(source):
            result = merge_run(source, version / "weights")
        else:
            with tempfile.TemporaryDirectory(prefix="sftlab-triton-") as work:
                hf_dir = hf_folder(source, Path(work))
                shutil.copytree(hf_dir, version / "weights")
            result = verify_saved(source, version / "weights")
        write_model_code(version)
        (tmp / name / "config.pbtxt").write_text(CONFIG.format(
            name=name, max_batch_size=max_batch_size, queue_delay_us=queue_delay_us, engine=engine,
            default_max_tokens=default_max_tokens, max_tokens_limit=max_tokens_limit))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finish_out_dir(tmp, out)
    return dataclasses.replace(result, target=f"triton ({engine})", out_dir=str(out))
