"""Two processes (torchrun, gloo on CPU) take exactly the step one process takes on the
same rows: the loss is normalised by trained tokens counted across processes. On transformers'
sdpa with one row per example, and on the default path (sftlab_varlen, flattened, shape-rounded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_step.py")


@pytest.mark.all_cores
@pytest.mark.parametrize("path,port", [("sdpa-rows", 29533), ("default", 29534)])
def test_two_processes_equal_one_process(tiny_model_dir, tmp_path, path, port):
    data = tmp_path / "d.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]},
        {"messages": [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "One, two, three, four, five."}]},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    single, multi = tmp_path / "single.pt", tmp_path / "multi.pt"
    subprocess.run([sys.executable, str(SCRIPT), str(tiny_model_dir), str(data), str(single), "2", path],
                   check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                    str(SCRIPT), str(tiny_model_dir), str(data), str(multi), "1", path], check=True, env=env, timeout=300)
    from transformers import AutoModelForCausalLM

    a, b = torch.load(single), torch.load(multi)
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    assert a.keys() == b.keys()
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # the step moved the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
