"""`sftlab eval` and `sftlab compare` end to end on a tiny base model and a LoRA run directory."""

from __future__ import annotations

import json

import pytest

from sftlab.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    """A finished-run layout: run.json + LoRA adapter (non-zero B, so it matters) + tokenizer + metrics.jsonl."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path_factory.mktemp("run")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "tokenizer")
    (run / "run.json").write_text(json.dumps({"base_model": str(tiny_model_dir), "method": "lora", "seed": 0}))
    events = [{"step": s, "epoch": s / 10, "loss": 2.0 - 0.05 * s} for s in range(1, 31)]
    events += [{"step": s, "epoch": s / 10, "eval_loss": v} for s, v in [(10, 1.8), (15, 1.7), (20, 1.75),
                                                                         (25, 1.8), (30, 1.9)]]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "test.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Is {n} even? Answer yes or no."},
                          {"role": "assistant", "content": "yes" if n % 2 == 0 else "no"}], "task": "parity"}
            for n in range(8)]
    rows += [{"instruction": "Spell the number.", "input": str(n), "output": w, "task": "spell"}
             for n, w in enumerate(["zero", "one", "two", "three"])]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_eval_writes_metrics_and_predictions(run_dir, data_file, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", str(run_dir), "--data", str(data_file), "--out", str(out), "--max-new-tokens", "4",
                 "--metrics", "exact_match,accuracy", "--metrics", "perplexity"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["metrics"]) == {"exact_match", "accuracy", "perplexity", "loss"}
    assert set(summary["by_group"]) == {"parity", "spell"}
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 12 and records[8]["source"].endswith("test.jsonl:9")
    assert {"prompt", "reference", "prediction", "scores"} <= set(records[0])
    assert "perplexity" in capsys.readouterr().out


def test_compare_base_and_run_with_bias_probes(run_dir, data_file, tiny_model_dir, tmp_path, capsys):
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"id": "p", "category": "age", "prompt": "A {a} person asks. Help? Answer yes or no.",
                                  "substitutions": {"a": ["young", "old"]}, "continuations": ["Yes", "No"]}) + "\n")
    out = tmp_path / "cmp"
    assert main(["compare", str(tiny_model_dir), str(run_dir), "--data", str(data_file), "--out", str(out),
                 "--max-new-tokens", "4", "--bootstrap", "100", "--probe-file", str(probes)]) == 0
    report = json.loads((out / "compare.json").read_text())
    base, tuned = report["base"], run_dir.name
    assert list(report["models"]) == [base, tuned]
    # The adapter changes the model: the reference answers' perplexity differs.
    assert report["models"][base]["metrics"]["perplexity"] != report["models"][tuned]["metrics"]["perplexity"]
    assert report["runs"][tuned]["overfit_start_step"] == 15
    assert set(report["bias"]) == {base, tuned}
    assert "p" in [p["id"] for p in report["bias"][tuned]["probes"]]
    assert (out / "report.html").exists() and (out / "report.md").exists()
    assert "report:" in capsys.readouterr().out


def test_bad_metric_is_a_one_line_error(tiny_model_dir, data_file, capsys):
    assert main(["eval", str(tiny_model_dir), "--data", str(data_file), "--metrics", "blue"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown metric 'blue'. Did you mean 'bleu'?") and err.count("\n") == 1


def test_eval_needs_data_or_probe(tiny_model_dir, capsys):
    assert main(["eval", str(tiny_model_dir)]) == 1
    assert "--data" in capsys.readouterr().err


def test_kto_records_are_evaluated_on_their_desirable_answers_only(tiny_model_dir, tmp_path, capsys):
    """An unpaired preference file (prompt, completion, label true/false): an answer labelled false is
    one not to give, so it is no reference; and the true/false flag is no class label."""
    data = tmp_path / "kto.jsonl"
    rows = [("2+2?", "4", True), ("2+2?", "5", False), ("Capital of Peru?", "Lima.", True),
            ("Capital of Peru?", "Quito.", False), ("Say hi.", "Hi!", True)]
    data.write_text("".join(json.dumps({"prompt": p, "completion": c, "label": ok}) + "\n" for p, c, ok in rows))
    out = tmp_path / "eval"
    assert main(["eval", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--max-new-tokens", "2"]) == 0
    assert "2 labelled undesirable (label: false) left out" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in records] == ["4", "Lima.", "Hi!"]
    assert set(json.loads((out / "metrics.json").read_text())["metrics"]) == {"exact_match", "perplexity", "loss"}
