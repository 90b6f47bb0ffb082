"""`sftlab runs DIR`: one line per run, as a table, CSV and Markdown, from two tiny runs."""

from __future__ import annotations

import csv
import io
import json

import pytest

from sftlab.cli import main


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_model_dir):
    from sftlab.demo.dataset import write_demo_dataset

    root = tmp_path_factory.mktemp("runs")
    data = write_demo_dataset(root.parent / "data", sizes={"train": 8, "validation": 2, "test": 2})
    common = ["train", "-", f"model.name_or_path={tiny_model_dir}", f"data.train={data['train']}",
              f"data.validation={data['validation']}", "data.max_seq_length=128",
              "training.per_device_train_batch_size=4", "training.logging_steps=1", "training.eval_steps=1",
              "training.bf16=false", "training.learning_rate=1e-1", "training.warmup_ratio=0"]
    assert main([*common, f"output_dir={root / 'a-lora'}", "training.max_steps=2"]) == 0
    assert main([*common, f"output_dir={root / 'nested' / 'b-full'}", "method=full", "training.max_steps=3"]) == 0
    (root / "not-a-run").mkdir()
    return root


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_runs_csv_has_one_row_per_run_with_its_numbers(runs_root, capsys):
    assert main(["runs", str(runs_root), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["run"] for r in rows] == ["a-lora", "nested/b-full"]
    for row, method, steps in zip(rows, ["lora", "full"], [2, 3]):
        run = runs_root / row["run"]
        events = metrics(run)
        assert row["method"] == method and int(row["steps"]) == steps and row["data"] == "train.jsonl"
        assert float(row["final_loss"]) == pytest.approx([e["loss"] for e in events if "loss" in e][-1])
        best = min((e["eval_loss"], e["step"]) for e in events if "eval_loss" in e)
        assert float(row["best_eval_loss"]) == pytest.approx(best[0]) and int(row["best_eval_step"]) == best[1]
        assert float(row["train_seconds"]) == json.loads((run / "run.json").read_text())["train_seconds"]
        assert row["finished"] == "True"


def test_runs_table_and_markdown(runs_root, capsys):
    assert main(["runs", str(runs_root), "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run | method | data | steps |") and lines[1].startswith("|---|")
    assert len(lines) == 4 and lines[3].startswith("| nested/b-full | full |")
    assert main(["runs", str(runs_root)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and table[1].split()[:2] == ["a-lora", "lora"]


def test_runs_errors_are_one_line(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 1
    assert "no run directory" in capsys.readouterr().err
    assert main(["runs", str(tmp_path / "missing")]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_runs_show_the_metrics_of_sftlab_eval_beside_the_eval_loss(runs_root, tmp_path, capsys):
    from sftlab.demo.dataset import write_demo_dataset

    data = write_demo_dataset(tmp_path, sizes={"train": 2, "validation": 2, "test": 2})
    run = runs_root / "a-lora"
    assert main(["eval", str(run), "--data", str(data["test"]), "--metrics", "exact_match,f1", "--limit", "2",
                 "--max-new-tokens", "4"]) == 0
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())["metrics"]
    capsys.readouterr()
    assert main(["runs", str(runs_root), "--csv"]) == 0
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert "exact_match" in evaluated and len(evaluated) == 2
    for name, value in evaluated.items():
        assert float(rows["a-lora"][f"eval_{name}"]) == pytest.approx(value)
        assert rows["nested/b-full"][f"eval_{name}"] == ""
    assert rows["a-lora"]["best_eval_loss"]
    assert main(["runs", str(runs_root), "--markdown"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.endswith("| finished | " + " | ".join(f"eval_{name}" for name in evaluated) + " |")


def test_an_alignment_run_names_its_loss_beside_the_method(runs_root, tmp_path, capsys):
    import shutil

    import yaml

    root = tmp_path / "runs"
    shutil.copytree(runs_root / "a-lora", root / "dpo")
    info = json.loads((root / "dpo" / "run.json").read_text())
    (root / "dpo" / "run.json").write_text(json.dumps(info | {"align": {"loss": "dpo", "beta": 0.1}}))
    config = yaml.safe_load((root / "dpo" / "config.yaml").read_text())
    (root / "dpo" / "config.yaml").write_text(yaml.safe_dump(config | {"align": {"loss": "dpo"}}))
    assert main(["runs", str(root), "--csv"]) == 0
    assert [r["method"] for r in csv.DictReader(io.StringIO(capsys.readouterr().out))] == ["dpo (lora)"]


def test_a_metrics_line_cut_by_a_crash_leaves_the_run_listed(runs_root, tmp_path, capsys):
    """A run killed mid-write ends its metrics.jsonl with half a line: the listing reads the rest."""
    import shutil

    run = tmp_path / "crashed"
    shutil.copytree(runs_root / "a-lora", run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"loss": 0.5, "st')
    assert main(["runs", str(tmp_path), "--csv"]) == 0
    row = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert float(row["final_loss"]) == pytest.approx([e["loss"] for e in metrics(runs_root / "a-lora") if "loss" in e][-1])


def test_a_sweep_trial_shows_the_sweep_s_verdict(runs_root, tmp_path, capsys):
    """A trial that trained to the end but whose evaluation failed is finished as a run and failed as a trial."""
    import shutil

    sweep = tmp_path / "sweep"
    shutil.copytree(runs_root / "a-lora", sweep / "trial-000")
    (sweep / "sweep.json").write_text(json.dumps({"trials": [
        {"number": 0, "state": "fail", "run_dir": str(sweep / "trial-000")}]}))
    assert main(["runs", str(tmp_path), "--csv"]) == 0
    row = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert (row["finished"], row["sweep_trial"]) == ("True", "fail")
