"""Is a long CPU run's memory flat? `sftlab train` for many steps, its RSS read at every step.

    python bench/rss_flat.py                          # SmolLM2-135M LoRA, 200 steps x 2 rows x 512, Alpaca-shaped
    python bench/rss_flat.py --steps 20 --batch 1     # smoke run
    python bench/rss_flat.py --method full --steps 50

The run is the real command (`python -m sftlab.cli train CONFIG`, a child process), on packed
Alpaca-shaped records (bench/alpaca_data.py), logging every step. The parent reads the child's
/proc status (VmRSS, and VmHWM: the kernel's high-water mark) every 0.1 s and the step from the
run's metrics.jsonl. Printed, at chosen steps: the high-water mark so far, and the lowest and
highest RSS seen within the step (the lowest is what the process keeps between steps: a leak
or a fragmenting heap raises it; the highest moves with each step's data); their growth from
step 10 to the end; and `sftlab estimate` for the same set-up (the trained fraction taken from
the run's run.json). Written: a PNG of all three against steps (--plot).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alpaca_data import write_alpaca_dataset  # noqa: E402
from common import scratch_dir, status_bytes  # noqa: E402

GIB = 1024 ** 3


def steps_logged(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def estimate(args, run: Path) -> tuple[int, float, dict]:
    """`sftlab estimate` for the set-up of a finished run, with the trained fraction of its data:
    (bytes, trained fraction, the run's run.json)."""
    info = json.loads((run / "run.json").read_text())
    counts = info["train_data"]
    fraction = counts["trained_tokens"] / counts["tokens"]
    cmd = [sys.executable, "-m", "sftlab.cli", "estimate", args.model, "--method", args.method, "--seq-len",
           str(args.max_len), "--batch", str(args.batch), "--lora-dropout", "0", "--trained-fraction",
           f"{fraction:.3f}", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out[out.index("{"):])["total"]), fraction, info


def plot(samples: list[tuple[int, int, int]], estimate_bytes: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _, _ in samples]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, [r / GIB for _, r, _ in samples], lw=0.8, label="RSS")
    ax.plot(steps, [h / GIB for _, _, h in samples], lw=1.5, label="peak RSS so far (VmHWM)")
    lowest: dict[int, int] = {}
    for step, rss, _ in samples:
        lowest[step] = min(rss, lowest.get(step, rss))
    ax.plot(list(lowest), [v / GIB for v in lowest.values()], lw=1.2, label="lowest RSS within each step")
    ax.axhline(estimate_bytes / GIB, color="k", ls="--", lw=1, label="sftlab estimate")
    ax.axhspan(estimate_bytes * 0.9 / GIB, estimate_bytes * 1.1 / GIB, color="k", alpha=0.08, label="estimate ±10 %")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("GiB")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def train_and_sample(args, work: Path, env: dict[str, str] | None = None, training: dict | None = None,
                     sftlab: list[str] | None = None):
    """`sftlab train` (the set-up in the module docstring, `training` added to its training
    section; `sftlab`: the command line that runs sftlab, by default `python -m sftlab.cli`) in a
    child, its memory read every 0.1 s.
    Returns ([(step, RSS, high-water mark)], {step: when its metrics line was first seen}, run dir)."""
    data = write_alpaca_dataset(work / "train.jsonl", args.steps * args.batch * (args.max_len // 100 + 2))
    run = work / "run"
    config = {
        "model": {"name_or_path": args.model},
        "method": args.method,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(data), "max_seq_length": args.max_len, "packing": True},
        "training": {"learning_rate": 1e-4, "per_device_train_batch_size": args.batch, "max_steps": args.steps,
                     "logging_steps": 1, "save_steps": 10 ** 6, "seed": 0, **(training or {})},
        "output_dir": str(run),
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([*(sftlab or [sys.executable, "-m", "sftlab.cli"]), "train", str(work / "config.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    samples: list[tuple[int, int, int]] = []
    logged_at: dict[int, float] = {}
    while proc.poll() is None:
        mem = status_bytes(proc.pid)
        step = steps_logged(run / "metrics.jsonl")
        logged_at.setdefault(step, time.time())
        if "VmRSS" in mem:
            samples.append((step, mem["VmRSS"], mem["VmHWM"]))
        time.sleep(0.1)
    if proc.returncode != 0:
        sys.exit(f"sftlab train exited {proc.returncode}; rerun with SFTLAB_BENCH_KEEP=1 to keep {work} and "
                 f"run `sftlab train {work / 'config.yaml'}` by hand")
    return samples, logged_at, run


def add_arguments(ap: argparse.ArgumentParser, steps: int) -> None:
    ap.add_argument("--model", default="default")
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=512)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, steps=200)
    ap.add_argument("--plot", type=Path, default=Path("rss_flat.png"))
    args = ap.parse_args()

    work = scratch_dir("sftlab-rss-")
    t0 = time.time()
    samples, logged_at, run = train_and_sample(args, work)
    est, fraction, _ = estimate(args, run)
    print(f"{args.method}, {args.steps} steps x {args.batch} rows x {args.max_len} tokens, "
          f"{time.time() - t0:.0f} s; trained fraction {fraction:.3f}; sftlab estimate {est / GIB:.2f} GiB")
    final = max(logged_at)
    if 10 in logged_at and final > 10:  # the steps after the first ten, without loading and saving
        print(f"steps 11-{final}: {(logged_at[final] - logged_at[10]) / (final - 10):.2f} s a step")
    per_step: dict[int, list[tuple[int, int]]] = {}  # step being trained (last logged + 1) -> (RSS, HWM)
    for step, rss, hwm in samples:
        per_step.setdefault(step + 1, []).append((rss, hwm))
    print("| step | peak RSS so far | vs estimate | RSS within the step: lowest / highest |\n|---|---|---|---|")
    marks = [s for s in (1, 2, 5, 10, 20, 50, 100, 150, 200, 300, 500) if s < args.steps] + [args.steps]
    rows = {}
    for step in marks:
        if step in per_step:
            rss = [r for r, _ in per_step[step]]
            rows[step] = (max(h for _, h in per_step[step]), min(rss), max(rss))
            hwm, low, high = rows[step]
            print(f"| {step} | {hwm / GIB:.2f} GiB | {100 * (hwm / est - 1):+.0f} % | {low / GIB:.2f} / {high / GIB:.2f} GiB |")
    if 10 in rows:
        last = rows[max(rows)]
        print(f"from step 10 to {max(rows)}: peak so far {100 * (last[0] / rows[10][0] - 1):+.1f} %, "
              f"lowest RSS in the step {100 * (last[1] / rows[10][1] - 1):+.1f} %")
    plot(samples, est, args.plot, f"SmolLM2-135M {args.method}, {args.batch} x {args.max_len} tokens per step")
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
