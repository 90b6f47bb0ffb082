"""sftlab vs TRL's SFTTrainer, side by side: same model, data and hyper-parameters.

    python bench/train_vs_trl.py                  # CPU: 3 rounds x 3 set-ups, 12 steps x 4 x 512 each
    python bench/train_vs_trl.py --steps 3 --repeats 1   # smoke run
    python bench/train_vs_trl.py --workload alpaca --batch 8 --steps 14   # Alpaca-shaped records
    python bench/train_vs_trl.py --shape qwen2.5-0.5b --per-task 200 --batch 8 --max-len 1024 --steps 30
                                                  # on a GPU: a random Qwen2.5-0.5B-shaped model
    bash bench/gpu_suite.sh OUT                   # on a GPU: the CUDA tests and both GPU benchmarks

Every set-up trains LoRA (r=16, all linear layers; `--method full` for full fine-tuning) on
the embedded SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised) (or a random model of
`--shape`, with the SmolLM2 tokenizer) with the demo dataset (`--workload demo`: four short
uniform tasks) or Alpaca-shaped records (`--workload alpaca`, bench/alpaca_data.py: short
instructions, answers of 20-300 tokens, ~15 % multi-turn), each run in a fresh process.
The set-ups (`--sides`):

- `trl`: TRL like for like, its fastest documented setting on the same terms as sftlab:
  `packing=True` (best-fit decreasing, which turns on padding-free batches), gradient
  checkpointing OFF (SFTConfig turns it on by default), the base loaded in the same dtype as
  sftlab's (`model_init_kwargs.dtype`), bf16 autocast when sftlab uses it, and an attention
  kernel of the same family (CPU: SDPA, which TRL's padding-free batches reach through a
  block-diagonal mask; CUDA: flash varlen: `flash_attention_2` when `flash_attn` is installed,
  else PyTorch's varlen flash kernel, the one sftlab calls, through sftlab's attention function,
  which reads the example bounds TRL's padding-free collator passes; `--trl-attention` overrides),
  and on CUDA Liger's layer kernels where `liger_kernel` is installed (`use_liger_kernel`:
  RMSNorm, RoPE, SwiGLU; TRL keeps its own fused LM head; `--trl-liger`);
- `trl-default`: TRL out of the box: `SFTConfig`'s defaults (no packing: one padded example
  per row; gradient checkpointing on; bf16 autocast) and TRL's own model loading from the
  folder (fp32 base unless told otherwise);
- `sftlab`: `sftlab.train.trainer.train` with its defaults (bf16 where supported; a LoRA base
  in bf16 then; packing; padding-free varlen attention: on CPU SDPA's flash kernel on groups of
  examples of similar length, whole fp32 score matrices (matmul + softmax, as SDPA's math kernel)
  for groups of short ones; fused varlen flash on CUDA; on CUDA Liger's RMSNorm, RoPE and SwiGLU
  where `liger_kernel` is installed, as for TRL; no gradient checkpointing), on the
  memory allocator `sftlab train` runs on
  (tcmalloc preloaded where installed, train/allocator.py); the TRL set-ups run on the
  process's own (glibc's malloc, TRL's default; a TRL user could preload tcmalloc too).

Both TRL set-ups get the data as prompt/completion records (TRL's documented way to train
on completions only with a template that has no generation markers). Rounds are interleaved
(each round runs every set-up once, in a rotating order) so a change of load on a shared
machine hits all set-ups alike; the summary gives the median and range over the rounds.

What each set-up really ran with is read inside its process at the first training step
(weights dtype, autocast, attention implementation, gradient checkpointing, batch shape,
padding mask) and printed, so the set-up table is measured, not declared.

Every set-up writes the checkpoint transformers saves at the end of training (save_strategy
"steps" with save steps beyond the run: sftlab keeps it so that a finished run can go on with
more steps; TRL's defaults write it too): model and optimizer state, 12 bytes a parameter in
full fine-tuning, inside `trainer.train()`; with `--no-end-save` none does (a callback on every
side turns that save off).

Printed for each set-up: trained tokens/s (label tokens, timed around `trainer.train()`;
without the first step, which builds the CPU kernels; and from the start of the first step to
the end of the last, leaving out the end-of-training checkpoint), peak RSS of the process (on
CUDA: peak allocated GPU memory), trained/computed and real/computed tokens, final loss;
then sftlab/TRL ratios (of the medians, and the range of the per-round ratios), the
device's fp32 and bf16 matmul peak measured in the same run, and each side's MFU:

    MFU = useful FLOPs / train seconds / matmul peak, with useful FLOPs, written out:
      k x N_body x real tokens                 (decoder linear layers)
    + 6 x N_lora x real tokens                 (LoRA adapters: forward, input and weight gradients)
    + k_head x N_head x trained positions      (the output head, needed on trained positions only)
    + 12 x hidden x layers x causal pairs      (attention scores and values: 4 forward, 8 backward)

N_body = the decoder's linear weights, N_head = vocab x hidden, k = 6 for full fine-tuning
(forward 2N, backward 4N) and 4 for LoRA (a frozen weight needs no weight gradient: forward 2N +
input gradient 2N); k_head = 6 where the head is trained, else 4; causal pairs = the sum over
examples of L(L+1)/2 (each example attends only to itself). Work a set-up does beyond these
(the head on untrained positions, attention across packed examples, padding, recomputation under
gradient checkpointing) is not useful work and is not counted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alpaca_data import write_alpaca_dataset  # noqa: E402
from common import gib, load_note, matmul_peak_flops, print_table, report_result, run_child, scratch_dir  # noqa: E402

from sftlab.train.allocator import loaded as allocator_name  # noqa: E402
from sftlab.train.allocator import preload_environment  # noqa: E402
from sftlab.train.attention import NAME as ATTENTION_NAME  # noqa: E402
from sftlab.train.attention import _cuda_varlen as cuda_varlen  # noqa: E402
from sftlab.train.attention import register as register_attention  # noqa: E402


SHAPES = {
    # Qwen2.5-0.5B's architecture (random weights: nothing is downloaded)
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, use_sliding_window=False),
    # Qwen2.5-1.5B's architecture
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, use_sliding_window=False),
    # the same family, tiny: a quick check of the whole script on a CPU
    "tiny-qwen": dict(model_type="qwen2", vocab_size=49152, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=True, use_sliding_window=False),
}
SIDES = ("trl", "trl-default", "sftlab")


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


def trl_attention(cuda: bool) -> tuple[str, str]:
    """(attn_implementation for the like-for-like TRL set-up, why): the family sftlab's varlen uses."""
    if not cuda:
        return "sdpa", "sftlab runs SDPA on groups of similar-length examples on CPU, score matrices for short ones"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2", "sftlab runs fused varlen flash attention on CUDA"
    if cuda_varlen() is not None:
        # TRL's padding-free collator hands the model cu_seq_lens_q, which this function reads
        return ATTENTION_NAME, ("the same kernel as sftlab: PyTorch's varlen flash attention, through sftlab's attention "
                      "function (flash_attn is not installed)")
    return "sdpa", "NOT the same family: sftlab runs varlen flash on CUDA, flash_attn is not installed for TRL"


def trl_liger(choice: str, cuda: bool) -> bool:
    """Whether the like-for-like TRL set-up gets Liger's layer kernels (RMSNorm, RoPE, SwiGLU:
    `use_liger_kernel`; TRL keeps its own fused LM head): with `auto`, on CUDA where installed."""
    if choice == "auto":
        return cuda and importlib.util.find_spec("liger_kernel") is not None
    return choice == "on"


def peak_device_memory() -> int | None:
    """Peak allocated CUDA memory of this process in bytes (None on CPU: the parent reads RSS)."""
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


class TokenCounter:
    """Counts the tokens of every batch a Trainer trains on (patched into Trainer.training_step),
    stamps the time each step starts and the last optimizer step ends (a callback added to every
    Trainer: after it, transformers writes the end-of-training checkpoint), and records at the
    first step what the run really uses."""

    def __init__(self, pad_id: int, end_save: bool = True):
        self.pad_id, self.end_save = pad_id, end_save
        self.computed = self.real = self.trained = self.steps = self.causal_pairs = 0
        self.step_trained: list[int] = []
        self.step_starts: list[float] = []
        self.steps_end = float("nan")
        self.setup: dict = {}

    def install(self) -> None:
        from transformers import Trainer, TrainerCallback

        original, original_init = Trainer.training_step, Trainer.__init__
        counter = self

        class StepClock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                counter.steps_end = time.perf_counter()
                if not counter.end_save and state.global_step >= state.max_steps:
                    control.should_save = False  # --no-end-save: after transformers' own flow callback
                return control

        def init(trainer, *args, **kwargs):
            original_init(trainer, *args, **kwargs)
            trainer.add_callback(StepClock())

        def training_step(trainer, model, inputs, *args, **kwargs):
            counter.step_starts.append(time.perf_counter())
            if not counter.setup:
                counter.setup = observed_setup(trainer, model, inputs)
            counter.add(inputs)
            return original(trainer, model, inputs, *args, **kwargs)

        Trainer.training_step = training_step
        Trainer.__init__ = init

    def add(self, inputs: dict) -> None:
        ids, labels = inputs["input_ids"], inputs["labels"]
        trained = int((labels[:, 1:] != -100).sum())  # positions whose next token is trained
        self.steps += 1
        self.computed += ids.numel()
        self.trained += trained
        self.step_trained.append(trained)
        self.real += ids.numel() - self._padding(inputs)
        self.causal_pairs += sum(n * (n + 1) // 2 for n in self._example_lengths(inputs))

    @staticmethod
    def _example_lengths(inputs: dict) -> list[int]:
        """Each example's tokens: packed rows split where position_ids restart, else a row's
        unmasked tokens (trailing padding of a packed row counts as one more, short, example)."""
        pos = inputs.get("position_ids")
        if pos is not None:
            lengths = []
            for row in pos:
                starts = (row == 0).nonzero().flatten().tolist() + [len(row)]
                lengths += [b - a for a, b in zip(starts, starts[1:])]
            return lengths
        mask = inputs.get("attention_mask")
        if mask is not None:
            return [int(m.sum()) for m in mask]
        return [inputs["input_ids"].shape[1]] * inputs["input_ids"].shape[0]

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
        return {"steps": self.steps, "computed_tokens": self.computed, "real_tokens": self.real,
                "trained_tokens": self.trained, "causal_pairs": self.causal_pairs, "step_trained": self.step_trained, "step_starts": self.step_starts,
                "steps_end": self.steps_end,
                "setup": self.setup}


def observed_setup(trainer, model, inputs: dict) -> dict:
    """What a run trains with, read from the live model, trainer and first batch."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    frozen = next((p for p in base.parameters() if not p.requires_grad), None)
    trainable = next(p for p in model.parameters() if p.requires_grad)
    args = trainer.args
    return {
        "base weights": str((frozen if frozen is not None else trainable).dtype).removeprefix("torch."),
        "trainable weights": str(trainable.dtype).removeprefix("torch."),
        "autocast": "bf16" if args.bf16 else "fp16" if args.fp16 else "none",
        "attention": base.config._attn_implementation,
        "gradient checkpointing": bool(getattr(base, "is_gradient_checkpointing", False)),
        "liger kernels": liger_layers(args),
        "batch tensor (step 1)": "x".join(map(str, inputs["input_ids"].shape)),
        "padding mask": inputs.get("attention_mask") is not None,
        "position_ids (example starts)": inputs.get("position_ids") is not None,
        "rows per step": args.per_device_train_batch_size,
        "optimizer steps": args.max_steps,
    }


def liger_layers(args) -> str:
    """The layers Liger's kernels replace in a run: those of RMSNorm, RoPE and SwiGLU that its
    `liger_kernel_config` leaves on (each is on unless the config turns it off)."""
    if not args.use_liger_kernel:
        return "none"
    config = args.liger_kernel_config or {}
    return ", ".join(k for k in ("rms_norm", "rope", "swiglu") if config.get(k, True)) or "none"


def load_messages_as_prompt_completion(path: str):
    """The demo's chat records as prompt/completion: TRL then trains on the assistant reply only."""
    from datasets import load_dataset

    data = load_dataset("json", data_files=path, split="train")
    return data.map(lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
                    remove_columns=data.column_names)


def run_trl(opts: dict) -> None:
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from sftlab.models import load_tokenizer

    tokenizer = load_tokenizer(opts["model"])
    counter = TokenCounter(tokenizer.pad_token_id, opts["end_save"])
    counter.install()
    data = load_messages_as_prompt_completion(opts["train"])
    shared = dict(
        output_dir=opts["out"], max_steps=opts["steps"], per_device_train_batch_size=opts["batch"],
        learning_rate=opts["lr"], lr_scheduler_type="cosine", warmup_steps=0.05, optim="adamw_torch_fused",
        logging_steps=1, save_strategy="steps", save_steps=10**6, report_to="none", seed=0, data_seed=0, max_length=opts["max_len"],
        use_cpu=not torch.cuda.is_available(),
    )
    if opts["side"] == "trl":  # like for like: the settings that differ from TRL's defaults
        if opts["trl_attn"] == ATTENTION_NAME:
            register_attention()  # before TRL loads the model: transformers checks the name
        args = SFTConfig(**shared, packing=True, packing_strategy="bfd", gradient_checkpointing=False,
                         bf16=opts["bf16"], use_liger_kernel=opts["trl_liger"],
                         model_init_kwargs={"dtype": opts["dtype"], "attn_implementation": opts["trl_attn"]})
    else:  # out of the box
        args = SFTConfig(**shared)
    peft_config = LoraConfig(r=opts["lora_r"], lora_alpha=2 * opts["lora_r"], lora_dropout=opts["lora_dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM") if opts["method"] == "lora" else None
    # TRL loads the model from the folder itself, as a user passing a model id would
    trainer = SFTTrainer(model=opts["model"], args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    counter.setup["memory allocator"] = allocator_name()
    counter.setup["packing"] = (f"packing={args.packing} ({args.packing_strategy}), padding_free={trainer.padding_free}"
                                if args.packing else f"packing=False, padding_free={trainer.padding_free}")
    report_result({**counter.as_dict(), "train_seconds": seconds, "losses": losses, "peak_device_memory": peak_device_memory(),
                   "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)})


def run_sftlab(opts: dict) -> None:
    from sftlab.config import TrainConfig
    from sftlab.models import load_tokenizer
    from sftlab.train.trainer import train

    counter = TokenCounter(load_tokenizer(opts["model"]).pad_token_id, opts["end_save"])
    counter.install()
    config = TrainConfig.model_validate({
        "model": {"name_or_path": opts["model"]},  # dtype auto: what a user gets
        "data": {"train": opts["train"], "max_seq_length": opts["max_len"], "packing": True},
        "method": opts["method"],
        "lora": {"r": opts["lora_r"], "alpha": 2 * opts["lora_r"], "dropout": opts["lora_dropout"], "target_modules": "all-linear"},
        "training": {"learning_rate": opts["lr"], "per_device_train_batch_size": opts["batch"], "max_steps": opts["steps"],
                     "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "optim": "adamw_torch_fused", "logging_steps": 1,
                     "save_steps": 10**6, "seed": 0},
        "output_dir": opts["out"],
    })
    info = train(config, log=lambda msg: print(msg, flush=True))
    metrics = [json.loads(x) for x in (Path(opts["out"]) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    counter.setup["memory allocator"] = info["allocator"]
    counter.setup["packing"] = "packing=True (bfd), batches flattened" if counter.setup.get("batch tensor (step 1)", "").startswith("1x") \
        else "packing=True (bfd)"
    report_result({**counter.as_dict(), "train_seconds": info["train_seconds"], "losses": losses,
                   "peak_device_memory": peak_device_memory(), "trainable": info["trainable_params"]})


def flop_shape(model: str) -> dict:
    """The sizes the useful-FLOP count needs, from the model's config (see the module docstring)."""
    from sftlab.estimate import load_model_config, model_shape

    shape = model_shape(load_model_config(model))
    return {"body": shape.decoder_linear_params, "head": shape.vocab * shape.hidden, "hidden": shape.hidden,
            "layers": shape.n_layers}


def useful_flops(r: dict, f: dict, method: str) -> float:
    lora = method == "lora"
    return ((4 if lora else 6) * f["body"] * r["real_tokens"] + (6 * r["trainable"] if lora else 0) * r["real_tokens"]
            + (4 if lora else 6) * f["head"] * r["trained_tokens"] + 12 * f["hidden"] * f["layers"] * r["causal_pairs"])


def summarise(r: dict, run, shape: dict, method: str) -> dict:
    """One run's derived numbers (its MFU once the matmul peak is known, at the end of main)."""
    flops = useful_flops(r, shape, method)
    tail = r["losses"][-5:]
    starts, per_step = r["step_starts"], r["step_trained"]
    # steps 2..n-1 lie between the start of step 2 and the start of step n
    steady = sum(per_step[1:-1]) / (starts[-1] - starts[1]) if len(starts) >= 3 else float("nan")
    return {
        **r, "wall_seconds": run.wall_s, "peak_memory": r["peak_device_memory"] or run.peak_rss,
        "trained_tokens_per_s": r["trained_tokens"] / r["train_seconds"],
        "steady_tokens_per_s": steady,
        "steps_tokens_per_s": r["trained_tokens"] / (r["steps_end"] - starts[0]),
        "trained_per_computed": r["trained_tokens"] / r["computed_tokens"],
        "real_per_computed": r["real_tokens"] / r["computed_tokens"],
        "final_loss": sum(tail) / len(tail),
        "useful_flops_per_s": flops / r["train_seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default",
                    help="model for all set-ups (default: embedded SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised))")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="instead of --model: a random model of this architecture")
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run (3 for a smoke run)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds: each runs every set-up once, in a fresh process")
    ap.add_argument("--batch", type=int, default=4, help="rows per step (packed rows of --max-len tokens)")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--workload", choices=["demo", "alpaca"], default="demo",
                    help="demo tasks, or Alpaca-shaped records (bench/alpaca_data.py)")
    ap.add_argument("--per-task", type=int, default=200,
                    help="demo examples per task (4 tasks); with --workload alpaca, 4x this many records")
    ap.add_argument("--trl-attention", help="attn_implementation for the like-for-like TRL set-up "
                    f"(default: the family sftlab uses; {ATTENTION_NAME} gives TRL sftlab's own attention function)")
    ap.add_argument("--trl-liger", choices=["auto", "on", "off"], default="auto",
                    help="Liger layer kernels for the like-for-like TRL set-up (auto: on CUDA where installed)")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"set-ups to run, comma-separated: {', '.join(SIDES)}")
    ap.add_argument("--no-end-save", dest="end_save", action="store_false",
                    help="no side writes the end-of-training checkpoint (a 1.5B full fine-tuning's is 18 GB: "
                         "minutes of a short GPU lease); sftlab still writes its final model, after its timed train")
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
    from sftlab.train.trainer import base_weights_dtype, device_supports_bf16

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if unknown := set(sides) - set(SIDES):
        ap.error(f"unknown set-up(s) {sorted(unknown)}: choose from {', '.join(SIDES)}")
    cuda = torch.cuda.is_available()
    work = scratch_dir("sftlab-bench-")
    if args.shape:
        model = make_random_model(args.shape, work / args.shape)
    else:
        model = resolve_model_path(args.model)[0]  # convert the embedded model once, outside the timed children
    bf16 = device_supports_bf16()
    dtype = base_weights_dtype(args.method, bf16)  # what sftlab's `model.dtype: auto` loads; TRL like-for-like gets it too
    trl_attn, trl_attn_why = (args.trl_attention, "as asked") if args.trl_attention else trl_attention(cuda)
    liger = trl_liger(args.trl_liger, cuda)
    if args.workload == "alpaca":
        train_path = write_alpaca_dataset(work / "data" / "alpaca.jsonl", 4 * args.per_task)
    else:
        train_path = write_demo_dataset(work / "data", seed=0, sizes={"train": args.per_task})["train"]
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; data: {train_path} ({4 * args.per_task} {args.workload} records); {load_note()}",
          flush=True)
    print(f"like-for-like TRL: base {dtype}, bf16 autocast {bf16}, attention {trl_attn} ({trl_attn_why}), "
          f"Liger layer kernels {liger}", flush=True)
    peak32, peak16 = matmul_peaks(cuda)
    print(f"matmul peak: fp32 {peak32 / 1e12:.2f} TFLOP/s, bf16 {peak16 / 1e12:.2f} TFLOP/s", flush=True)
    shape = flop_shape(model)

    # the sftlab side runs on the allocator `sftlab train` re-executes itself on (train/allocator.py);
    # TRL's on the process's own (glibc's malloc, its default)
    sftlab_preload = {k: v for k, v in (preload_environment(dict(os.environ)) or {}).items()
                      if k == "LD_PRELOAD" or k.startswith("TCMALLOC_")}
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    failed = []
    for rnd in range(args.repeats):
        order = sides[rnd % len(sides):] + sides[:rnd % len(sides)]  # rotate, so no set-up always goes first
        for side in order:
            opts = {"side": side, "model": model, "dtype": dtype, "bf16": bf16, "trl_attn": trl_attn, "trl_liger": liger,
                    "method": args.method, "train": str(train_path), "out": str(work / f"{side}-{rnd}"),
                    "steps": args.steps, "batch": args.batch, "max_len": args.max_len, "lr": args.lr,
                    "lora_r": args.lora_r, "lora_dropout": args.lora_dropout, "end_save": args.end_save}
            run = run_child([sys.executable, __file__, "--child", json.dumps(opts)],
                            env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                 "SFTLAB_CACHE": str(work / "cache"), **(sftlab_preload if side == "sftlab" else {})},
                            echo=False)
            shutil.rmtree(opts["out"], ignore_errors=True)  # full fine-tuning: 12 bytes a parameter
            if run.returncode != 0:
                print(run.output[-4000:])
                print(f"round {rnd + 1} {side} failed (exit {run.returncode}); going on", flush=True)
                failed.append(f"{side}#{rnd + 1}")
                continue
            res = summarise(run.result, run, shape, args.method)
            res["round"] = rnd
            runs[side].append(res)
            print(f"round {rnd + 1}/{args.repeats} {side}: {res['trained_tokens_per_s']:.1f} trained tokens/s, "
                  f"{res['steps_tokens_per_s']:.1f} in the steps, train {res['train_seconds']:.1f} s, "
                  f"peak {gib(res['peak_memory'])}; {load_note()}", flush=True)
    runs = {s: r for s, r in runs.items() if r}
    print(f"{load_note()} (other processes on the machine make timings noisy)", flush=True)
    # a single reading can come out low (it has ranged 1.07-2.38 TFLOP/s bf16 within an hour on one
    # CPU), which would inflate every MFU: read again after the runs and count against the higher
    again32, again16 = matmul_peaks(cuda)
    print(f"matmul peak after the runs: fp32 {again32 / 1e12:.2f} TFLOP/s, bf16 {again16 / 1e12:.2f} TFLOP/s; "
          "MFU counts against the higher of the two readings", flush=True)
    peak32, peak16 = max(peak32, again32), max(peak16, again16)
    for res in (r for side_runs in runs.values() for r in side_runs):
        res["mfu_fp32"], res["mfu_bf16"] = res["useful_flops_per_s"] / peak32, res["useful_flops_per_s"] / peak16
    _print(runs, args, device, cuda, peak32, peak16)
    if args.json:
        args.json.write_text(json.dumps({"device": device, "runs": runs, "peak_fp32": peak32, "peak_bf16": peak16,
                                         "args": {k: str(v) for k, v in vars(args).items() if k not in ("json", "child")}},
                                        indent=2))
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def matmul_peaks(cuda: bool) -> tuple[float, float]:
    """(fp32, bf16) best matmul FLOP/s of this device now."""
    device = "cuda" if cuda else "cpu"
    return matmul_peak_flops(dtype="float32", device=device), matmul_peak_flops(dtype="bfloat16", device=device)


def spread(values: list[float], fmt: str) -> str:
    """median (min–max) of one set-up's runs."""
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{med:{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def _print(runs: dict[str, list[dict]], args, device: str, cuda: bool, peak32: float, peak16: float) -> None:
    sides = list(runs)
    setups = [runs[s][0]["setup"] for s in sides]
    keys = list(dict.fromkeys(k for st in setups for k in st))
    print_table(f"what each set-up ran with (read at its first training step); {args.steps} steps x {args.batch} rows "
                f"x {args.max_len} tokens, lr {args.lr}, {args.method} (LoRA r={args.lora_r})",
                ["", *sides], [[key] + [str(st.get(key, "")) for st in setups] for key in keys])
    for s in sides:  # every round must have run the same set-up
        if any(r["setup"] != runs[s][0]["setup"] for r in runs[s]):
            print(f"WARNING: {s}'s set-up differed between rounds")

    def row(label: str, key: str, fmt: str, scale: float = 1.0) -> list[str]:
        return [label] + [spread([r[key] / scale for r in runs[s]], fmt) for s in sides]

    memory = "peak GPU memory (allocated, GiB)" if cuda else "peak RSS (GiB)"
    rows = [
        row("trained tokens/s", "trained_tokens_per_s", ".1f"),
        row("trained tokens/s after step 1", "steady_tokens_per_s", ".1f"),
        row("trained tokens/s in the steps (no end save)", "steps_tokens_per_s", ".1f"),
        row("train time (s)", "train_seconds", ".1f"),
        row("process wall time (s)", "wall_seconds", ".1f"),
        row(memory, "peak_memory", ".2f", 1024**3),
        row("trained / computed tokens", "trained_per_computed", ".3f"),
        row("real / computed tokens (no padding)", "real_per_computed", ".3f"),
        row("trained tokens", "trained_tokens", ".0f"),
        row("final loss (mean of last 5 steps)", "final_loss", ".4f"),
        row("MFU vs fp32 peak", "mfu_fp32", ".3f"),
        row("MFU vs bf16 peak", "mfu_bf16", ".3f"),
    ]
    n = min(len(r) for r in runs.values())
    print_table(f"{device}: median (min–max) of {n}+ runs per set-up (fp32 peak {peak32 / 1e12:.2f}, "
                f"bf16 peak {peak16 / 1e12:.2f} TFLOP/s)", ["", *sides], rows)
    if "sftlab" not in runs:
        return
    s_runs = runs["sftlab"]
    for side in sides:
        if side == "sftlab":
            continue
        t_runs = runs[side]
        label = "like for like" if side == "trl" else "out of the box"
        parts = []
        for key, name in (("trained_tokens_per_s", "trained tokens/s"), ("steady_tokens_per_s", "after step 1"),
                          ("steps_tokens_per_s", "in the steps"),
                          ("peak_memory", "peak memory")):
            med = statistics.median(r[key] for r in s_runs) / statistics.median(r[key] for r in t_runs)
            paired = [a[key] / b[key] for a in s_runs for b in t_runs if a["round"] == b["round"]]
            rng = f" (per round {min(paired):.2f}–{max(paired):.2f})" if len(paired) > 1 else ""
            parts.append(f"{name} x{med:.2f}{rng}")
        print(f"sftlab / {side} ({label}): " + ", ".join(parts))
        s, t = s_runs[0], t_runs[0]
        n = min(len(s["losses"]), len(t["losses"]))
        marks = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1}) if n else []
        print("  loss curve, round 1 (step: sftlab / TRL): "
              + ", ".join(f"{i + 1}: {s['losses'][i]:.3f} / {t['losses'][i]:.3f}" for i in marks))


if __name__ == "__main__":
    main()
