"""Two processes (torchrun, gloo on CPU) take exactly the steps one process takes on the same
rows, and the run's figures cover both (ddp_checks.py runs every check in one launch):
- the loss is normalised by trained tokens counted across processes: one step gives the same
  weights on transformers' sdpa with one row per example and on the default path (sftlab_varlen,
  flattened, shape-rounded);
- trained tokens seen and the per-token eval loss are the ones a single process reports (an odd
  number of eval rows: the example accelerate repeats to even out the last batch must not count)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_checks import run_all

pytestmark = [pytest.mark.slow, pytest.mark.all_cores]

SCRIPT = Path(__file__).with_name("ddp_checks.py")


def write(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n" for q, a in rows))
    return path


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """(one process at batch 2, in this process; two processes at batch 1): each check's results."""
    root = tmp_path_factory.mktemp("ddp")
    step_data = write(root / "step.jsonl", [("Name a fruit.", "Apple."), ("Count to five.", "One, two, three, four, five.")])
    count_data = write(root / "count.jsonl", [
        ("Name a fruit.", "Apple."), ("Count to five.", "One, two, three, four, five, six, seven, eight."),
        ("Say hi.", "Hi."),
    ])  # trained on the first two; evaluated on all three, so under 2 x batch 1 the last batch is evened out
    single = run_all(str(tiny_model_dir), str(step_data), str(count_data), str(root / "single"), 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
                    str(tiny_model_dir), str(step_data), str(count_data), str(root / "multi.pt"), "1"],
                   check=True, env=env, timeout=600)
    return single, torch.load(root / "multi.pt"), count_data


@pytest.mark.parametrize("path", ["sdpa-rows", "default"])
def test_two_processes_take_the_one_process_step(runs, tiny_model_dir, path):
    from transformers import AutoModelForCausalLM

    a, b = runs[0][path], runs[1][path]
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    assert a.keys() == b.keys()
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # the step moved the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_two_processes_count_every_trained_token_and_the_whole_eval_set(runs, tokenizer):
    from sftlab.data.load import load_conversations
    from sftlab.data.render import render_many

    a, b = runs[0]["counts"], runs[1]["counts"]
    trained = [e.num_trained for e in render_many(load_conversations(runs[2]), tokenizer)]
    assert trained[0] != trained[1]  # one process alone would count a different number
    assert a["trained_tokens_seen"] == b["trained_tokens_seen"] == 2 * sum(trained[:2])  # 2 steps over both rows
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5), (a, b)
