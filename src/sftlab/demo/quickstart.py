"""The whole path on the embedded default: demo data -> base eval -> LoRA -> tuned eval -> report."""

from __future__ import annotations

import shutil
import time
from importlib import resources
from pathlib import Path

from sftlab.models import DEFAULT_MODEL, embedded_model_dir


def quickstart_config(paths: dict[str, Path], run_dir: Path, overrides: list[str]):
    from sftlab.config import load_config

    recipe = resources.files("sftlab.demo").joinpath("quickstart.yaml")
    with resources.as_file(recipe) as path:
        return load_config(path, [f"data.train={paths['train']}", f"data.validation={paths['validation']}",
                                  f"output_dir={run_dir}", *overrides])


def run_quickstart(out: Path, overrides: list[str], eval_batch_size: int = 32, max_new_tokens: int = 32) -> dict:
    from rich.console import Console

    from sftlab.data.load import load_conversations
    from sftlab.demo.dataset import write_demo_dataset
    from sftlab.evaluation.compare import write_compare_report
    from sftlab.evaluation.evaluate import evaluate
    from sftlab.models import load_model, load_tokenizer
    from sftlab.train.trainer import train

    console = Console()
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    paths = write_demo_dataset(out / "data")
    console.print(f"[bold]1/5[/] demo dataset: {', '.join(f'{k} {v}' for k, v in paths.items())}")
    model_dir = embedded_model_dir()
    console.print(f"[bold]2/5[/] base model {DEFAULT_MODEL} (SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)) cached at {model_dir}")

    test = load_conversations(paths["test"])
    tokenizer = load_tokenizer("default")
    base = load_model("default").eval()
    console.print(f"[bold]3/5[/] evaluating the base model on {len(test)} held-out examples")
    base_result = evaluate(base, tokenizer, test, batch_size=eval_batch_size, max_new_tokens=max_new_tokens)
    base_result.save(out / "eval" / "base")
    del base

    run_dir = out / "run"
    if run_dir.exists():  # quickstart always trains afresh
        shutil.rmtree(run_dir)
    config = quickstart_config(paths, run_dir, overrides)
    console.print(f"[bold]4/5[/] fine-tuning with LoRA -> {run_dir}")
    info = train(config, resume=False, log=console.print)

    console.print("[bold]5/5[/] evaluating the tuned model")
    tuned = load_model(str(run_dir)).merge_and_unload().eval()  # merged: same logits, faster generation
    tuned_result = evaluate(tuned, tokenizer, test, batch_size=eval_batch_size, max_new_tokens=max_new_tokens)
    tuned_result.save(out / "eval" / "tuned")

    report = write_compare_report({"base": base_result, "tuned": tuned_result}, out / "report",
                                  run_dirs={"tuned": run_dir}).paths["html"]
    _print_table(console, base_result, tuned_result)
    minutes = (time.perf_counter() - t0) / 60
    console.print(f"\nRun: {run_dir}   report: {report}   ({minutes:.1f} min, training {info['train_seconds']:.0f}s)")
    console.print(f"Next: sftlab chat {run_dir}   |   sftlab eval {run_dir} --data {paths['test']}")
    return {"base": base_result.metrics, "tuned": tuned_result.metrics, "run_dir": str(run_dir), "minutes": minutes}


def _print_table(console, base, tuned) -> None:
    from rich.table import Table

    table = Table(title="Held-out test split: base vs tuned")
    for col in ("task", "metric", "base", "tuned", "delta"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    groups = [(g, base.by_group[g], tuned.by_group.get(g, {})) for g in sorted(base.by_group)]
    groups.append(("all", base.metrics, tuned.metrics))
    for group, b, t in groups:
        for name in b:
            if name in t and name != "loss" and isinstance(b[name], (int, float)):  # loss: see perplexity
                table.add_row(group, name, f"{b[name]:.3f}", f"{t[name]:.3f}", f"{t[name] - b[name]:+.3f}")
    console.print(table)
