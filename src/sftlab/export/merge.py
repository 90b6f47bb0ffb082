"""Merge a run's LoRA/DoRA adapter into its base and save a plain transformers model.

The result loads with `AutoModelForCausalLM.from_pretrained(OUT)` alone (a vision-language model that
transformers maps to AutoModelForImageTextToText only, with that: Mistral 3, Qwen2.5-VL, Qwen3-VL), stops at the chat
template's end-of-turn token (generation_config.eos_token_id), and is verified: its logits
equal the unmerged adapter model's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sftlab.errors import SftlabError
from sftlab.export.verify import VerifyResult, declared_eos, prompt_ids, torch_logits

# fp32 max abs logits diff, merged vs base + adapter: at least MERGE_TOLERANCE, and MERGE_RELATIVE of
# the largest logit (fp32 rounding grows with the logits' scale: SmolLM2 after a LoRA run that moved
# its logits by up to 7.5, max |logit| 43: merge diff 1.5e-4, 3.5e-6 of the largest logit)
MERGE_TOLERANCE = 1e-4
MERGE_RELATIVE = 2e-5


def prepare_out_dir(out_dir: str | Path) -> tuple[Path, Path]:
    """(final dir, temp dir next to it). Refuses to overwrite a non-empty folder."""
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise SftlabError(f"output folder {out} exists and is not empty; choose another or remove it")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return out, tmp


def finish_out_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def merge_run(run_dir: str | Path, out_dir: str | Path, *, tolerance: float | None = None) -> VerifyResult:
    """Merge RUN's adapter into its base (fp32), save to OUT, reload it plainly and compare logits."""
    import torch

    from sftlab.models import (check_model, is_run_dir, load_model, load_tokenizer, model_auto_class, not_found,
                               run_artifacts)
    from sftlab.serve.generation import stop_token_ids

    if not Path(run_dir).expanduser().exists():
        raise not_found("run folder", str(run_dir))
    if not is_run_dir(run_dir):
        check_model(str(run_dir))  # a run still training or stopped, or no model at all: said as every command says it
        raise SftlabError(f"{run_dir} is a model, not a training run (no run.json): merging needs a run with an adapter")
    art = run_artifacts(run_dir)
    if not art["adapter"] and not art["model"]:
        raise SftlabError(f"{run_dir} has neither adapter/ nor model/: the run did not finish")
    out, tmp = prepare_out_dir(out_dir)
    tokenizer = load_tokenizer(str(run_dir))
    model = load_model(str(run_dir), dtype="float32").eval()
    ids = prompt_ids(tokenizer)
    reference = [torch_logits(model, x) for x in ids]
    merged = model.merge_and_unload() if art["adapter"] else model
    # the config's EOS (a multimodal model keeps it in its text_config) and the generation_config's, which the run's
    # evaluation and serving stop on too
    stops = stop_token_ids(tokenizer, declared_eos(merged.config, merged.generation_config.eos_token_id))
    merged.generation_config.eos_token_id = stops
    if merged.generation_config.pad_token_id is None:
        merged.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    trained_class = type(merged).__name__
    auto = model_auto_class(merged.config)
    del model, merged

    # as a user loads it: AutoModelForCausalLM, or AutoModelForImageTextToText for the vision-language models
    # transformers maps there alone (Mistral 3, Qwen2.5-VL, Qwen3-VL); vision towers and all
    reloaded = auto.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True).eval()
    if type(reloaded).__name__ != trained_class:
        raise SftlabError(f"the merged model in {tmp} reloads with {auto.__name__} as {type(reloaded).__name__}, "
                          f"not as the {trained_class} it was saved from")
    diff = max(float(abs(torch_logits(reloaded, x) - r).max()) for x, r in zip(ids, reference))
    if tolerance is None:
        tolerance = max(MERGE_TOLERANCE, MERGE_RELATIVE * max(float(abs(r).max()) for r in reference))
    result = VerifyResult("merged", str(out), max_abs_diff=diff, tolerance=tolerance, prompts=len(ids),
                          metrics={"eos_token_id": stops})
    info = json.loads((Path(run_dir) / "run.json").read_text())
    (tmp / "README.md").write_text(model_card(info, art, result, stops, tokenizer, auto.__name__), encoding="utf-8")
    finish_out_dir(tmp, out)
    return result


def model_card(info: dict, art: dict, result: VerifyResult, stops: list[int], tokenizer,
               auto_class: str = "AutoModelForCausalLM") -> str:
    adapter = ""
    if art["adapter"]:
        cfg = json.loads((Path(art["adapter"]) / "adapter_config.json").read_text())
        kind = "DoRA" if cfg.get("use_dora") else "LoRA"
        adapter = (f"- adapter: {kind} r={cfg.get('r')}, alpha={cfg.get('lora_alpha')}, "
                   f"targets={cfg.get('target_modules')}, merged into the base weights\n")
    stop_tokens = ", ".join(f"`{tokenizer.convert_ids_to_tokens(i)}` ({i})" for i in stops)
    return f"""---
library_name: transformers
base_model: {info.get("base_model")}
tags: [sftlab, merged]
---
# Merged fine-tuned model

Exported by `sftlab export --to merged` from a training run.

- base model: `{info.get("base_model")}`
- method: {info.get("method", "unknown")}
{adapter}- weights: safetensors, float32
- stop tokens (generation_config.eos_token_id): {stop_tokens}
- verification: logits vs the unmerged adapter model, max abs diff {result.max_abs_diff:.3g} on {result.prompts} chat prompts (bound {result.tolerance:g})

## Use

```python
from transformers import {auto_class}, AutoTokenizer
tok = AutoTokenizer.from_pretrained("PATH")
model = {auto_class}.from_pretrained("PATH")
ids = tok.apply_chat_template([{{"role": "user", "content": "Hello"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)["input_ids"]
print(tok.decode(model.generate(ids, max_new_tokens=64)[0, ids.shape[1]:], skip_special_tokens=True))
```

or `sftlab serve PATH` / `sftlab chat PATH`.
"""
