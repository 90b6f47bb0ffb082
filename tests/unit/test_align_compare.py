"""`sftlab compare` shows an align run's held-out preference metrics, and nothing for other runs."""

from __future__ import annotations

import json

from sftlab.evaluation.compare import run_curves
from sftlab.evaluation.report import markdown


def _run(tmp_path, events):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def _report(name, curves):
    data = {"base": "base", "n": 1, "models": {"base": {"source": "b", "metrics": {}, "by_group": {}},
                                               name: {"source": "t", "metrics": {}, "by_group": {}}},
            "deltas": {name: {}}, "examples": {name: {"key": None}}, "runs": {name: curves}, "bias": {},
            "settings": {"n_bootstrap": 10, "confidence": 0.95}}
    return markdown(data, [])


def test_align_run_metrics_reach_the_report(tmp_path):
    run = _run(tmp_path, [
        {"step": 0, "eval_loss": 0.69, "eval_rewards/margins": 0.0, "eval_rewards/accuracies": 0.0,
         "eval_logps/chosen": -30.0, "eval_logps/rejected": -50.0},
        {"step": 5, "loss": 0.6},
        {"step": 10, "eval_loss": 0.5, "eval_rewards/margins": 0.4, "eval_rewards/accuracies": 0.875,
         "eval_logps/chosen": -29.0, "eval_logps/rejected": -55.0},
    ])
    curves = run_curves(run)
    assert curves["alignment"]["first"]["step"] == 0 and curves["alignment"]["last"]["rewards/accuracies"] == 0.875
    text = _report("dpo", curves)
    assert "| metric | step 0 | step 10 |" in text
    assert "| rewards/margins | 0.0000 | 0.4000 |" in text
    assert "log-prob ratio to the reference" in text


def test_an_orpo_run_is_described_as_orpo(tmp_path):
    """ORPO has no reference model, and its logps are per-token means, not DPO's sums."""
    run = _run(tmp_path, [{"step": 0, "eval_loss": 2.0, "eval_rewards/margins": 0.0, "eval_logps/chosen": -10.8,
                           "eval_logps/rejected": -11.0}])
    (run / "run.json").write_text(json.dumps({"align": {"loss": "orpo", "beta": 0.1}}))
    text = _report("orpo", run_curves(run))
    assert "ORPO has no reference" in text and "mean per-token log-probabilities" in text
    assert "ratio to the reference" not in text


def test_sft_run_has_no_alignment_section(tmp_path):
    curves = run_curves(_run(tmp_path, [{"step": 5, "loss": 1.0}, {"step": 5, "eval_loss": 1.1}]))
    assert "alignment" not in curves
    assert "rewards/margins" not in _report("sft", curves)
