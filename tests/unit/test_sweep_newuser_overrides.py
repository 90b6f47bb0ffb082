"""The search space changed on the command line, as any other key: `sweep.space.KEY=VALUE`."""

from __future__ import annotations

import yaml

from sftlab.cli import main


def test_a_space_key_set_on_the_command_line_is_one_dotted_key(tmp_path, monkeypatch):
    from sftlab.train import sweep

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"train": "t.jsonl", "validation": "v.jsonl"},
        "sweep": {"space": {"training.learning_rate": {"log_uniform": [1e-5, 3e-3]}, "lora.r": [8, 16, 32]}}}))
    seen = []
    monkeypatch.setattr(sweep, "run_sweep", lambda cfg, trials: seen.append(cfg))
    assert main(["sweep", str(config), "sweep.space.lora.r=[4, 8]", "sweep.space.lora.alpha={int: [8, 64]}",
                 "sweep.objective=exact_match", "--trials", "2"]) == 0
    space = seen[0].sweep.space
    assert space["lora.r"] == [4, 8] and space["lora.alpha"] == {"int": (8, 64)}
    assert space["training.learning_rate"] == {"log_uniform": (1e-5, 3e-3)}  # the file's other keys stay
    assert seen[0].sweep.objective == "exact_match"
