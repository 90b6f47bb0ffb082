"""A run's folder appears once the run really starts (data and model loaded): a first attempt that fails on
its data or its model leaves no empty output_dir behind, and the rerun with the mistake fixed trains there."""

from __future__ import annotations

import json

from sftlab.cli import main

GOOD = '{"prompt": "What is 2 plus 3?", "completion": "5"}\n'


def _train(model_dir, data, out, *extra) -> int:
    return main(["train", "-", f"model.name_or_path={model_dir}", f"data.train={data}", "lora.r=4",
                 "training.max_steps=1", "training.bf16=false", f"output_dir={out}", *extra])


def test_a_train_run_failing_on_its_data_or_model_leaves_no_output_dir(tiny_model_dir, tmp_path, capsys):
    data, out = tmp_path / "data.jsonl", tmp_path / "runs" / "first"
    data.write_text(GOOD * 3 + "{not json\n")
    assert _train(tiny_model_dir, data, out) == 1
    assert f"{data}:4" in capsys.readouterr().err and not out.parent.exists()
    data.write_text(GOOD * 4)
    assert _train(tiny_model_dir, data, out, "lora.target_modules=[no_such_layer]") == 1
    assert "matches no layer" in capsys.readouterr().err and not out.parent.exists()
    assert _train(tiny_model_dir, data, out) == 0
    assert json.loads((out / "run.json").read_text())["finished"]


def test_an_align_run_failing_on_its_data_leaves_no_output_dir(tiny_model_dir, tmp_path, capsys):
    data, out = tmp_path / "pairs.jsonl", tmp_path / "runs" / "dpo"
    data.write_text('{"prompt": "What is 2 plus 3?", "chosen": "5"}\n')  # no rejected answer
    assert main(["align", "-", f"model.name_or_path={tiny_model_dir}", f"data.train={data}", "lora.r=4",
                 "training.max_steps=1", "training.bf16=false", f"output_dir={out}"]) == 1
    assert f"{data}:1" in capsys.readouterr().err and not out.parent.exists()


def test_a_rerun_without_rejects_leaves_no_stale_rejects_file(tiny_model_dir, tmp_path, capsys):
    """A failed first attempt in skip mode leaves its rejects.jsonl (worth reading); the rerun on clean data
    must not show it as its own."""
    data, out = tmp_path / "data.jsonl", tmp_path / "runs" / "first"
    data.write_text(GOOD * 3 + "{not json\n")
    assert _train(tiny_model_dir, data, out, "data.on_error=skip", "lora.target_modules=[no_such_layer]") == 1
    assert (out / "rejects.jsonl").exists() and "matches no layer" in capsys.readouterr().err
    data.write_text(GOOD * 4)
    assert _train(tiny_model_dir, data, out, "data.on_error=skip") == 0
    assert not (out / "rejects.jsonl").exists()
