"""Under two processes (torchrun, gloo on CPU) the run's figures cover both: trained tokens
seen and the per-token eval loss are the ones a single process reports on the same rows (an
odd number of eval rows: the example accelerate repeats to even out the last batch must not count)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_counts.py")


@pytest.mark.slow
@pytest.mark.all_cores
def test_two_processes_count_every_trained_token_and_the_whole_eval_set(tiny_model_dir, tmp_path, tokenizer):
    from sftlab.data.load import load_conversations
    from sftlab.data.render import render_many

    data = tmp_path / "d.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]},
        {"messages": [{"role": "user", "content": "Count to five."},
                      {"role": "assistant", "content": "One, two, three, four, five, six, seven, eight."}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]},
    ]  # trained on the first two; evaluated on all three, so under 2 x batch 1 the last batch is evened out
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    subprocess.run([sys.executable, str(SCRIPT), str(tiny_model_dir), str(data), str(single), "2"],
                   check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
                    str(SCRIPT), str(tiny_model_dir), str(data), str(multi), "1"], check=True, env=env, timeout=300)
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    trained = [e.num_trained for e in render_many(load_conversations(data), tokenizer)]
    assert trained[0] != trained[1]  # one process alone would count a different number
    assert a["trained_tokens_seen"] == b["trained_tokens_seen"] == 2 * sum(trained[:2])  # 2 steps over both rows
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5), (a, b)
