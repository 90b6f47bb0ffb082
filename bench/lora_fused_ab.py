"""What the fused LoRA forward (train/lora_fused.py) gives: A/B in one process, interleaved.

    python bench/lora_fused_ab.py                 # SmolLM2-135M LoRA r16 all-linear, ~4,096 Alpaca-shaped tokens
    python bench/lora_fused_ab.py --rounds 10

The model is the one `sftlab train` builds (`build_model`: bf16 base, LoRA r16 all-linear,
dropout 0, fused layers), trained under bf16 autocast; each round times one forward + backward
of sftlab's loss on one flattened row of Alpaca-shaped examples with PEFT's own forward and with
the fused one, in alternating order. lora_B is drawn at random first (PEFT starts it at zero,
where both forwards would add nothing) and the two losses are printed: they agree to bf16
rounding. Medians and ranges exclude round 1 (warm-up).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alpaca_data import write_alpaca_dataset  # noqa: E402
from common import interleaved_rounds, lora_model_and_row, scratch_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()

    import torch

    work = scratch_dir("sftlab-lora-ab-")
    model, batch, examples, n = lora_model_and_row(write_alpaca_dataset(work / "train.jsonl", 200), args.tokens)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    layers = [m for m in model.modules() if "forward" in vars(m)]
    fused_forwards = {m: vars(m)["forward"] for m in layers}
    print(f"{n} tokens, {examples} examples, {len(layers)} fused LoRA layers", flush=True)

    def use(fused: bool) -> None:
        for m in layers:
            if fused:
                m.forward = fused_forwards[m]
            else:
                vars(m).pop("forward", None)

    med = interleaved_rounds(model, batch, ["peft", "fused"], lambda side: use(side == "fused"), args.rounds)
    print(f"PEFT / fused: {med['peft'] / med['fused']:.3f}x")


if __name__ == "__main__":
    main()
