"""The run directory: resolved config, run.json, model card, all written atomically; the
checkpoints' own record (config, data digests, trained tokens), their atomic commit, and the
checks before a run starts or resumes in it."""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

from sftlab.errors import SftlabError
from sftlab.files import atomic_write, replace_folder

CHECKPOINT_STATE = "sftlab.json"  # beside transformers' files in each checkpoint-N folder
# RUN/checkpoints/.saving/checkpoint-N: a checkpoint being written; renamed into place when whole
STAGING = ".saving"
# What a resumed run may change: how long it goes on, and how often it logs, evaluates and saves.
RESUMABLE_KEYS = frozenset({
    "training.max_steps", "training.num_train_epochs", "training.logging_steps", "training.save_steps",
    "training.save_total_limit", "training.eval_steps", "training.early_stopping_patience",
    "training.report_to", "training.dataloader_num_workers", "training.skip_nonfinite_steps",
    "output_dir",  # the run folder, moved or copied: its checkpoints come with it
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


def model_card(config, info: dict, auto_class: str = "AutoModelForCausalLM") -> str:
    """RUN/README.md; `auto_class`: what loads the base (AutoModelForImageTextToText for the vision-language
    models transformers maps there alone: `models.model_auto_class`)."""
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
        lines += [f"from transformers import {auto_class}, AutoTokenizer",
                  f"model = {auto_class}.from_pretrained('RUN/model')",
                  "tokenizer = AutoTokenizer.from_pretrained('RUN/tokenizer')"]
    else:
        # a named chat template may have added tokens: the adapter holds their rows, on a base grown to them
        lines += ["from peft import PeftModel",
                  f"from transformers import {auto_class}, AutoTokenizer",
                  "tokenizer = AutoTokenizer.from_pretrained('RUN/tokenizer')",
                  f"base = {auto_class}.from_pretrained(BASE)",
                  "if len(tokenizer) > base.get_input_embeddings().num_embeddings:  # tokens the chat template added",
                  "    base.resize_token_embeddings(len(tokenizer))",
                  "model = PeftModel.from_pretrained(base, 'RUN/adapter')"]
    lines += ["```", "", "Or: `sftlab eval RUN --data FILE`, `sftlab chat RUN`, `sftlab export RUN --to merged OUT`.", ""]
    return "\n".join(lines)


def checkpoints(run_dir: Path) -> list[Path]:
    """RUN/checkpoints/checkpoint-N folders, oldest step first."""
    found = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def last_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that `--resume` would pick (one holding sftlab's record)."""
    good = [p for p in checkpoints(run_dir) if (p / CHECKPOINT_STATE).is_file()]
    return good[-1] if good else None


def commit_folder(staged: Path, final: Path) -> None:
    """Make a fully written folder visible under its final name with renames only, after
    syncing its files to disk, so `final` is always complete (the old one or the new one)."""
    for f in staged.rglob("*"):
        if f.is_file():
            _fsync(f)
    replace_folder(staged, final)
    _fsync(final.parent)


def commit_checkpoint(staged: Path, final: Path) -> None:
    """Commit checkpoints/.saving/checkpoint-N as checkpoints/checkpoint-N (which exists when the
    same step is saved again after resuming from an earlier checkpoint)."""
    commit_folder(staged, final)
    try:
        staged.parent.rmdir()  # .saving/, when no other process still writes there
    except OSError:
        pass


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard_interrupted_saves(run_dir: Path) -> list[str]:
    """Delete checkpoints whose saving was interrupted (still under checkpoints/.saving/)."""
    staging = run_dir / "checkpoints" / STAGING
    if not staging.is_dir():
        return []
    names = sorted(p.name for p in staging.iterdir())
    shutil.rmtree(staging, ignore_errors=True)
    return names


def refuse_existing_run(run_dir: Path) -> None:
    """A new run must not write into a folder that holds another (finished or crashed) run."""
    found = checkpoints(run_dir)
    if found or (run_dir / "run.json").exists():
        what = found[-1] if found else run_dir / "run.json"
        raise SftlabError(f"{run_dir} already holds a run ({what} exists): pass --resume to continue it, "
                          "or choose another output_dir")


def resume_checkpoint(run_dir: Path, state: dict) -> tuple[Path | None, dict]:
    """The last checkpoint and its saved state, after checking that the config and the
    data are the ones it was trained with (`state` as `checkpoint_state` builds it).
    (None, {}) for a run stopped before its first checkpoint: it starts again from step 0."""
    found = checkpoints(run_dir)
    if not found:
        if (run_dir / "run.json").exists():
            raise SftlabError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        return None, {}
    last = last_good_checkpoint(run_dir)
    if last is None:
        raise SftlabError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} holds {CHECKPOINT_STATE} (they were "
                          "not written by this sftlab): cannot check that config and data match")
    saved = json.loads((last / CHECKPOINT_STATE).read_text(encoding="utf-8"))
    _refuse_other_world(last, saved, state)
    old, new = _flatten(saved["config"]), _flatten(state["config"])
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_KEYS)
    if changed:
        diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise SftlabError(f"--resume: the config differs from {last.name}'s ({diffs}); only "
                          f"{', '.join(sorted(RESUMABLE_KEYS))} may change on resume")
    for split, digest in state["data"].items():
        if saved["data"].get(split) != digest:
            raise SftlabError(f"--resume: the {split} data differ from {last.name}'s (the rendered token ids "
                              "or labels changed: data file, tokenizer, chat template or render code)")
    return last, saved


def resume_point(run_dir: Path, state: dict, resume: bool, log) -> tuple[Path | None, dict]:
    """With `resume`, `resume_checkpoint` (`log` says where a run has none saved yet and starts from step 0);
    without, (None, {})."""
    if not resume:
        return None, {}
    checkpoint, saved = resume_checkpoint(run_dir, state)
    if checkpoint is None:
        log(f"--resume: no checkpoint saved yet in {run_dir / 'checkpoints'}: starting from step 0")
    return checkpoint, saved


def finished_run(run_dir: Path, saved: dict, state: dict, log) -> dict | None:
    """The run's run.json when `--resume` has nothing left to do (and `log` says so): the run finished at
    the checkpoint it would resume from, and how long it trains (max_steps, epochs) is unchanged.
    Resuming it would only evaluate again and write the outputs over the ones already there."""
    info_path = run_dir / "run.json"
    if not saved or not info_path.exists():
        return None
    info = json.loads(info_path.read_text(encoding="utf-8"))
    old, new = _flatten(saved["config"]), _flatten(state["config"])
    length = ("training.max_steps", "training.num_train_epochs")
    if info.get("finished") and info.get("global_step") == saved.get("global_step") \
            and all(old.get(k) == new.get(k) for k in length):
        log(f"--resume: {run_dir} finished at step {info['global_step']}; nothing left to train (raise "
            "training.max_steps or training.num_train_epochs to train on)")
        return info
    return None


def _refuse_other_world(last: Path, saved: dict, state: dict) -> None:
    """A checkpoint resumes only with the engine and process count that saved it: DeepSpeed's and
    FSDP's states are split per process, and under DDP the global batch and the position in the
    data depend on the count. (Checkpoints from before the count was recorded are not checked.)"""
    if "processes" not in saved:
        return
    then, now = (saved["engine"], saved["processes"]), (state["engine"], state["processes"])
    if then != now:
        raise SftlabError(f"--resume: {last.name} was saved by {_world(*then)}, this run has {_world(*now)}: "
                          f"resume with the same engine and --nproc {then[1]}")


def _world(engine: str, processes: int) -> str:
    return f"{engine} x {processes} process{'es' if processes > 1 else ''}"


def checkpoint_state(config, data_digests: dict[str, str]) -> dict:
    """What each checkpoint records besides the weights (trained_tokens_seen is added when saving):
    the config, the data digests, and the engine and process count it was trained with."""
    from sftlab.train.distributed import engine_name, world_size

    return {"config": config.model_dump(mode="json"), "data": data_digests,
            "engine": engine_name(config.distributed, config.training.passthrough()), "processes": world_size()}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
