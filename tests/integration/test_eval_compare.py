"""The comparison report: its numbers are the metrics JSON's, its deltas and CIs are
consistent, changed examples are counted exactly, and a run's overfitting is marked."""

from __future__ import annotations

import json
import re

import pytest

from sftlab.data.conversation import Conversation
from sftlab.errors import SftlabError
from sftlab.evaluation import evaluate as E
from sftlab.evaluation.compare import write_compare_report
from sftlab.evaluation.report import fmt, fmt_delta


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def data():
    convs = [Conversation([{"role": "user", "content": f"Review {i}: {'great' if i % 2 else 'awful'} film"},
                           {"role": "assistant", "content": "positive" if i % 2 else "negative"}],
                          f"test.jsonl:{i + 1}", meta={"task": "sentiment"}) for i in range(20)]
    convs += [Conversation([{"role": "user", "content": f"Rewrite politely: give me item {i}"},
                            {"role": "assistant", "content": f"Could you please give me item {i}?"}],
                           f"test.jsonl:{i + 21}", meta={"task": "rewrite", "metrics": ["bleu", "rouge"]})
              for i in range(10)]
    return convs


def planted(monkeypatch, predictions):
    """Replace generation by fixed answers (keyed by prompt), keeping everything else real."""
    def fake(model, tokenizer, prompts, **kwargs):
        return [tokenizer.encode(predictions[p[-1]["content"]], add_special_tokens=False) for p in prompts]
    monkeypatch.setattr("sftlab.evaluation.generate.generate_ids", fake)


def evaluate_planted(monkeypatch, model, tokenizer, convs, answer):
    planted(monkeypatch, {c.prompt_messages()[-1]["content"]: answer(i, c) for i, c in enumerate(convs)})
    return E.evaluate(model, tokenizer, convs, max_new_tokens=4, progress=False)


def test_report_numbers_are_the_metrics_json(monkeypatch, model, tokenizer, tmp_path):
    convs = data()
    # base: right on sentiment items 0-4 only, rewrites are off; tuned: right everywhere except item 1.
    base = evaluate_planted(monkeypatch, model, tokenizer, convs,
                            lambda i, c: c.reference() if i < 5 else ("unsure" if i < 20 else "give item"))
    tuned = evaluate_planted(monkeypatch, model, tokenizer, convs,
                             lambda i, c: "wrong" if i == 1 else c.reference())
    assert base.selected["sentiment"] == ["exact_match", "perplexity", "accuracy", "precision", "recall", "macro_f1"]
    assert "bleu" in base.by_group["rewrite"] and "bleu" not in base.metrics

    run = tmp_path / "run"
    run.mkdir()
    events = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 26)]
    events += [{"step": s, "eval_loss": v} for s, v in [(5, 2.5), (10, 2.0), (15, 2.2), (20, 2.4), (25, 2.3)]]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))

    out = tmp_path / "report"
    result = write_compare_report({"base": base, "tuned": tuned}, out, run_dirs={"tuned": run}, n_bootstrap=300)

    saved = {name: json.loads((out / name / "metrics.json").read_text()) for name in ("base", "tuned")}
    compare = json.loads(result.paths["json"].read_text())
    for name in ("base", "tuned"):
        assert compare["models"][name]["metrics"] == saved[name]["metrics"]
        assert compare["models"][name]["by_group"] == saved[name]["by_group"]
    assert len((out / "tuned" / "predictions.jsonl").read_text().splitlines()) == len(convs)

    em = compare["deltas"]["tuned"]["exact_match"]
    assert em["delta"] == pytest.approx(saved["tuned"]["metrics"]["exact_match"] - saved["base"]["metrics"]["exact_match"])
    assert em["delta"] == pytest.approx(29 / 30 - 5 / 30)
    assert 0 < em["low"] <= em["delta"] <= em["high"]  # a clear improvement
    ex = compare["examples"]["tuned"]
    assert (ex["key"], ex["now_right_count"], ex["now_wrong_count"]) == ("exact_match", 25, 1)
    assert ex["now_wrong"][0]["source"] == "test.jsonl:2" and ex["now_wrong"][0]["tuned"] == "wrong"
    assert compare["runs"]["tuned"]["overfit_start_step"] == 10

    md = result.paths["markdown"].read_text()
    html = result.paths["html"].read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.split("## Per task")[0].splitlines() if line.startswith("| ") and "---" not in line}
    for key, value in saved["base"]["metrics"].items():
        d = compare["deltas"]["tuned"][key]
        assert rows[key][:3] == [fmt(value), fmt(saved["tuned"]["metrics"][key]), fmt_delta(d)]
        assert f"<td>{fmt(value)}</td>" in html and f"<td>{fmt_delta(d)}</td>" in html
    assert "overfitting started there" in md and "overfitting from step 10" in md
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', html)) == 3  # metrics, per task, loss curves
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_refuses_results_on_different_data(monkeypatch, model, tokenizer, tmp_path):
    convs = data()
    a = evaluate_planted(monkeypatch, model, tokenizer, convs[:10], lambda i, c: "x")
    b = evaluate_planted(monkeypatch, model, tokenizer, convs[1:11], lambda i, c: "x")
    with pytest.raises(SftlabError, match="other examples"):
        write_compare_report({"a": a, "b": b}, tmp_path)


def test_eval_result_save_load_round_trip(monkeypatch, model, tokenizer, tmp_path):
    result = evaluate_planted(monkeypatch, model, tokenizer, data()[:6], lambda i, c: c.reference())
    loaded = E.EvalResult.load(result.save(tmp_path / "e"))
    assert loaded.metrics == result.metrics and loaded.records == result.records
    assert result.metrics["exact_match"] == 1.0
    assert result.records[0]["scores"]["perplexity"] == pytest.approx(
        __import__("math").exp(-result.records[0]["logprob"] / result.records[0]["tokens"]))


def test_html_report_escapes_model_text():
    from sftlab.evaluation.report import html

    data = {"base": "base", "n": 1, "models": {"base": {"source": "<script>alert(1)</script>", "metrics": {"em": 0.5},
                                                        "by_group": {}}},
            "runs": {}, "settings": {"confidence": 0.95, "n_bootstrap": 10}, "deltas": {}, "examples": {}, "bias": {}}
    page = html(data, {})
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<td>0.5000</td>" in page


def test_a_failed_png_write_leaves_the_previous_report_images_whole(monkeypatch, model, tokenizer, tmp_path):
    from pathlib import Path

    convs = data()[:6]
    a = evaluate_planted(monkeypatch, model, tokenizer, convs, lambda i, c: c.reference())
    b = evaluate_planted(monkeypatch, model, tokenizer, convs, lambda i, c: "x")
    out = tmp_path / "report"
    write_compare_report({"a": a, "b": b}, out, n_bootstrap=50)
    before = (out / "metrics.png").read_bytes()
    real = Path.write_bytes

    def full_disk(self, content):  # half the image reaches the disk, then the disk is full
        if ".png" in self.name:
            real(self, content[:len(content) // 2])
            raise OSError(28, "No space left on device", str(self))
        return real(self, content)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError):
        write_compare_report({"a": a, "b": b}, out, n_bootstrap=50)
    assert (out / "metrics.png").read_bytes() == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_compare_checks_every_model_before_evaluating_any(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A missing or empty tuned model is an error before the base is loaded or evaluated, not after."""
    from sftlab.cli import main
    from sftlab.evaluation.compare import compare_models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before every model argument was checked")
    monkeypatch.setattr("sftlab.models.load_model", no_loading)
    monkeypatch.setattr("sftlab.evaluation.compare.evaluate", no_loading)
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"},
                                                     {"role": "assistant", "content": f"A{i}."}]}) + "\n"
                            for i in range(2)))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["compare", str(tiny_model_dir), "runs/nonexist", "--data", str(test), "--limit", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model folder not found: runs/nonexist") and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(SftlabError, match="holds no model or tokenizer"):
        compare_models({"base": str(tiny_model_dir), "tuned": str(tmp_path / "empty")}, data(), tmp_path / "out",
                       progress=False)
