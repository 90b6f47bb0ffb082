"""ONNX export with onnxruntime-genai's model builder: a KV-cache decoder graph plus the
genai config, tokenizer and chat template, so the folder is ready for generation
(`onnxruntime_genai.Model(OUT)`, `sftlab serve OUT --backend onnx`).

Every export verifies itself against the PyTorch model: logits on chat prompts (max abs
diff) and greedy tokens; for int4, where logits are expected to move, the metric delta
(mean token NLL / perplexity on the same prompts) and the greedy-token agreement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from sftlab.errors import SftlabError
from sftlab.export.merge import finish_out_dir, merge_run, prepare_out_dir
from sftlab.export.verify import VerifyResult, mean_nll, prompt_ids, torch_greedy, torch_logits

PRECISIONS = ("fp32", "fp16", "int4")
TOLERANCE = {"fp32": 1e-3, "fp16": None, "int4": None}
GREEDY_TOKENS = 16


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
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SftlabError(f"the onnxruntime-genai model builder failed:\n{tail}")


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
    diffs, nll_pt, nll_ox = [], [], []
    for x in ids:
        ref, got = torch_logits(model, x), onnx_logits(session, x, kv)
        diffs.append(float(abs(ref - got).max()))
        nll_pt.append(mean_nll(ref, x))
        nll_ox.append(mean_nll(got, x))
    del session
    want = [torch_greedy(model, x, stops, GREEDY_TOKENS) for x in ids]
    got = [r.tokens for r in engine.generate([GenRequest(x, GREEDY_TOKENS) for x in ids])]
    result = VerifyResult(f"onnx {precision}", str(out), max_abs_diff=max(diffs), tolerance=TOLERANCE[precision],
                          prompts=len(ids))
    if precision == "int4":
        pt, ox = float(np.mean(nll_pt)), float(np.mean(nll_ox))
        same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
        total = sum(max(len(w), len(g)) for w, g in zip(want, got))
        result.metrics = {"mean NLL PyTorch": pt, "mean NLL ONNX int4": ox, "NLL delta": ox - pt,
                          "perplexity delta": float(np.exp(ox) - np.exp(pt)),
                          "greedy token agreement": f"{same}/{total}"}
    else:
        result.tokens_equal = want == got
    return result


def export_onnx(source: str, out_dir: str | Path, *, precision: str = "fp32") -> VerifyResult:
    """Export SOURCE (run, HF folder, GGUF or `default`) to an onnxruntime-genai folder and verify it."""
    if precision not in PRECISIONS:
        raise SftlabError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    from sftlab.serve.generation import stop_token_ids

    out, tmp = prepare_out_dir(out_dir)
    try:
        with tempfile.TemporaryDirectory(prefix="sftlab-onnx-") as work:
            work = Path(work)
            hf_dir = hf_folder(source, work)
            build(hf_dir, tmp, precision, work / "cache")
            from transformers import AutoConfig, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(hf_dir)
            set_stop_tokens(tmp, stop_token_ids(tokenizer, AutoConfig.from_pretrained(hf_dir).eos_token_id))
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
