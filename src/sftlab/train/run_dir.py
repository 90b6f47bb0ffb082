"""The run directory: resolved config, run.json, model card, all written atomically; the
checkpoints' own record (config, data digests, trained tokens) and the checks before a
run starts or resumes in it."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from sftlab.errors import SftlabError
from sftlab.files import atomic_write

CHECKPOINT_STATE = "sftlab.json"  # beside transformers' files in each checkpoint-N folder
# What a resumed run may change: how long it goes on, and how often it logs, evaluates and saves.
RESUMABLE_KEYS = frozenset({
    "training.max_steps", "training.num_train_epochs", "training.logging_steps", "training.save_steps",
    "training.save_total_limit", "training.eval_steps", "training.early_stopping_patience",
    "training.report_to", "training.dataloader_num_workers",
})


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


def checkpoints(run_dir: Path) -> list[Path]:
    """RUN/checkpoints/checkpoint-N folders, oldest step first."""
    found = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def refuse_existing_run(run_dir: Path) -> None:
    """A new run must not write into a folder that holds another (finished or crashed) run."""
    found = checkpoints(run_dir)
    if found or (run_dir / "run.json").exists():
        what = found[-1] if found else run_dir / "run.json"
        raise SftlabError(f"{run_dir} already holds a run ({what} exists): pass --resume to continue it, "
                          "or choose another output_dir")


def resume_checkpoint(run_dir: Path, state: dict) -> tuple[Path, dict]:
    """The last checkpoint and its saved state, after checking that the config and the
    data are the ones it was trained with (`state` as `checkpoint_state` builds it)."""
    found = checkpoints(run_dir)
    if not found:
        raise SftlabError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    path = found[-1] / CHECKPOINT_STATE
    if not path.exists():
        raise SftlabError(f"--resume: {path} is missing (the checkpoint was not written by this sftlab, or "
                          "its saving was interrupted): cannot check that config and data match")
    saved = json.loads(path.read_text(encoding="utf-8"))
    old, new = _flatten(saved["config"]), _flatten(state["config"])
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_KEYS)
    if changed:
        diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise SftlabError(f"--resume: the config differs from {found[-1].name}'s ({diffs}); only "
                          f"{', '.join(sorted(RESUMABLE_KEYS))} may change on resume")
    for split, digest in state["data"].items():
        if saved["data"].get(split) != digest:
            raise SftlabError(f"--resume: the {split} data differ from {found[-1].name}'s (the rendered token ids "
                              "or labels changed: data file, tokenizer, chat template or render code)")
    return found[-1], saved


def checkpoint_state(config, data_digests: dict[str, str]) -> dict:
    """What each checkpoint records besides the weights (trained_tokens_seen is added when saving)."""
    return {"config": config.model_dump(mode="json"), "data": data_digests}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
