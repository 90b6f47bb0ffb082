"""ONNX (onnxruntime-genai, fp32 and int4) vs PyTorch generation speed on
SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised).

    python bench/onnx_bench.py [--new-tokens 64] [--out bench/.cache/onnx]

Both engines get the same number of CPU threads (--threads, default 1: on a shared
machine, PyTorch's OpenMP threads spin and collapse under contention). Greedy decoding, batch 1, a fixed number of new tokens per prompt (EOS ignored), median of
the prompts. Prints each export's verification (logits diff / int4 metric delta) too.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

PROMPTS = ["Explain photosynthesis to a child.", "Write a short poem about the sea.",
           "What are three uses of Python?"]


def torch_speed(model_dir: Path, new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rates = []
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        rates.append(new_tokens / (time.perf_counter() - t))
    return statistics.median(rates)


def set_onnx_threads(onnx_dir: Path, threads: int) -> None:
    import json

    path = onnx_dir / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    path.write_text(json.dumps(config, indent=4))


def onnx_speed(onnx_dir: Path, new_tokens: int) -> float:
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(onnx_dir)
    model = og.Model(str(onnx_dir))
    rates = []
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens, do_sample=False)
        t = time.perf_counter()
        gen = og.Generator(model, params)
        gen.append_tokens([ids])
        n = 0
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default="bench/.cache/onnx")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from sftlab.export.onnx import export_onnx
    from sftlab.models import embedded_model_dir

    src = embedded_model_dir()
    rows = [("PyTorch fp32 (transformers generate)", torch_speed(src, args.new_tokens))]
    for precision in ("fp32", "int4"):
        out = Path(args.out) / precision
        if not (out / "genai_config.json").exists():
            t = time.perf_counter()
            result = export_onnx(str(src), out, precision=precision)
            print("\n".join(result.lines()), f"\n  export took {time.perf_counter() - t:.1f} s", flush=True)
        set_onnx_threads(out, args.threads)
        rows.append((f"ONNX {precision} (onnxruntime-genai)", onnx_speed(out, args.new_tokens)))
    base = rows[0][1]
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), greedy, batch 1, {args.new_tokens} new tokens, "
          f"median of {len(PROMPTS)} prompts, {args.threads} thread(s)")
    print(f"{'engine':40s} {'tokens/s':>9s} {'vs PyTorch':>10s}")
    for name, rate in rows:
        print(f"{name:40s} {rate:9.1f} {rate / base:9.2f}x")


if __name__ == "__main__":
    main()
