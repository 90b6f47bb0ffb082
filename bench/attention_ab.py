"""Short examples' attention on a CPU: flash's tiles vs whole score matrices (`_ShortCausal`).

    python bench/attention_ab.py                       # widths 0 (flash only) and sftlab's default
    python bench/attention_ab.py --widths 0,96,128,192 --rounds 8
    python bench/attention_ab.py --workload demo       # the quickstart's short demo examples
    python bench/attention_ab.py --widths 184 --ratios 1.5,1.25,1.15   # how alike a group's lengths must be

The model is the one `sftlab train` builds (`build_model`: SmolLM2-135M, bf16 base, LoRA r16
all-linear, fused layers), trained under bf16 autocast; each round times one forward + backward
of sftlab's loss on one flattened row of ~4,096 tokens (Alpaca-shaped records, or the demo
dataset's short ones) once per value of
train/attention.py's SHORT_WIDTH (groups of examples padded to at most that width take the
score-matrix path, wider ones PyTorch's flash kernel; 0 = flash for all) and of its GROUP_RATIO
(examples whose lengths lie within that factor share a padded group), in rotating order.
Losses are printed: they agree to bf16 rounding. Medians and ranges exclude round 1 (warm-up).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alpaca_data import write_alpaca_dataset  # noqa: E402
from common import interleaved_rounds, lora_model_and_row, scratch_dir  # noqa: E402


def main() -> None:
    from sftlab.train import attention

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--workload", choices=["alpaca", "demo"], default="alpaca")
    ap.add_argument("--widths", default=f"0,{attention.SHORT_WIDTH}", help="SHORT_WIDTH values to compare")
    ap.add_argument("--ratios", default=str(attention.GROUP_RATIO), help="GROUP_RATIO values to compare")
    args = ap.parse_args()
    settings = [(int(w), float(r)) for w in args.widths.split(",") for r in args.ratios.split(",")]

    import torch

    work = scratch_dir("sftlab-attention-ab-")
    if args.workload == "demo":
        from sftlab.demo.dataset import write_demo_dataset

        data = write_demo_dataset(work)["train"]
    else:
        data = write_alpaca_dataset(work / "train.jsonl", 200)
    model, batch, examples, n = lora_model_and_row(data, args.tokens)
    bounds = tuple(attention.segment_bounds(batch["position_ids"]))
    print(f"{n} tokens, {examples} examples", flush=True)
    for ratio in dict.fromkeys(r for _, r in settings):
        attention.GROUP_RATIO = ratio
        attention._padded_layout.cache_clear()
        groups = attention._padded_layout(bounds, torch.device("cpu"))[0]
        print(f"GROUP_RATIO {ratio}: groups (count x width) " + ", ".join(f"{c}x{w}" for c, w in groups), flush=True)

    def use(setting: tuple[int, float]) -> None:
        attention.SHORT_WIDTH, attention.GROUP_RATIO = setting
        attention._padded_layout.cache_clear()

    med = interleaved_rounds(model, batch, settings, use, args.rounds)
    for setting in settings:
        print(f"SHORT_WIDTH {setting[0]}, GROUP_RATIO {setting[1]}: {med[settings[0]] / med[setting]:.3f}x vs {settings[0]}")

if __name__ == "__main__":
    main()
