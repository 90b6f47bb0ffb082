"""Helpers shared by the benchmarks: child processes with their peak RSS, the CPU's
measured matmul peak, machine load, and a results table.

Peak RSS comes from the kernel (`wait4` rusage `ru_maxrss` of that one child), so it is
the true high-water mark of the child's resident memory, not a sampled value.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "  # a child prints one line `BENCH_RESULT {json}` with its numbers


@dataclass
class ChildRun:
    returncode: int
    wall_s: float
    peak_rss: int  # bytes
    result: dict  # the child's BENCH_RESULT payload ({} when it printed none)
    output: str


def run_child(cmd: list[str], *, env: dict[str, str] | None = None, echo: bool = True) -> ChildRun:
    """Run `cmd`, stream its output, and return its wall time, peak RSS and BENCH_RESULT."""
    full_env = {**os.environ, **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=ROOT)
    lines = []
    result: dict = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
        elif echo:
            sys.stdout.write("    " + line)
            sys.stdout.flush()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return ChildRun(proc.returncode, wall, usage.ru_maxrss * 1024, result, "".join(lines))


def status_bytes(pid: int | str = "self", fields: tuple[str, ...] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """`fields` of /proc/PID/status in bytes (by default VmRSS and VmHWM, the kernel's
    high-water mark); {} once the process is gone."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def scratch_dir(prefix: str) -> Path:
    """A temporary folder for a benchmark's models, data and checkpoints (gigabytes over a few
    rounds), removed when the benchmark exits; SFTLAB_BENCH_KEEP=1 keeps it to look into."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.environ.get("SFTLAB_BENCH_KEEP") == "1":
        print(f"keeping {path} (SFTLAB_BENCH_KEEP=1)")
    else:
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def report_result(payload: dict) -> None:
    """Called in a child: hand numbers back to the parent."""
    print(RESULT_PREFIX + json.dumps(payload), flush=True)


def self_peak_rss() -> int:
    """Peak RSS of the calling process so far, in bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_peak_flops(n: int | None = None, repeats: int = 8, dtype: str = "float32", device: str = "cpu") -> float:
    """Best achieved FLOP/s of an n x n x n matmul (CPU: with the current torch thread count)."""
    import torch

    n = n or (8192 if device == "cuda" else 2048)
    a = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)
    b = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def load_note() -> str:
    """The machine's load averages: other processes make timings noisy."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=max(Console().width, 160)).print(table)  # piped output: do not wrap the cells at 80 columns


def train_with_callback(callback, model: str, data: Path, out: Path, *, method: str, batch: int, max_len: int,
                        steps: int, attn: str | None = None, training: dict | None = None) -> dict:
    """`sftlab.train.trainer.train` as a profile run uses it: LoRA r16 all-linear (or `method`),
    packed rows, `steps` steps, no checkpoint before the end, `training` keys on top; `callback`
    (a TrainerCallback) is added to the run's trainer. Returns train()'s info."""
    from sftlab.config import TrainConfig
    from sftlab.train import trainer as trainer_mod

    original_init = trainer_mod.SFTTrainer.__init__

    def init(self, *a, **k):
        original_init(self, *a, **k)
        self.add_callback(callback)

    trainer_mod.SFTTrainer.__init__ = init
    config = TrainConfig.model_validate({
        "model": {"name_or_path": model, **({"attn_implementation": attn} if attn else {})},
        "data": {"train": str(data), "max_seq_length": max_len, "packing": True},
        "method": method,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {"learning_rate": 1e-4, "per_device_train_batch_size": batch, "max_steps": steps,
                     "logging_steps": 1, "save_steps": 10**6, "seed": 0, **(training or {})},
        "output_dir": str(out),
    })
    try:
        return trainer_mod.train(config, log=lambda msg: print(msg, flush=True))
    finally:
        trainer_mod.SFTTrainer.__init__ = original_init


def lora_model_and_row(data: Path, tokens: int, dropout: float = 0.0):
    """The SmolLM2 LoRA model `sftlab train` builds (bf16 base, r16 all-linear, `dropout`, fused
    layers), in train mode, and one flattened row of `data`'s first examples up to `tokens` tokens.
    Returns (model, batch, examples in the row, tokens in the row)."""
    from sftlab.config import load_config
    from sftlab.data.load import load_conversations
    from sftlab.data.pack import collate
    from sftlab.data.render import render_many
    from sftlab.models import load_tokenizer, resolve_model_path
    from sftlab.train.trainer import build_model

    config = load_config(None, ["model.name_or_path=default", "method=lora", "lora.r=16", "lora.alpha=32",
                                f"lora.dropout={dropout}", f"data.train={data}"])
    tokenizer = load_tokenizer(resolve_model_path("default")[0])
    row, n = [], 0
    for ex in render_many(load_conversations(data), tokenizer):
        if n + len(ex.input_ids) > tokens:
            break
        row.append(ex)
        n += len(ex.input_ids)
    batch = collate([row], flatten=True)
    return build_model(config, use_bf16=True, tokenizer=tokenizer).train(), batch, len(row), n


def interleaved_rounds(model, batch, sides: list, use, rounds: int) -> dict:
    """Time one forward + backward (`timed_forward_backward`) per side and round, the sides in rotating
    order (each round starts with the next one), `use(side)` setting the model up for it; prints each
    time and loss, then each side's median and range without round 1 (warm-up). Returns the medians."""
    import statistics

    times: dict = {side: [] for side in sides}
    for rnd in range(rounds):
        for side in sides[rnd % len(sides):] + sides[:rnd % len(sides)]:
            use(side)
            seconds, loss = timed_forward_backward(model, batch)
            times[side].append(seconds)
            print(f"round {rnd + 1} {side}: {seconds:.2f} s, loss {loss:.5f}", flush=True)
    med = {side: statistics.median(v[1:]) for side, v in times.items()}
    for side, v in times.items():
        print(f"{side}: median {med[side]:.2f} s ({min(v[1:]):.2f}-{max(v[1:]):.2f})")
    return med


def timed_forward_backward(model, batch) -> tuple[float, float]:
    """One forward + backward of sftlab's loss on `batch` under bf16 autocast, gradients dropped
    after: (seconds, mean loss per trained token)."""
    import torch

    from sftlab.train.loss import selective_loss_sum

    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, count = selective_loss_sum(model, batch)
    (loss / count).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, loss.item() / count
