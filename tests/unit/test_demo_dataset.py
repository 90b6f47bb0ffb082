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
