"""CPU training on tcmalloc vs glibc's malloc: the same `sftlab train` run, allocators interleaved.

    python bench/allocator_ab.py                      # SmolLM2-135M LoRA r16, 20 steps x 2 x 512, 3 rounds
    python bench/allocator_ab.py --steps 8 --rounds 1 # smoke run

Each run is rss_flat.py's (the real command in a child on packed Alpaca-shaped records, memory
read every 0.1 s). "tcmalloc" is what `sftlab train` does by itself where libtcmalloc-minimal4 is
installed (train/allocator.py); "glibc" is the same command with SFTLAB_CPU_ALLOCATOR=system,
which runs on glibc's malloc with the 1 MiB mmap threshold `train()` sets there
(`return_freed_memory_to_os`). Rounds alternate which goes first. Printed per allocator: seconds
a step after step 5 (loading and the first kernels left out) and the peak RSS (kernel
high-water mark), medians and ranges over the rounds, and tcmalloc / glibc per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import scratch_dir  # noqa: E402
from rss_flat import GIB, add_arguments, train_and_sample  # noqa: E402

ALLOCATORS = {"tcmalloc": {}, "glibc": {"SFTLAB_CPU_ALLOCATOR": "system"}}
WARM = 5  # steps left out of the time a step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, steps=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "SFTLAB_CPU_ALLOCATOR")}
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in ALLOCATORS}
    for rnd in range(args.rounds):
        order = list(ALLOCATORS) if rnd % 2 == 0 else list(reversed(ALLOCATORS))
        for name in order:
            work = scratch_dir(f"sftlab-alloc-{name}-")
            samples, logged_at, run = train_and_sample(args, work, env={**base, **ALLOCATORS[name]})
            used = json.loads((run / "run.json").read_text())["allocator"]
            if used != name.replace("glibc", "system"):
                sys.exit(f"the {name} run ran on {used}: is libtcmalloc-minimal4 installed?")
            final = max(logged_at)
            per_step = (logged_at[final] - logged_at[WARM]) / (final - WARM)
            peak = max(h for _, _, h in samples)
            results[name].append((per_step, peak))
            print(f"round {rnd + 1} {name}: {per_step:.2f} s a step (steps {WARM + 1}-{final}), peak RSS {peak / GIB:.2f} GiB",
                  flush=True)

    def summary(values: list[float], fmt: str) -> str:
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    print(f"\n{args.method}, {args.steps} steps x {args.batch} rows x {args.max_len} tokens, {args.rounds} rounds")
    print("| allocator | s a step | peak RSS GiB |\n|---|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {summary([t for t, _ in runs], '{:.2f}')} | {summary([p / GIB for _, p in runs], '{:.2f}')} |")
    speed = [g[0] / t[0] for t, g in zip(results["tcmalloc"], results["glibc"])]
    memory = [t[1] / g[1] for t, g in zip(results["tcmalloc"], results["glibc"])]
    print(f"| tcmalloc / glibc, per round | {summary(speed, '{:.2f}x')} | {summary(memory, '{:.2f}x')} |")


if __name__ == "__main__":
    main()
