"""What LoRA dropout costs on a CPU, and what sftlab's draw of its noise gives: A/B in one process.

    python bench/dropout_ab.py                 # SmolLM2-135M LoRA r16 all-linear, ~4,096 Alpaca-shaped tokens
    python bench/dropout_ab.py --rounds 8 --dropout 0.1

The model is the one `sftlab train` builds (`build_model`: bf16 base, LoRA r16 all-linear, fused
layers) with `lora.dropout` set, trained under bf16 autocast; each round times one forward +
backward of sftlab's loss on one flattened row of Alpaca-shaped examples three ways, in rotating
order: no dropout (the layers' p set to 0), dropout with nn.Dropout's draw (`bernoulli_`, one
random number per element: what PEFT's layers and sftlab before this draw did), and dropout with
sftlab's draw (`lora_fused.dropout_noise`: 15 bits of a 64-bit draw per element). Medians and
ranges exclude round 1 (warm-up).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alpaca_data import write_alpaca_dataset  # noqa: E402
from common import interleaved_rounds, lora_model_and_row, scratch_dir  # noqa: E402


def bernoulli_noise(x, p):
    """nn.Dropout's noise: one Bernoulli draw per element, scaled by 1/(1-p)."""
    import torch

    return torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dropout", type=float, default=0.05, help="lora.dropout (sftlab's default: 0.05)")
    args = ap.parse_args()

    import torch

    from sftlab.train import lora_fused

    work = scratch_dir("sftlab-dropout-ab-")
    model, batch, examples, n = lora_model_and_row(write_alpaca_dataset(work / "train.jsonl", 200), args.tokens,
                                                   dropout=args.dropout)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: the adapters would add nothing
            torch.nn.init.normal_(p, std=0.02)
    dropouts = [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]
    sftlab_noise = lora_fused.dropout_noise
    print(f"{n} tokens, {examples} examples, {len(dropouts)} LoRA layers, dropout {args.dropout}", flush=True)

    def use(side: str) -> None:
        for m in dropouts:
            m.p = 0.0 if side == "none" else args.dropout
        lora_fused.dropout_noise = bernoulli_noise if side == "bernoulli" else sftlab_noise

    med = interleaved_rounds(model, batch, ["none", "bernoulli", "sftlab"], use, args.rounds)
    print(f"dropout's cost: nn.Dropout's draw {med['bernoulli'] - med['none']:.2f} s a step, "
          f"sftlab's {med['sftlab'] - med['none']:.2f} s; step bernoulli / sftlab: {med['bernoulli'] / med['sftlab']:.3f}x")


if __name__ == "__main__":
    main()
