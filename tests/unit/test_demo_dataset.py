"""The demo dataset: unique prompts across splits, deterministic, and a clear error when a
task's prompt space cannot give as many examples as asked."""

from __future__ import annotations

import pytest

from sftlab.demo.dataset import generate_demo
from sftlab.errors import SftlabError


def test_splits_are_disjoint_and_deterministic():
    a = generate_demo({"train": 30, "test": 10}, seed=3)
    b = generate_demo({"train": 30, "test": 10}, seed=3)
    assert a == b
    prompts = {split: {r["messages"][0]["content"] for r in recs} for split, recs in a.items()}
    assert len(prompts["train"]) == 120 and len(prompts["test"]) == 40
    assert not prompts["train"] & prompts["test"]


def test_asking_for_more_than_a_task_can_make_is_an_error_not_a_hang():
    with pytest.raises(SftlabError, match="sentiment.*cannot make"):
        generate_demo({"train": 1000})


def test_the_shipped_tool_calling_data_is_the_generator_output_and_reads_as_tool_calls(tmp_path):
    """examples/data/tools.*.jsonl is what `write_tool_demo` writes (so it can be regenerated), test
    requests are not in the training data, and every record reads with its tools and calls."""
    from pathlib import Path

    from sftlab.data.load import load_conversations
    from sftlab.demo.tool_calls import write_tool_demo

    shipped = Path(__file__).parents[2] / "examples" / "data"
    for split, path in write_tool_demo(tmp_path).items():
        assert path.read_text() == (shipped / path.name).read_text(), f"regenerate examples/data/{path.name}"
    train, test = (load_conversations(tmp_path / f"tools.{s}.jsonl") for s in ("train", "test"))
    asked = {c.messages[0]["content"] for c in train}
    assert not {c.messages[0]["content"] for c in test} & asked
    assert all(c.tools and c.messages[1]["tool_calls"][0]["function"]["name"] in
               {t["function"]["name"] for t in c.tools} for c in train + test)
    assert sorted({c.meta["task"] for c in test}) == ["answer", "call"]
