"""ONNX export with onnxruntime-genai's model builder: a KV-cache decoder graph plus the
genai config, tokenizer and chat template, so the folder is ready for generation
(`onnxruntime_genai.Model(OUT)`, `sftlab serve OUT --backend onnx`).

Every export verifies itself against the PyTorch model, with bounds that can fail (`BOUNDS`):
fp32 and fp16 on the logits of chat prompts and a fixed text (max abs diff), fp32 also on
identical greedy generations, fp16 on the top-1 agreement; int4, where logits are expected
to move, on the NLL increase over a fixed English text and the top-1 (teacher-forced greedy)
agreement. The int4 and fp16 bounds were set on SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised),
a real trained model, and are tested there, each also against a planted corrupted weight
(tests/integration/test_deploy_export.py): on a random model, near-uniform predictions make
top-1 agreement meaningless.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from sftlab.errors import SftlabError
from sftlab.export.merge import finish_out_dir, merge_run, prepare_out_dir
from sftlab.export.verify import (Check, VerifyResult, compare_logits, prompt_ids, saved_eos, torch_greedy,
                                  torch_logits)

PRECISIONS = ("fp32", "fp16", "int4")
# logits: max abs diff (prompts + fixed text); top1: share of positions with the same argmax;
# nll: |mean NLL change| on FIXED_TEXT (nats per token).
# Measured on SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised; CPU): fp16 max abs diff 0.21,
# top-1 0.996; int4 NLL +0.16 (2.94 -> 3.10), top-1 0.59. With one layer norm's sign flipped:
# int4 NLL +1.02, top-1 0.43; fp16 max abs diff 35.2, top-1 0.56.
BOUNDS = {
    "fp32": {"logits": 1e-3},
    "fp16": {"logits": 1.0, "top1": 0.98},
    "int4": {"nll": 0.5, "top1": 0.5},
}
GREEDY_TOKENS = 16
# model_types whose builder output has been exported and verified here; others fail in the
# builder (gpt2, gpt_neox, cohere, olmo2, mixtral, qwen3_moe: not supported; gemma3_text: its
# per-layer rope parameters) or in the verification (gemma2: a sliding-window cache that a
# first pass cannot feed; phi: partial rotary at some head sizes).
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "granite", "smollm3")


def check_architecture(source: str, supported, export: str) -> None:
    """Refuse SOURCE before any merging or converting when its model_type is not in `supported`."""
    from sftlab.estimate import load_model_config

    model_type = load_model_config(source).model_type
    if model_type not in supported:
        raise SftlabError(f"{export} export supports {', '.join(supported)}; this model is '{model_type}' "
                          "(export --to merged for a plain transformers folder)")


def hf_folder(source: str, workdir: Path) -> Path:
    """A plain transformers folder for SOURCE: a run is merged first (verified), a GGUF converted."""
    from sftlab.models import is_run_dir, load_model, load_tokenizer, resolve_model_path

    if is_run_dir(source):
        result = merge_run(source, workdir / "merged")
        print("\n".join(result.lines()), flush=True)
        if not result.ok:
            raise SftlabError("merging the run's adapter failed verification; not exporting")
        return workdir / "merged"
    path, gguf = resolve_model_path(source)
    if not gguf and (Path(path) / "config.json").exists():
        return Path(path)
    model, tokenizer = load_model(source, dtype="float32"), load_tokenizer(source)
    model.save_pretrained(workdir / "hf", safe_serialization=True)
    tokenizer.save_pretrained(workdir / "hf")
    return workdir / "hf"


def build(hf_dir: Path, out: Path, precision: str, cache: Path) -> None:
    """Run the onnxruntime-genai model builder (CPU target) in a subprocess."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(cache)]
    print(f"Building ONNX ({precision}) with onnxruntime-genai ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0 or not (out / "model.onnx").exists():
        log = out.parent / f"{out.name.removesuffix('.partial')}-onnx-builder.log"  # beside OUT: the failed folder goes
        log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
        said = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise SftlabError(f"the onnxruntime-genai model builder cannot convert this model ({said}); its output "
                          f"is in {log}. Export --to merged for a plain transformers folder")


def onnx_logits(session, ids: list[int], kv: dict) -> np.ndarray:
    """Full-prompt logits from the KV-cache graph, starting from an empty cache."""
    feeds = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
    names = {i.name: i for i in session.get_inputs()}
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
    for name, spec in names.items():
        if name.startswith("past_key_values"):
            dtype = np.float16 if "float16" in spec.type else np.float32
            feeds[name] = np.zeros((1, kv["num_key_value_heads"], 0, kv["head_size"]), dtype=dtype)
    return session.run(["logits"], feeds)[0][0].astype(np.float32)


def set_stop_tokens(out: Path, stops: list[int]) -> None:
    """The genai generator stops on every end-of-turn/EOS token, not only the config's first EOS."""
    path = out / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    path.write_text(json.dumps(config, indent=4))


def verify(hf_dir: Path, out: Path, precision: str) -> VerifyResult:
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.serve.generation import GenRequest, OnnxEngine

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True).eval()
    engine = OnnxEngine.from_pretrained(out)
    stops = sorted(engine.stop_ids)
    kv = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = prompt_ids(tokenizer)
    compared = compare_logits(partial(torch_logits, model), partial(onnx_logits, session, kv=kv), tokenizer)
    del session
    want = [torch_greedy(model, x, stops, GREEDY_TOKENS) for x in ids]
    bounds = BOUNDS[precision]
    result = VerifyResult(f"onnx {precision}", str(out), max_abs_diff=compared.max_abs_diff,
                          tolerance=bounds.get("logits"), prompts=compared.inputs)
    try:
        got = [r.tokens for r in engine.generate([GenRequest(x, GREEDY_TOKENS) for x in ids])]
    except RuntimeError as e:  # onnxruntime-genai could not run the graph: the export is not usable
        result.checks.append(Check("onnxruntime-genai generation ran (1 = yes)", 0.0, 1.0, at_least=True))
        result.metrics["generation error"] = str(e).splitlines()[0][:300]
        got = [[] for _ in ids]
    if precision == "fp32":
        result.tokens_equal = want == got
    result.checks += compared.checks(bounds)
    result.metrics["top-1 agreement"] = compared.top1
    same = sum(_common_prefix(w, g) for w, g in zip(want, got))
    result.metrics |= {"mean NLL PyTorch (fixed text)": compared.nll_reference,
                       f"mean NLL ONNX {precision} (fixed text)": compared.nll_export,
                      "greedy generation: tokens before the first divergence": f"{same}/{sum(map(len, want))}"}
    return result


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def export_onnx(source: str, out_dir: str | Path, *, precision: str = "fp32") -> VerifyResult:
    """Export SOURCE (run, HF folder, GGUF or `default`) to an onnxruntime-genai folder and verify it."""
    if precision not in PRECISIONS:
        raise SftlabError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    from sftlab.serve.generation import stop_token_ids

    check_architecture(source, ARCHS, "ONNX")
    out, tmp = prepare_out_dir(out_dir)
    try:
        with tempfile.TemporaryDirectory(prefix="sftlab-onnx-") as work:
            work = Path(work)
            hf_dir = hf_folder(source, work)
            build(hf_dir, tmp, precision, work / "cache")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(hf_dir)
            set_stop_tokens(tmp, stop_token_ids(tokenizer, saved_eos(hf_dir)))
            tokenizer.save_pretrained(tmp)
            result = verify(hf_dir, tmp, precision)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.out_dir = str(out)
    (tmp / "sftlab_export.json").write_text(json.dumps({"source": str(source), "precision": precision,
                                                         "verification": result.to_dict()}, indent=2))
    finish_out_dir(tmp, out)
    return result
