"""Where a training step's time and memory go: torch.profiler on a short real `sftlab train` run.

    python bench/profile_step.py                       # Alpaca-shaped short examples, packed, 8 x 512
    python bench/profile_step.py --workload long       # one ~480-token example per row
    python bench/profile_step.py --warmup 3 --steps 2 --batch 8 --max-len 512
    python bench/profile_step.py --training compile_norms=true   # any training setting on top

The run is `sftlab.train.trainer.train` itself (SmolLM2-135M-Instruct: Q4_1 GGUF, dequantised;
LoRA r=16 on all linear layers, defaults otherwise), with scopes added from outside: forward
hooks put each module's ops into a profiler range (base linear, LoRA adapter, norm, attention,
MLP, lm_head...), the attention function and the loss are wrapped, and optimizer step hooks mark
the optimizer. Backward ops are attributed to the forward op that recorded them (the autograd
sequence number the profiler stores on both), so "LoRA adapters" means their forward AND
backward.
Self CPU times are summed per category over the profiled steps; their shares do not depend on
how busy the machine is (every op slows alike), their sum does. "Python / framework" is the
step's wall time not spent inside any op (module code, hooks, autograd engine, Trainer), and
the profiler's own per-op cost lands there too, so it is an upper bound.

Memory is read in the warm-up steps, before profiling starts: peak RSS (kernel high-water
mark), tensors saved for backward at the end of a forward (unique storages), the logits,
weights, gradients and AdamW state, and glibc's heap bytes that are free but not returned
(mallinfo2). The rest of the peak is libraries, kernel caches (oneDNN) and the transient
tensors of backward.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alpaca_data import write_alpaca_dataset, write_long_dataset  # noqa: E402
from common import scratch_dir, status_bytes, train_with_callback  # noqa: E402

CATEGORIES = {
    "base": "base matmuls (frozen linear layers)",
    "lora": "LoRA adapters (A, B, scaling, add)",
    "attention": "attention kernel (+ per-example slicing)",
    "rope": "RoPE, q/k/v reshapes",
    "norm": "RMSNorm",
    "activation": "SwiGLU activation (silu, gate x up)",
    "residual": "residual adds, embedding",
    "lm_head": "lm_head + loss (trained positions)",
    "cast": "dtype casts (autocast copies)",
    "optimizer": "optimizer (AdamW, zero_grad, grad clipping)",
    "data": "data (collate)",
    "other": "other ops (masks, position ids, trainer)",
    "python": "Python / framework / profiler (no op running)",
}
CASTS = {"aten::_to_copy", "aten::copy_", "aten::to", "aten::_autocast_to_reduced_precision"}
BACKWARD = "autograd::engine::evaluate_function: "
SCOPE = "sftlab::"


def module_category(name: str, module) -> str | None:
    cls = type(module).__name__
    leaf = name.rsplit(".", 1)[-1]
    if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
        return "lora"  # the wrapper: its base_layer gets its own scope below
    if leaf == "base_layer":
        return "base"
    if leaf == "lm_head":
        return "lm_head"
    if cls == "Linear" and ".lora_" not in name:
        return "base"  # full fine-tuning
    if "Norm" in cls:
        return "norm"
    if leaf in ("self_attn", "rotary_emb"):
        return "rope"
    if leaf in ("mlp", "act_fn"):
        return "activation"
    if leaf == "embed_tokens" or "DecoderLayer" in cls:
        return "residual"
    return None


class Scopes:
    """Profiler ranges around module forwards, the attention function, the loss, the optimizer and collate."""

    def __init__(self):
        import torch

        self.enter = torch.ops.profiler._record_function_enter_new
        self.exit = torch.ops.profiler._record_function_exit
        self.stack: list = []

    def push(self, category: str) -> None:
        self.stack.append(self.enter(SCOPE + category, None))

    def pop(self) -> None:
        self.exit(self.stack.pop())

    def wrap(self, fn, category: str):
        def wrapped(*args, **kwargs):
            self.push(category)
            try:
                return fn(*args, **kwargs)
            finally:
                self.pop()
        return wrapped

    def install_model(self, model) -> None:
        for name, module in model.named_modules():
            category = module_category(name, module)
            if category:
                module.register_forward_pre_hook(lambda m, a, c=category: self.push(c))
                module.register_forward_hook(lambda m, a, o: self.pop())

    def install_attention(self, model) -> None:
        """Wrap the attention function the model now uses (after train() registered it)."""
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        name = model.config._attn_implementation
        if name in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, self.wrap(ALL_ATTENTION_FUNCTIONS[name], "attention"))

    def install_global(self) -> None:
        import torch

        import sftlab.data.pack as pack
        import sftlab.train.loss as loss

        loss.cross_entropy_sum = self.wrap(loss.cross_entropy_sum, "lm_head")
        if hasattr(loss, "linear_cross_entropy_sum"):  # the fused head + loss
            loss.linear_cross_entropy_sum = self.wrap(loss.linear_cross_entropy_sum, "lm_head")
        pack.collate = self.wrap(pack.collate, "data")
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(lambda *a: self.push("optimizer"))
        register_optimizer_step_post_hook(lambda *a: self.pop())
        for owner, attr in ((torch.nn.utils, "clip_grad_norm_"),):
            setattr(owner, attr, self.wrap(getattr(owner, attr), "optimizer"))


def attribute(events) -> dict[str, float]:
    """Self CPU microseconds per category (see the module docstring)."""
    forward_category: dict[int, str] = {}

    def scope_of(e) -> str | None:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith(SCOPE):
                return p.name[len(SCOPE):]
            if p.name.startswith(BACKWARD):
                return forward_category.get(p.sequence_nr, "other")
            p = p.cpu_parent
        return None

    ordered = sorted(events, key=lambda e: e.time_range.start)
    totals: dict[str, float] = defaultdict(float)
    for e in ordered:  # forwards come before their backwards
        if e.name.startswith(SCOPE) or e.name.startswith(BACKWARD) or e.name.startswith("ProfilerStep"):
            continue  # their self time is framework time: the step's wall minus all op time
        category = scope_of(e) or "other"
        if e.sequence_nr is not None and e.sequence_nr >= 0 and category != "other":
            forward_category.setdefault(e.sequence_nr, category)
        if e.name in CASTS and category not in ("optimizer", "data"):
            category = "cast"
        totals[category] += e.self_cpu_time_total
    return totals


def mallinfo_free_bytes() -> int | None:
    """glibc heap bytes that are free but still held by the process (mallinfo2 fordblks)."""
    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = MallInfo2
    return fn().fordblks


class Probe:
    """Memory in the warm-up steps, then the profiler over the next `steps` steps."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.saved = self.logits = 0
        self.memory: dict = {}
        self.prof = None
        self.t0 = self.wall = 0.0
        self.rows_tokens: list[int] = []

    def saved_tensor_hooks(self):
        """Context for one forward: sums the unique storages autograd saves."""
        import torch

        seen: dict[int, int] = {}

        def pack_hook(t):
            try:
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):
                pass
            return t

        probe = self

        class Ctx(torch.autograd.graph.saved_tensors_hooks):
            def __exit__(self, *exc):
                probe.saved = max(probe.saved, sum(seen.values()))
                return super().__exit__(*exc)

        return Ctx(pack_hook, lambda t: t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["alpaca", "long"], default="alpaca")
    ap.add_argument("--model", default="default")
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2, help="steps before profiling (memory is read there)")
    ap.add_argument("--steps", type=int, default=2, help="profiled steps")
    ap.add_argument("--attn", default=None, help="model.attn_implementation (default: sftlab's choice)")
    ap.add_argument("--top", type=int, default=0, help="also print the N ops with the most self CPU time")
    ap.add_argument("--training", action="append", default=[], metavar="KEY=JSON",
                    help="a training setting on top, e.g. compile_norms=true (repeatable)")
    args = ap.parse_args()
    training = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.training)}

    import torch
    from transformers import TrainerCallback

    from sftlab.train import trainer as trainer_mod

    work = scratch_dir("sftlab-profile-")
    n = args.batch * (args.warmup + args.steps) * (args.max_len // 100 + 1) * 2
    data = (write_alpaca_dataset if args.workload == "alpaca" else write_long_dataset)(work / "train.jsonl", n)
    scopes = Scopes()
    scopes.install_global()
    probe = Probe(args.warmup, args.steps)

    original_loss = trainer_mod.SFTTrainer.compute_loss
    installed = []

    def compute_loss(self, model, inputs, *a, **k):
        if not installed:
            scopes.install_model(model)
            scopes.install_attention(getattr(model, "get_base_model", lambda: model)())
            model.lm_head_probe = model.get_output_embeddings().register_forward_hook(
                lambda m, i, o: setattr(probe, "logits", max(probe.logits, o.numel() * o.element_size())))
            installed.append(model)
        probe.rows_tokens.append(int(inputs["input_ids"].numel()))
        if probe.prof is None:
            with probe.saved_tensor_hooks():
                return original_loss(self, model, inputs, *a, **k)
        return original_loss(self, model, inputs, *a, **k)

    trainer_mod.SFTTrainer.compute_loss = compute_loss

    class Profile(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, optimizer=None, **kw):
            if state.global_step == args.warmup:
                opt_state = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                                for t in s.values() if torch.is_tensor(t))
                params = list(model.parameters())
                probe.memory = {
                    "peak RSS (kernel high-water mark)": status_bytes()["VmHWM"],
                    "RSS at the end of the step": status_bytes()["VmRSS"],
                    "weights": sum(p.numel() * p.element_size() for p in params),
                    "gradients + AdamW state": opt_state + sum(p.numel() * p.element_size()
                                                               for p in params if p.requires_grad),
                    "tensors saved for backward (end of forward)": probe.saved,
                    "logits (lm_head output)": probe.logits,
                    "glibc heap free but held (end of step)": mallinfo_free_bytes(),
                }
                probe.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    record_shapes=args.top > 0)
                probe.prof.__enter__()
                probe.t0 = time.perf_counter()
            elif state.global_step == args.warmup + args.steps and probe.prof is not None:
                probe.wall = time.perf_counter() - probe.t0
                probe.prof.__exit__(None, None, None)

    info = train_with_callback(Profile(), args.model, data, work / "run", method=args.method, batch=args.batch,
                               max_len=args.max_len, steps=args.warmup + args.steps, attn=args.attn,
                               training=training)
    report(probe, args, info)


def report(probe: Probe, args, info: dict) -> None:
    totals = attribute(probe.prof.events())
    wall_us = probe.wall * 1e6
    totals["python"] += max(0.0, wall_us - sum(totals.values()))
    tokens = probe.rows_tokens[args.warmup:args.warmup + args.steps]
    print(f"\n{args.workload}: {args.steps} profiled steps, {probe.wall:.1f} s wall ({probe.wall / args.steps:.1f} s/step), "
          f"tokens per step {tokens}, attention {info['attention']}, bf16 {info['bf16']}")
    print(f"| where a step's time goes ({args.workload}) | share of the step |\n|---|---|")
    for key, share in sorted(((k, v / wall_us) for k, v in totals.items()), key=lambda kv: -kv[1]):
        print(f"| {CATEGORIES.get(key, key)} | {100 * share:.1f} % |")
    print(f"\n| where the peak memory goes ({args.workload}, step {args.warmup}) | GiB |\n|---|---|")
    for key, value in probe.memory.items():
        print(f"| {key} | {'n/a' if value is None else f'{value / 1024**3:.2f}'} |")
    if args.top:
        print(probe.prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total",
                                                                        row_limit=args.top, max_name_column_width=50))


if __name__ == "__main__":
    main()
