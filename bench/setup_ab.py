"""One CPU training set-up against another: the same `sftlab train` run, the two interleaved.

    python bench/setup_ab.py                          # tcmalloc vs glibc's malloc: LoRA r16, 20 steps x 2 x 512, 3 rounds
    python bench/setup_ab.py --compare norms --steps 30 --batch 8   # compiled RMSNorm layers vs transformers'
    python bench/setup_ab.py --steps 8 --rounds 1     # smoke run
    python bench/setup_ab.py --against HEAD~1         # this checkout's code vs a git revision's

Each run is rss_flat.py's (the real command in a child on packed Alpaca-shaped records, memory
read every 0.1 s), with one setting changed:
- `allocator`: "tcmalloc" is what `sftlab train` does by itself where libtcmalloc-minimal4 is
  installed (train/allocator.py); "glibc" is the same command with SFTLAB_CPU_ALLOCATOR=system,
  which runs on glibc's malloc with the 1 MiB mmap threshold `train()` sets there
  (`return_freed_memory_to_os`).
- `decommit`: tcmalloc as sftlab runs it vs with TCMALLOC_AGGRESSIVE_DECOMMIT (free spans handed
  back to the OS at once).
- `norms`: `training.compile_norms` true vs false (train/compiled_norms.py); the compiled side's
  first compile falls in its first step, which the time a step leaves out.
- `--against REV`: this checkout's `src/` vs git revision REV's (a temporary worktree, put first
  on the child's PYTHONPATH): a code change measured by the real command.
Rounds alternate which goes first. Printed per set-up: seconds a step after step 5 (loading,
compiling and the first kernels left out), the peak RSS (kernel high-water mark) and the last
step's loss, medians and ranges over the rounds, and the ratios per round.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import scratch_dir  # noqa: E402
from rss_flat import GIB, add_arguments, train_and_sample  # noqa: E402

# set-up name -> (environment, training config, what run.json must say)
TCMALLOC = ({}, {}, ("allocator", "tcmalloc"))  # what `sftlab train` does by itself
COMPARISONS = {
    "allocator": {"tcmalloc": TCMALLOC,
                  "glibc": ({"SFTLAB_CPU_ALLOCATOR": "system"}, {}, ("allocator", "system"))},
    "decommit": {"tcmalloc": TCMALLOC,
                 "decommit": ({"TCMALLOC_AGGRESSIVE_DECOMMIT": "true"}, {}, ("allocator", "tcmalloc"))},
    "norms": {"compiled": ({}, {"compile_norms": True}, ("compiled_norms", True)),
              "eager": ({}, {"compile_norms": False}, ("compiled_norms", False))},
}
WARM = 5  # steps left out of the time a step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, steps=20)
    ap.add_argument("--compare", choices=sorted(COMPARISONS), default="allocator")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--against", metavar="REV", help="compare this checkout's code with git revision REV's")
    args = ap.parse_args()
    setups = COMPARISONS[args.compare] if args.against is None else revision_setups(args.against)
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "SFTLAB_CPU_ALLOCATOR")}
    results: dict[str, list[tuple[float, int, float]]] = {name: [] for name in setups}
    for rnd in range(args.rounds):
        order = list(setups) if rnd % 2 == 0 else list(reversed(setups))
        for name in order:
            env, training, (key, expected) = setups[name]
            work = scratch_dir(f"sftlab-ab-{name}-")
            samples, logged_at, run = train_and_sample(args, work, env={**base, **env}, training=training)
            used = json.loads((run / "run.json").read_text())[key] if key else None
            if used != expected:
                sys.exit(f"the {name} run has {key} {used!r}, not {expected!r}: is libtcmalloc-minimal4 (or a C++ "
                         "compiler) installed?")
            final = max(logged_at)
            per_step = (logged_at[final] - logged_at[WARM]) / (final - WARM)
            peak = max(h for _, _, h in samples)
            losses = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
            results[name].append((per_step, peak, losses[-1]["loss"]))
            print(f"round {rnd + 1} {name}: {per_step:.2f} s a step (steps {WARM + 1}-{final}), peak RSS "
                  f"{peak / GIB:.2f} GiB, loss at step {losses[-1]['step']} {losses[-1]['loss']:.4f}", flush=True)

    def summary(values: list[float], fmt: str) -> str:
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    label = args.compare if args.against is None else "code"
    print(f"\n{args.method}, {args.steps} steps x {args.batch} rows x {args.max_len} tokens, {args.rounds} rounds")
    print(f"| {label} | s a step | peak RSS GiB | last loss |\n|---|---|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {summary([t for t, _, _ in runs], '{:.2f}')} | {summary([p / GIB for _, p, _ in runs], '{:.2f}')} "
              f"| {summary([x for _, _, x in runs], '{:.4f}')} |")
    first, second = (results[name] for name in setups)
    speed = [b[0] / a[0] for a, b in zip(first, second)]
    memory = [a[1] / b[1] for a, b in zip(first, second)]
    print(f"| {' / '.join(setups)}, per round | {summary(speed, '{:.2f}x')} faster | {summary(memory, '{:.2f}x')} | |")


def revision_setups(rev: str) -> dict:
    """The working tree's code and REV's, as set-ups: REV checked out (detached) in a scratch
    worktree whose src/ goes first on the child's PYTHONPATH."""
    root = Path(__file__).resolve().parent.parent
    tree = scratch_dir("sftlab-ab-rev-")
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", "-f", str(tree), rev], check=True,
                   stdout=subprocess.DEVNULL)
    atexit.register(subprocess.run, ["git", "-C", str(root), "worktree", "remove", "--force", str(tree)])
    return {"this checkout": ({}, {}, (None, None)),
            rev: ({"PYTHONPATH": str(tree / "src")}, {}, (None, None))}


if __name__ == "__main__":
    main()
