"""sftlab vs TRL's SFTTrainer, side by side: same model, data and hyper-parameters.

    python bench/train_vs_trl.py              # the real run on CPU: 40 steps each
    python bench/train_vs_trl.py --steps 3    # smoke run
    python bench/train_vs_trl.py --shape qwen2.5-0.5b --per-task 1500 --batch 8 --max-len 1024 \
        --trl default,packed                  # on a GPU: a random Qwen2.5-0.5B-shaped model

Both sides train LoRA (r=16, all linear layers; `--method full` for full fine-tuning) on
the embedded SmolLM2-135M-Instruct (or a random model of `--shape`, with the SmolLM2
tokenizer) with the demo dataset, one after the other, each in its own process. TRL runs
as one or both of (`--trl`):

- `packed`: its documented settings for this setup: `peft_config`, `packing=True`
  (best-fit decreasing, which turns on padding-free batches), the loss on completions
  only (the demo's chat records given as prompt/completion, as TRL documents for templates
  without generation markers), its own defaults otherwise (bf16, gradient checkpointing);
- `default`: the same without `packing` (TRL's default: one example per row, padded).

sftlab runs `sftlab.train.trainer.train` with its defaults (bf16 where supported, packing,
padding-free varlen attention). Both load the model in the same dtype (fp32 on CPU, bf16 on
CUDA for LoRA).

Printed for each side: trained tokens/s (label tokens, timed around `trainer.train()`),
wall time, peak RSS of the process (on CUDA: peak allocated GPU memory), trained/computed tokens (trained = assistant tokens,
so prompts count against it) and real/computed tokens (padding only), final loss; then the
sftlab/TRL ratios, the device's fp32 and bf16 matmul peak measured in the same run, and each
side's model FLOPs utilisation:

    MFU = k x N x real tokens / train seconds / fp32 matmul peak

with N the parameters taking part in matmuls (all but the input embedding; a tied
embedding counts once, as the output head), real = non-padding tokens, k = 6 for full
fine-tuning (forward 2N, backward 4N) and k = 4 for LoRA (the frozen weights need no
weight gradient: forward 2N + input gradients 2N), plus 6 x N_lora. Attention-score
FLOPs and recomputation (gradient checkpointing) are not counted, as usual for MFU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gib, load_note, matmul_peak_flops, print_table, report_result, run_child  # noqa: E402


SHAPES = {
    # Qwen2.5-0.5B's architecture (random weights: nothing is downloaded)
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, use_sliding_window=False),
    # the same family, tiny: a quick check of the whole script on a CPU
    "tiny-qwen": dict(model_type="qwen2", vocab_size=49152, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=True, use_sliding_window=False),
}


def make_random_model(shape: str, out: Path) -> str:
    """A randomly initialised model of `shape` with the SmolLM2 tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "tests/fixtures/smollm2-tokenizer")
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 0.5B weights on a CPU is slow
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def peak_device_memory() -> int | None:
    """Peak allocated CUDA memory of this process in bytes (None on CPU: the parent reads RSS)."""
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


class TokenCounter:
    """Counts the tokens of every batch a Trainer trains on (patched into Trainer.training_step)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.computed = self.real = self.trained = self.steps = 0

    def install(self) -> None:
        from transformers import Trainer

        original = Trainer.training_step
        counter = self

        def training_step(trainer, model, inputs, *args, **kwargs):
            counter.add(inputs)
            return original(trainer, model, inputs, *args, **kwargs)

        Trainer.training_step = training_step

    def add(self, inputs: dict) -> None:
        ids, labels = inputs["input_ids"], inputs["labels"]
        self.steps += 1
        self.computed += ids.numel()
        self.trained += int((labels[:, 1:] != -100).sum())  # positions whose next token is trained
        self.real += ids.numel() - self._padding(inputs)

    def _padding(self, inputs: dict) -> int:
        if inputs.get("attention_mask") is not None:
            return int((inputs["attention_mask"] == 0).sum())
        pos = inputs.get("position_ids")
        if pos is None:
            return 0
        pad = 0
        for row_ids, row_labels, row_pos in zip(inputs["input_ids"], inputs["labels"], pos):
            start = int((row_pos == 0).nonzero().max())  # the row's last segment: padding if nothing in it is real
            if bool((row_ids[start:] == self.pad_id).all()) and bool((row_labels[start:] == -100).all()):
                pad += len(row_ids) - start
        return pad

    def as_dict(self) -> dict:
        return {"steps": self.steps, "computed_tokens": self.computed, "real_tokens": self.real, "trained_tokens": self.trained}


def run_trl(opts: dict) -> None:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from sftlab.models import load_model, load_tokenizer
    from sftlab.train.trainer import device_supports_bf16

    tokenizer = load_tokenizer(opts["model"])
    counter = TokenCounter(tokenizer.pad_token_id)
    counter.install()
    data = load_dataset("json", data_files=opts["train"], split="train")
    # messages -> prompt/completion: TRL then trains on the assistant reply only
    data = data.map(lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
                    remove_columns=data.column_names)
    model = load_model(opts["model"], dtype=opts["dtype"])
    if torch.cuda.is_available():
        model = model.to("cuda")
    args = SFTConfig(
        output_dir=opts["out"], max_steps=opts["steps"], per_device_train_batch_size=opts["batch"],
        learning_rate=opts["lr"], lr_scheduler_type="cosine", warmup_steps=0.05, optim="adamw_torch",
        logging_steps=1, save_strategy="no", report_to="none", seed=0, data_seed=0,
        max_length=opts["max_len"], packing=opts["trl"] == "packed", bf16=device_supports_bf16(),
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=opts["trl_gradient_checkpointing"],
    )
    peft_config = LoraConfig(r=opts["lora_r"], lora_alpha=2 * opts["lora_r"], lora_dropout=opts["lora_dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM") if opts["method"] == "lora" else None
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    report_result({**counter.as_dict(), "train_seconds": seconds, "losses": losses, "peak_device_memory": peak_device_memory(),
                   "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                   "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16,
                   "attention": trainer.model.config._attn_implementation})


def run_sftlab(opts: dict) -> None:
    from sftlab.config import TrainConfig
    from sftlab.models import load_tokenizer
    from sftlab.train.trainer import train

    counter = TokenCounter(load_tokenizer(opts["model"]).pad_token_id)
    counter.install()
    config = TrainConfig.model_validate({
        "model": {"name_or_path": opts["model"], "dtype": opts["dtype"]},
        "data": {"train": opts["train"], "max_seq_length": opts["max_len"], "packing": True},
        "method": opts["method"],
        "lora": {"r": opts["lora_r"], "alpha": 2 * opts["lora_r"], "dropout": opts["lora_dropout"], "target_modules": "all-linear"},
        "training": {"learning_rate": opts["lr"], "per_device_train_batch_size": opts["batch"], "max_steps": opts["steps"],
                     "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "optim": "adamw_torch", "logging_steps": 1,
                     "save_steps": 10**6, "seed": 0},
        "output_dir": opts["out"],
    })
    info = train(config, log=lambda msg: print(msg, flush=True))
    metrics = [json.loads(x) for x in (Path(opts["out"]) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    report_result({**counter.as_dict(), "train_seconds": info["train_seconds"], "losses": losses,
                   "peak_device_memory": peak_device_memory(), "trainable": info["trainable_params"],
                   "gradient_checkpointing": config.training.gradient_checkpointing, "bf16": info["bf16"],
                   "attention": info["attention"]})


def matmul_flops(model: str) -> tuple[int, bool]:
    """(parameters in matmuls, tied) from the config: every weight but the input embedding."""
    from sftlab.estimate import load_model_config, model_shape

    config = load_model_config(model)
    shape = model_shape(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return shape.n_params - (0 if tied else shape.vocab * shape.hidden), tied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="model for both sides (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="instead of --model: a random model of this architecture")
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per side (3 for a smoke run)")
    ap.add_argument("--batch", type=int, default=4, help="rows per step (packed rows of --max-len tokens)")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--per-task", type=int, default=200, help="demo examples per task (4 tasks)")
    ap.add_argument("--trl", default="packed", help="TRL set-ups to run, comma-separated: packed, default")
    ap.add_argument("--trl-gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="TRL's default is on; --no-trl-gradient-checkpointing compares without it")
    ap.add_argument("--only", choices=["trl", "sftlab"], help="run one side only")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        opts = json.loads(args.child)
        (run_sftlab if opts["side"] == "sftlab" else run_trl)(opts)
        return

    import torch

    from sftlab.demo.dataset import write_demo_dataset
    from sftlab.models import resolve_model_path

    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="sftlab-bench-"))
    if args.shape:
        model = make_random_model(args.shape, work / args.shape)
    else:
        model = resolve_model_path(args.model)[0]  # convert the embedded model once, outside the timed children
    dtype = "bfloat16" if cuda and args.method == "lora" else "float32"  # full FT keeps fp32 master weights
    train_path = write_demo_dataset(work / "data", seed=0, sizes={"train": args.per_task})["train"]
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; data: {train_path} ({4 * args.per_task} examples); {load_note()}", flush=True)
    peak32 = matmul_peak_flops(dtype="float32", device="cuda" if cuda else "cpu")
    peak16 = matmul_peak_flops(dtype="bfloat16", device="cuda" if cuda else "cpu")
    print(f"matmul peak: fp32 {peak32 / 1e12:.2f} TFLOP/s, bf16 {peak16 / 1e12:.2f} TFLOP/s", flush=True)
    n_matmul, _ = matmul_flops(model)

    sides = [f"trl-{t.strip()}" for t in args.trl.split(",") if t.strip()] + ["sftlab"]
    results, failed = {}, []
    for side in sides:
        if args.only and not side.startswith(args.only):
            continue
        opts = {"side": side, "trl": side.removeprefix("trl-"), "model": model, "dtype": dtype, "method": args.method,
                "train": str(train_path), "out": str(work / side), "steps": args.steps, "batch": args.batch,
                "max_len": args.max_len, "lr": args.lr, "lora_r": args.lora_r, "lora_dropout": args.lora_dropout,
                "trl_gradient_checkpointing": args.trl_gradient_checkpointing}
        print(f"== {side}", flush=True)
        run = run_child([sys.executable, __file__, "--child", json.dumps(opts)],
                        env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "SFTLAB_CACHE": str(work / "cache")},
                        echo=False)
        if run.returncode != 0:
            print(run.output[-4000:])
            print(f"{side} failed (exit {run.returncode}); going on with the other sides", flush=True)
            failed.append(side)
            continue
        r = run.result
        k = 6 if args.method == "full" else 4  # frozen weights need no weight gradient
        flops = (k * n_matmul + (6 * r["trainable"] if args.method == "lora" else 0)) * r["real_tokens"]
        tail = r["losses"][-5:]
        results[side] = {
            **r, "wall_seconds": run.wall_s, "peak_memory": r["peak_device_memory"] or run.peak_rss,
            "trained_tokens_per_s": r["trained_tokens"] / r["train_seconds"],
            "trained_per_computed": r["trained_tokens"] / r["computed_tokens"],
            "final_loss": sum(tail) / len(tail),
            "mfu_fp32": flops / r["train_seconds"] / peak32,
            "mfu_bf16": flops / r["train_seconds"] / peak16,
        }
    print(f"{load_note()} (other processes on the machine make timings noisy)", flush=True)
    _print(results, args, device, cuda, peak32, peak16)
    if args.json:
        args.json.write_text(json.dumps({"device": device, "results": results, "peak_fp32": peak32, "peak_bf16": peak16,
                                         "args": {k: str(v) for k, v in vars(args).items() if k not in ("json", "child")}},
                                        indent=2))
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def _print(results: dict, args, device: str, cuda: bool, peak32: float, peak16: float) -> None:
    sides = list(results)
    memory = "peak GPU memory (allocated)" if cuda else "peak RSS"
    rows = [
        ["trained tokens/s"] + [f"{results[s]['trained_tokens_per_s']:.1f}" for s in sides],
        ["train time (s)"] + [f"{results[s]['train_seconds']:.1f}" for s in sides],
        ["process wall time (s)"] + [f"{results[s]['wall_seconds']:.1f}" for s in sides],
        [memory] + [gib(results[s]["peak_memory"]) for s in sides],
        ["trained / computed tokens"] + [f"{results[s]['trained_per_computed']:.3f}" for s in sides],
        ["real / computed tokens (no padding)"] + [f"{results[s]['real_tokens'] / results[s]['computed_tokens']:.3f}" for s in sides],
        ["trained tokens"] + [str(results[s]["trained_tokens"]) for s in sides],
        ["computed tokens"] + [str(results[s]["computed_tokens"]) for s in sides],
        ["final loss (mean of last 5 steps)"] + [f"{results[s]['final_loss']:.4f}" for s in sides],
        ["MFU vs fp32 peak"] + [f"{results[s]['mfu_fp32']:.3f}" for s in sides],
        ["MFU vs bf16 peak"] + [f"{results[s]['mfu_bf16']:.3f}" for s in sides],
        ["bf16 / grad. checkpointing"] + [f"{results[s]['bf16']} / {results[s]['gradient_checkpointing']}" for s in sides],
        ["attention"] + [str(results[s]["attention"]) for s in sides],
    ]
    print_table(f"{device}: {args.method} (LoRA r={args.lora_r}), {args.steps} steps x {args.batch} rows x {args.max_len} "
                f"tokens, lr {args.lr} (fp32 peak {peak32 / 1e12:.2f}, bf16 peak {peak16 / 1e12:.2f} TFLOP/s)",
                ["", *sides], rows)
    if "sftlab" not in results:
        return
    s = results["sftlab"]
    for side in sides[:-1]:
        t = results[side]
        print(f"sftlab / {side}: trained tokens/s x{s['trained_tokens_per_s'] / t['trained_tokens_per_s']:.2f}, "
              f"peak memory x{s['peak_memory'] / t['peak_memory']:.2f}, final loss {s['final_loss']:.4f} vs {t['final_loss']:.4f}")
        n = min(len(s["losses"]), len(t["losses"]))
        marks = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1}) if n else []
        print("  loss curve (step: sftlab / TRL): " + ", ".join(f"{i + 1}: {s['losses'][i]:.3f} / {t['losses'][i]:.3f}" for i in marks))


if __name__ == "__main__":
    main()
