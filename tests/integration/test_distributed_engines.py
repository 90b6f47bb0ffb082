"""DDP, DeepSpeed ZeRO-2/3 and FSDP2 with two processes (torchrun, gloo on CPU) against one
process with the same global batch, on the default padding-free path (packed rows, varlen
attention, batches flattened), fp32.

One torchrun launch per engine (distributed_run.py) trains 4 steps with checkpoints every 2,
then resumes from step 2 in the same processes; under DDP and ZeRO-2 a LoRA run follows in the same
launch and is checked alike. Checked per engine:
- the gathered final model loads in one process and gives the one-process run's logits;
- every logged loss equals the one-process loss;
- the trained-token count is reduced across ranks;
- ZeRO-3 and FSDP really shard the parameters on each rank (a Trainer on CPU can silently
  fall back to DDP), DDP and ZeRO-2 keep full copies;
- only rank 0 wrote the run's files (other ranks only their checkpoint shards);
- resuming from the sharded checkpoint ends on the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.all_cores]

SCRIPT = Path(__file__).with_name("distributed_run.py")
ENGINES = {  # distributed: value -> (engine label, parameters sharded)
    "ddp": ("DDP", False),
    "zero2": ("DeepSpeed ZeRO-2", False),
    "zero3": ("DeepSpeed ZeRO-3", True),
    "fsdp": ("FSDP2", True),
}
RUN_FILES = {"config.yaml", "run.json", "README.md", "metrics.jsonl", "model", "tokenizer"}


def write_data(path: Path, n: int = 24) -> Path:
    import random

    rng = random.Random(0)
    words = "apple river stone cloud green quick seven orange music table light window garden silver".split()
    with path.open("w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
            a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return path


def base_config(model_dir: Path, data: Path) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "method": "full",
        "data": {"train": str(data), "max_seq_length": 64},  # packed rows of 2-3 examples
        "training": {"max_steps": 4, "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 1,
                     "learning_rate": 1e-3, "bf16": False, "warmup_ratio": 0, "lr_scheduler_type": "constant",
                     "seed": 0},
    }


def env(cache: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "SFTLAB_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                                        os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def engines_root(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("engines")
    data = write_data(root / "train.jsonl")
    (root / "config.yaml").write_text(yaml.safe_dump(base_config(tiny_model_dir, data)))
    return root


def one_process(root: Path, name: str, *overrides: str) -> Path:
    """One process, batch 2: the run every engine must reproduce with 2 processes x batch 1 (in this
    process: under the all_cores lock, a second start-up of the libraries would be time no test uses)."""
    from sftlab.cli import main

    out = root / name
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTLAB_CACHE", str(root / "cache"))
        assert main(["train", str(root / "config.yaml"), "training.per_device_train_batch_size=2", *overrides,
                     f"output_dir={out}"]) == 0
    return out


def two_processes(root: Path, runs: dict[str, tuple[Path, Path, tuple[str, ...]]]) -> dict[str, list[dict]]:
    """distributed_run.py under torchrun, one launch for RUNS (name -> output_dir, report folder, overrides), each
    trained, then resumed: each run's report of each rank."""
    spec = []
    for out, report, overrides in runs.values():
        report.mkdir(parents=True)
        spec.append({"report": str(report), "overrides": [*overrides, f"output_dir={out}"]})
    (root / "runs.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
         str(root / "config.yaml"), str(root / "runs.json")],
        env=env(root / "cache"), timeout=900, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
            for name, (_, report, _) in runs.items()}


LORA = ("method=lora", "lora.r=8", "lora.alpha=16", "lora.dropout=0", "training.learning_rate=1e-2")
# LoRA under the engines that keep full weights (ZeRO-3 and FSDP2 LoRA: test_distributed_cli.py)
LORA_ENGINES = ("ddp", "zero2")


@pytest.fixture(scope="module")
def launches(engines_root, tmp_path_factory):
    """engine -> {"full" and, under LORA_ENGINES, "lora": (output_dir, report folder, each rank's report)}: one
    torchrun launch per engine, made by the first test that asks for it."""
    done: dict[str, dict] = {}

    def launch(engine: str) -> dict:
        if engine not in done:
            base = tmp_path_factory.mktemp(engine)
            methods = {"full": ()} | ({"lora": LORA} if engine in LORA_ENGINES else {})
            runs = {m: (base / m / "run", base / m / "report", (*extra, f"distributed={engine}"))
                    for m, extra in methods.items()}
            ranks = two_processes(engines_root, runs)
            done[engine] = {m: (out, report, ranks[m]) for m, (out, report, _) in runs.items()}
        return done[engine]

    return launch


@pytest.fixture(scope="module")
def reference(engines_root):
    return engines_root, one_process(engines_root, "reference")


def metrics_losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in lines if "loss" in e]


def logits_and_loss(model_dir: Path, batch: dict):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    return out.logits, out.loss


def lora_logits(base_dir: Path, adapter: Path, batch: dict) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter)
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def probe_batch(root: Path, tiny_model_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = [json.loads(line)["messages"][1]["content"] for line in (root / "train.jsonl").read_text().splitlines()[:2]]
    enc = tok(text, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": enc["input_ids"]}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_processes_equal_one_process(engine, reference, launches, tiny_model_dir):
    root, ref = reference
    out, report, ranks = launches(engine)["full"]
    label, sharded = ENGINES[engine]
    ref_info = json.loads((ref / "run.json").read_text())

    for r in ranks:
        held = r["held"]["first_step"]
        if sharded:  # each rank stores about half of the parameters
            assert held["local"] <= 0.55 * held["full"], held
        else:
            assert held["local"] == held["full"] and held["kinds"] == ["tensor"], held
        if engine == "fsdp":  # fully_shard on each decoder layer (auto-wrap) and on the root
            units = held["fsdp_units"]
            assert units.count("FSDPLlamaDecoderLayer") == 2 and "FSDPLlamaForCausalLM" in units, held
        assert r["world_size"] == 2 and r["engine"] == f"{label} x 2 processes"
        # counted on both ranks, reduced across them: the one-process count
        assert r["trained_tokens_seen"] == ref_info["trained_tokens_seen"] > 0

    # rank 0 wrote the run's files; rank 1 nothing but the run folder and its checkpoint shards
    top0 = {w.split("/")[0] for w in ranks[0]["writes"]}
    assert RUN_FILES <= top0, top0
    assert all(w == "." or w.startswith("checkpoints/") for w in ranks[1]["writes"]), ranks[1]["writes"]

    # the same losses, step by step
    assert metrics_losses(out)[:4] == pytest.approx(metrics_losses(ref)[:4], abs=1e-4)
    # the gathered model: plain safetensors that load in one process, with the reference's logits
    assert (report / "first_model" / "model.safetensors").exists()
    batch = probe_batch(root, tiny_model_dir)
    ref_logits, ref_loss = logits_and_loss(ref / "model", batch)
    logits, loss = logits_and_loss(report / "first_model", batch)
    base_logits, _ = logits_and_loss(tiny_model_dir, batch)
    assert (ref_logits - base_logits).abs().max() > 1e-2  # training moved the model
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)
    assert abs(loss.item() - ref_loss.item()) <= 1e-4
    # resumed from the step-2 checkpoint: the same final weights as the uninterrupted run
    resumed, _ = logits_and_loss(out / "model", batch)
    torch.testing.assert_close(resumed, logits, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def lora_reference(engines_root):
    return one_process(engines_root, "lora_reference", *LORA)


@pytest.mark.parametrize("engine", LORA_ENGINES)
def test_lora_two_processes_equal_one_process_and_resume(engine, engines_root, lora_reference, launches, tiny_model_dir):
    """LoRA on the default packed path; the adapter resumes from its step-2 checkpoint."""
    root, ref = engines_root, lora_reference
    out, report, ranks = launches(engine)["lora"]
    assert all(r["engine"] == f"{ENGINES[engine][0]} x 2 processes" for r in ranks)
    assert metrics_losses(out)[:4] == pytest.approx(metrics_losses(ref)[:4], abs=1e-4)
    batch = probe_batch(root, tiny_model_dir)
    expected = lora_logits(tiny_model_dir, ref / "adapter", batch)
    base_logits, _ = logits_and_loss(tiny_model_dir, batch)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter does something
    first = lora_logits(tiny_model_dir, report / "first_model", batch)
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-4)
    # resumed from the step-2 checkpoint: the same adapter as the uninterrupted run
    torch.testing.assert_close(lora_logits(tiny_model_dir, out / "adapter", batch), first, rtol=0, atol=1e-5)
