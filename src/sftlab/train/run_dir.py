"""The run directory: resolved config, run.json, model card, all written atomically."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from sftlab.files import atomic_write


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("sftlab", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def write_run_json(run_dir: Path, info: dict) -> None:
    path = run_dir / "run.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    atomic_write(path, json.dumps({**old, **info, "versions": versions()}, indent=2, default=str))


def model_card(config, info: dict) -> str:
    train = info.get("train_data", {})
    lines = [
        "---",
        "library_name: " + ("peft" if config.method != "full" else "transformers"),
        f"base_model: {info.get('base_model')}",
        "tags: [sftlab, sft]",
        "---",
        f"# {Path(config.output_dir).name}",
        "",
        f"Fine-tuned with sftlab ({config.method}) from `{info.get('base_model')}`.",
        "",
        "## Training",
        f"- data: `{config.data.train}` — {train.get('examples')} examples, {train.get('trained_tokens')} trained tokens",
        f"- method: {config.method}" + (f" (r={config.lora.r}, alpha={config.lora.alpha}, targets={config.lora.target_modules})" if config.method != "full" else ""),
        f"- learning rate {config.training.learning_rate}, batch {config.training.per_device_train_batch_size} x accumulation {config.training.gradient_accumulation_steps}, epochs {config.training.num_train_epochs}, max_steps {config.training.max_steps}",
        f"- steps: {info.get('global_step')}, final train loss: {info.get('train_loss')}, seconds: {info.get('train_seconds')}",
        "",
        "## Use",
        "```python",
    ]
    if config.method == "full":
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained('RUN/model')",
                  "tokenizer = AutoTokenizer.from_pretrained('RUN/tokenizer')"]
    else:
        lines += ["from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "base = AutoModelForCausalLM.from_pretrained(BASE)",
                  "model = PeftModel.from_pretrained(base, 'RUN/adapter')",
                  "tokenizer = AutoTokenizer.from_pretrained('RUN/tokenizer')"]
    lines += ["```", "", "Or: `sftlab eval RUN --data FILE`, `sftlab chat RUN`, `sftlab export RUN --to merged OUT`.", ""]
    return "\n".join(lines)
