"""Run under torchrun by test_distributed_engines.py: runs that each train, then resume, in the same processes
(one launch for several runs: each launch costs the ranks seconds of imports).

Usage: torchrun --nproc_per_node 2 distributed_run.py CONFIG.yaml RUNS.json
RUNS.json: a list of {"report": REPORT_DIR, "overrides": [key=value, ...]}, run one after the other.

Per run:
1. `train(config)` as `sftlab train` runs it; records, on each rank, how many parameter
   elements the rank holds (ZeRO-3 partitions, FSDP2 DTensor shards) and every file the
   rank opened for writing inside output_dir (a Python audit hook);
2. rank 0 keeps the final model aside, deletes the last checkpoint, and every rank resumes
   from the one before (`train(config, resume=True)`), which must end on the same weights.
Writes REPORT_DIR/rank{R}.json.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from sftlab.config import load_config
from sftlab.train import distributed
from sftlab.train.trainer import SFTTrainer, train

config_path, runs = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
rank = distributed.rank()
out = Path()  # the output_dir of the run in progress
writes: set[str] = set()
held: dict = {}


def audit(event, args):
    """Files opened for writing, folders made and files renamed inside output_dir (files that
    C++/Rust code writes, e.g. safetensors, show through their folder's mkdir)."""
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        mode, flags = args[1], args[2]
        touched = [args[0]] if (mode and any(c in mode for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR)) else []
    elif event in ("os.mkdir", "os.rename"):
        touched = [args[0], *args[1:2]] if event == "os.rename" else [args[0]]
    else:
        return
    for p in touched:
        path = Path(os.fsdecode(p)).resolve()
        if path.is_relative_to(out):
            writes.add(str(path.relative_to(out)))


def holdings(model) -> dict:
    """Parameter elements the model has in full, and those this rank stores."""
    full = local = 0
    kinds = set()
    for p in model.parameters():
        if hasattr(p, "ds_numel"):  # DeepSpeed ZeRO-3 partitioned parameter
            full += p.ds_numel
            local += p.ds_tensor.numel()
            kinds.add("zero3")
        elif hasattr(p, "to_local"):  # FSDP2 DTensor
            full += p.numel()
            local += p.to_local().numel()
            kinds.add("dtensor")
        else:
            full += p.numel()
            local += p.numel()
            kinds.add("tensor")
    units = sorted(type(m).__name__ for m in model.modules() if type(m).__name__.startswith("FSDP"))
    return {"full": full, "local": local, "kinds": sorted(kinds), "wrapper": type(model).__name__, "fsdp_units": units}


original = SFTTrainer.compute_loss


def recording_compute_loss(self, model, inputs, *args, **kwargs):
    held.setdefault("first_step", holdings(model))
    return original(self, model, inputs, *args, **kwargs)


SFTTrainer.compute_loss = recording_compute_loss
sys.addaudithook(audit)
for run in runs:
    config = load_config(config_path, run["overrides"])
    out, report_dir = Path(config.output_dir).resolve(), Path(run["report"])
    writes.clear()
    held.clear()
    info = train(config)
    distributed.barrier()
    run_writes = sorted(writes)

    kept = report_dir / "first_model"
    if rank == 0:
        shutil.copytree(out / ("model" if config.method == "full" else "adapter"), kept)
        last = max(out.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        shutil.rmtree(last)
    distributed.barrier()
    train(config, resume=True)
    report = {"rank": rank, "world_size": distributed.world_size(), "writes": run_writes, "held": dict(held),
              "trained_tokens_seen": info["trained_tokens_seen"], "engine": info["engine"],
              "threads": torch.get_num_threads()}
    (report_dir / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
distributed.end_rank(0)
