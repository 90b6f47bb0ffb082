"""Does `sftlab estimate` hold for the real command? Peak RSS of `sftlab train` against the estimate.

    python bench/estimate_vs_train.py                 # SmolLM2-135M: LoRA at 1, 2, 4, 8 rows, full at 2 and 8 (~8 min)
    python bench/estimate_vs_train.py --setups lora:2:12,full:8:4

Each set-up (method:rows:steps, rows of 512 tokens) is the run of bench/rss_flat.py: the real
`python -m sftlab.cli train` in a child, on packed Alpaca-shaped records, with the allocator the
command itself runs on (it re-executes on tcmalloc where installed), its /proc status read
every 0.1 s. Printed per set-up: the kernel's high-water mark, `sftlab estimate` for the same
set-up (LoRA dropout 0, the trained fraction from the run's run.json) and the error, and the
lowest RSS over the last two steps (what the process keeps between steps).

`--parts`: each run in bench/peak_parts_child.py on tcmalloc, which reads what the RSS is made of
at the run's highest RSS and at tcmalloc's highest allocation: tcmalloc's allocated bytes
(tensors and Python's large objects), the free bytes it keeps mapped, the rest of the anonymous
memory (Python's small-object arenas, oneDNN's code and buffers, thread stacks, glibc's own
heap), and mapped files (library code).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gib, load_note, print_table, scratch_dir  # noqa: E402
from rss_flat import estimate, train_and_sample  # noqa: E402

SETUPS = "lora:1:12,lora:2:12,lora:4:8,lora:8:5,full:2:8,full:8:4"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--setups", default=SETUPS, help="comma-separated method:rows:steps")
    ap.add_argument("--parts", action="store_true", help="also what the peak RSS is made of (bench/peak_parts_child.py)")
    args = ap.parse_args()

    rows, parts = [], []
    for setup in args.setups.split(","):
        method, batch, steps = setup.split(":")
        run_args = argparse.Namespace(model=args.model, method=method, batch=int(batch), steps=int(steps),
                                      max_len=args.max_len)
        work = scratch_dir("sftlab-estimate-")
        if args.parts:
            from sftlab.train.allocator import preload_environment

            env = preload_environment({k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})
            if env is None:
                sys.exit("--parts needs libtcmalloc-minimal4 (scripts/install_system_packages.sh)")
            child = [sys.executable, str(Path(__file__).with_name("peak_parts_child.py")), str(work / "parts.json")]
            samples, _, run = train_and_sample(run_args, work, env=env, sftlab=child)
        else:
            samples, _, run = train_and_sample(run_args, work)
        est, _, info = estimate(run_args, run)
        if args.parts:
            sampled = json.loads((work / "parts.json").read_text())
            row = [method, f"{batch} x {args.max_len}"]
            for p in (sampled["rss"], sampled["allocated"]):
                resident = p["generic.heap_size"] - p["tcmalloc.pageheap_unmapped_bytes"]
                allocated = p["generic.current_allocated_bytes"]
                row += [gib(p["VmRSS"]), gib(allocated), gib(resident - allocated), gib(p["RssAnon"] - resident)]
            parts.append([*row, gib(sampled["rss"]["RssFile"]), gib(est)])
        peak = max(hwm for _, _, hwm in samples)
        kept = min(rss for step, rss, _ in samples if step >= max(int(steps) - 2, 1))  # not the loading
        rows.append([method, f"{batch} x {args.max_len}", steps, info["allocator"], gib(peak), gib(est),
                     f"{peak / est - 1:+.0%}", gib(kept)])
        print("  ".join(map(str, rows[-1])), flush=True)
    print_table(f"sftlab train peak RSS vs sftlab estimate ({args.model})",
                ["method", "rows x tokens", "steps", "allocator", "peak RSS", "estimate", "peak vs estimate",
                 "kept between steps"], rows)
    if parts:
        print_table("what the RSS is made of at its peak, and at tcmalloc's highest allocation",
                    ["method", "rows x tokens", "peak RSS", "allocated", "free, mapped", "other anonymous",
                     "RSS at highest allocation", "allocated", "free, mapped", "other anonymous", "mapped files",
                     "estimate"], parts)
    print(load_note())


if __name__ == "__main__":
    main()
