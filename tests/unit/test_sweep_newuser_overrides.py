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


def test_exponent_numbers_without_a_dot_are_numbers_in_the_file_and_on_the_command_line(tmp_path, monkeypatch):
    """YAML 1.1 (PyYAML) reads `1e-4` as a string; a sweep's choices are kept as written, so they were strings."""
    from sftlab.train import sweep

    config = tmp_path / "c.yaml"
    config.write_text("data: {train: t.jsonl, validation: v.jsonl}\n"
                      "training: {learning_rate: 2e-4}\n"
                      "sweep: {space: {training.learning_rate: [1e-4, 3E-4]}}\n")
    seen = []
    monkeypatch.setattr(sweep, "run_sweep", lambda cfg, trials: seen.append(cfg))
    assert main(["sweep", str(config), "--trials", "2"]) == 0
    assert main(["sweep", str(config), "sweep.space.lora.dropout=[0, 5e-2]", "--trials", "2"]) == 0
    assert seen[0].sweep.space["training.learning_rate"] == [1e-4, 3e-4]
    assert seen[0].training.learning_rate == 2e-4
    assert seen[1].sweep.space["lora.dropout"] == [0, 0.05]


def test_a_space_key_given_one_value_or_a_nested_section_is_one_line_saying_what_to_write(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data: {train: t.jsonl, validation: v.jsonl}\nsweep: {space: {lora.r: 8}}\n")
    assert main(["sweep", str(config)]) == 1
    err = capsys.readouterr().err
    assert "'lora.r': 8 is one value: give a list of choices" in err and "dict[" not in err
    config.write_text("data: {train: t.jsonl, validation: v.jsonl}\nsweep: {space: {lora: {r: [8, 16]}}}\n")
    assert main(["sweep", str(config)]) == 1
    err = capsys.readouterr().err
    assert "dotted config keys: lora.r" in err and "dict[" not in err
