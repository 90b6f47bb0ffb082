"""Does `sftlab estimate` hold for the real command? Peak RSS of `sftlab train` against the estimate.

    python bench/estimate_vs_train.py                 # SmolLM2-135M: LoRA at 1, 2, 4, 8 rows, full at 2 and 8 (~8 min)
    python bench/estimate_vs_train.py --setups lora:2:12,full:8:4

Each set-up (method:rows:steps, rows of 512 tokens) is the run of bench/rss_flat.py: the real
`python -m sftlab.cli train` in a child, on packed Alpaca-shaped records, with the allocator the
command itself runs on (it re-executes on tcmalloc where installed), its /proc status read
every 0.1 s. Printed per set-up: the kernel's high-water mark, `sftlab estimate` for the same
set-up (LoRA dropout 0, the trained fraction from the run's run.json) and the error, and the
lowest RSS over the last two steps (what the process keeps between steps).
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args()

    rows = []
    for setup in args.setups.split(","):
        method, batch, steps = setup.split(":")
        run_args = argparse.Namespace(model=args.model, method=method, batch=int(batch), steps=int(steps),
                                      max_len=args.max_len)
        samples, _, run = train_and_sample(run_args, scratch_dir("sftlab-estimate-"))
        est, _, info = estimate(run_args, run)
        peak = max(hwm for _, _, hwm in samples)
        kept = min(rss for step, rss, _ in samples if step >= max(int(steps) - 2, 1))  # not the loading
        rows.append([method, f"{batch} x {args.max_len}", steps, info["allocator"], gib(peak), gib(est),
                     f"{peak / est - 1:+.0%}", gib(kept)])
        print("  ".join(map(str, rows[-1])), flush=True)
    print_table(f"sftlab train peak RSS vs sftlab estimate ({args.model})",
                ["method", "rows x tokens", "steps", "allocator", "peak RSS", "estimate", "peak vs estimate",
                 "kept between steps"], rows)
    print(load_note())


if __name__ == "__main__":
    main()
