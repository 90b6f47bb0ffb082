"""Base vs tuned: the same evaluation for each model, then one report (JSON, Markdown, HTML).

The first model is the base. For each other model the report gives the change in every
metric with a paired bootstrap 95 % confidence interval (the same resampled examples for
both models), the per-task breakdown, the examples it now gets right and now gets wrong,
its training curves when it is a run directory (marking where overfitting started), and the
bias probes side by side when they were run. `compare.json` holds every number the
Markdown and HTML show; both are rendered from it.
"""

from __future__ import annotations

import json

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftlab.errors import SftlabError
from sftlab.evaluation.evaluate import OVERALL, EvalResult, check_chat_template, evaluate, resampler
from sftlab.files import atomic_write, write_json

N_BOOTSTRAP = 1000
MAX_EXAMPLES = 10  # per list (now right / now wrong) in the report
# which score says an example is right, first found (a math set's final answer before its exact match)
CORRECTNESS_KEYS = ("final_answer", "exact_match", "accuracy", "choice_accuracy", "exact_match_ci")


@dataclass
class CompareResult:
    data: dict[str, Any]  # everything in compare.json
    results: dict[str, EvalResult]
    paths: dict[str, Path]  # "json", "markdown", "html"

    @property
    def base(self) -> str:
        return self.data["base"]

    @property
    def deltas(self) -> dict[str, dict[str, dict[str, float]]]:
        return self.data["deltas"]


def paired_bootstrap(
    base: EvalResult, tuned: EvalResult, names: Sequence[str], *, n: int = N_BOOTSTRAP, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Per metric: base, tuned, delta and its 95 % percentile interval over `n` paired resamples."""
    import numpy as np

    size = len(base.records)
    point_b, point_t = base.metrics, tuned.metrics
    keys = [k for k in point_b if k in point_t]
    out = {k: {"base": point_b[k], "tuned": point_t[k], "delta": point_t[k] - point_b[k]} for k in keys}
    if size < 2 or n < 1:
        return out
    from scipy.stats import bootstrap

    score_b, score_t = resampler(base.records, names), resampler(tuned.records, names)

    def deltas(idx_b, idx_t):  # paired: scipy draws the same example indices for base and tuned
        sb, st = score_b(np.bincount(idx_b, minlength=size)), score_t(np.bincount(idx_t, minlength=size))
        return np.array([st[k] - sb[k] for k in keys], dtype=np.float64)

    index = np.arange(size)
    ci = bootstrap((index, index), deltas, paired=True, vectorized=False, n_resamples=n, method="percentile",
                   confidence_level=0.95, rng=np.random.default_rng(seed)).confidence_interval
    for k, low, high in zip(keys, np.atleast_1d(ci.low), np.atleast_1d(ci.high)):
        if math.isfinite(low) and math.isfinite(high):
            out[k].update(low=float(low), high=float(high))
    return out


def _correctness_key(result: EvalResult) -> str | None:
    first = result.records[0]["scores"] if result.records else {}
    return next((k for k in CORRECTNESS_KEYS if k in first), None)


def _prompt_text(record: dict[str, Any]) -> str:
    users = [m["content"] for m in record["prompt"] if m["role"] == "user"]
    return users[-1] if users else record["prompt"][-1]["content"]


def changed_examples(base: EvalResult, tuned: EvalResult, limit: int = MAX_EXAMPLES) -> dict[str, Any]:
    """Examples the tuned model now gets right (base wrong) and now gets wrong (base right)."""
    key = _correctness_key(base)
    out: dict[str, Any] = {"key": key, "now_right": [], "now_wrong": [], "now_right_count": 0, "now_wrong_count": 0}
    if key is None:
        return out
    for rb, rt in zip(base.records, tuned.records):
        b, t = rb["scores"].get(key), rt["scores"].get(key)
        if b is None or t is None or bool(b) == bool(t):
            continue
        kind = "now_right" if t else "now_wrong"
        out[f"{kind}_count"] += 1
        if len(out[kind]) < limit:
            out[kind].append({"source": rb["source"], "group": rb.get("group"), "prompt": _prompt_text(rb),
                              "reference": rb["reference"], "base": rb["prediction"], "tuned": rt["prediction"]})
    return out


def run_curves(run_dir: str | Path) -> dict[str, Any] | None:
    """Loss curves of a run (from RUN/metrics.jsonl) and where overfitting started, if it did."""
    from sftlab.evaluation.curves import overfitting_onset, read_metrics_jsonl

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    curves = read_metrics_jsonl(path)
    flagged = curves.flagged[0]["overfit_start_step"] if curves.flagged else None
    onset = flagged if flagged is not None else overfitting_onset(curves.train, curves.validation)
    out = {"run_dir": str(run_dir), "train": curves.train, "validation": curves.validation,
           "overfit_start_step": onset, "flagged_during_training": bool(curves.flagged)}
    alignment = alignment_metrics(path)
    if alignment:
        info = Path(run_dir) / "run.json"
        loss = (json.loads(info.read_text(encoding="utf-8")).get("align") or {}).get("loss") if info.exists() else None
        out["alignment"] = alignment | {"loss": loss}
    return out


ALIGNMENT_KEYS = ("rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


def alignment_metrics(metrics_path: str | Path) -> dict[str, Any] | None:
    """Held-out preference metrics of an `sftlab align` run: its first and last evaluation
    (`{"first": {"step", metric: value}, "last": {...}}`), or None for other runs."""
    from sftlab.evaluation.curves import metric_events

    evals = [{"step": event.get("step"), **{k: event[f"eval_{k}"] for k in ALIGNMENT_KEYS if f"eval_{k}" in event}}
             for event in metric_events(metrics_path) if isinstance(event.get("eval_rewards/margins"), (int, float))]
    return {"first": evals[0], "last": evals[-1]} if evals else None


def _check_aligned(results: dict[str, EvalResult]) -> None:
    names = list(results)
    first = [r["source"] for r in results[names[0]].records]
    for name in names[1:]:
        if [r["source"] for r in results[name].records] != first:
            raise SftlabError(f"'{name}' was evaluated on other examples than '{names[0]}': compare needs the same data")


def write_compare_report(
    results: dict[str, EvalResult],
    out_dir: str | Path,
    *,
    run_dirs: dict[str, str | Path] | None = None,
    bias: dict[str, Any] | None = None,
    sources: dict[str, str] | None = None,
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = 0,
) -> CompareResult:
    """Write compare.json, report.md (+ PNGs) and report.html from already evaluated models.

    `results`: model name -> EvalResult, the first being the base; `run_dirs`: name -> run
    directory for loss curves; `bias`: name -> BiasResult; `sources`: name -> where the model
    came from (shown in the report).
    """
    from sftlab.evaluation import plots, report

    if len(results) < 2:
        raise SftlabError("compare needs a base model and at least one other model")
    _check_aligned(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(results)
    base_name = names[0]
    base = results[base_name]
    metric_names = base.selected.get(OVERALL) or list(base.metrics)
    data: dict[str, Any] = {
        "base": base_name,
        "n": len(base.records),
        "models": {name: {"source": (sources or {}).get(name, name), "metrics": r.metrics, "by_group": r.by_group,
                          "selected": r.selected, "cut_off": r.cut_off,
                          "max_new_tokens": r.settings.get("max_new_tokens")} for name, r in results.items()},
        "deltas": {name: paired_bootstrap(base, results[name], metric_names, n=n_bootstrap, seed=seed)
                   for name in names[1:]},
        "examples": {name: changed_examples(base, results[name]) for name in names[1:]},
        "runs": {},
        "bias": {name: b.to_json() if hasattr(b, "to_json") else b for name, b in (bias or {}).items()},
        "settings": {"n_bootstrap": n_bootstrap, "seed": seed, "confidence": 0.95},
    }
    for name, run_dir in (run_dirs or {}).items():
        curves = run_curves(run_dir)
        if curves is not None:
            data["runs"][name] = curves
    for name, r in results.items():
        r.save(out / name)
        if hasattr((bias or {}).get(name), "save"):
            bias[name].save(out / name)
    images = {"metrics.png": plots.metric_bars(data)}
    if any("exact_match" in s for s in base.by_group.values()):
        images["tasks.png"] = plots.group_bars(data, "exact_match")
    for name, curves in data["runs"].items():
        images[f"loss-{name}.png"] = plots.loss_curves(name, curves)
    for fname, png in images.items():
        atomic_write(out / fname, png)
    paths = {"json": out / "compare.json", "markdown": out / "report.md", "html": out / "report.html"}
    write_json(paths["json"], data)
    atomic_write(paths["markdown"], report.markdown(data, list(images)))
    atomic_write(paths["html"], report.html(data, images))
    return CompareResult(data, results, paths)


def check_models(models: dict[str, Any]) -> None:
    """Fail before any model loads when one of the models given by name or path cannot load."""
    from sftlab.models import check_model

    for spec in models.values():
        if isinstance(spec, (str, Path)):
            check_model(str(spec))


def compare_models(
    models: dict[str, Any],
    conversations,
    out_dir: str | Path,
    runs: dict[str, str | Path] | None = None,
    *,
    metrics: list[str] | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    group_by: str | None = "task",
    bias: bool = False,
    probes=None,
    n_bootstrap: int = N_BOOTSTRAP,
    progress: bool = True,
    chat_template: str | None = None,
    checked: bool = False,
) -> CompareResult:
    """Evaluate each model (a `(model, tokenizer)` pair or a path/name/run directory to load),
    then write the comparison report. The first model is the base. `chat_template` is the one
    models that are not runs are asked with (runs use the one they were trained with). `checked`:
    `check_models` has passed already (the CLI checks them before it reads the data)."""
    from sftlab.models import is_run_dir, load_model, load_tokenizer

    if not checked:
        check_models(models)
    sources = {name: str(spec) for name, spec in models.items() if isinstance(spec, (str, Path))}
    is_run = {name: is_run_dir(path) for name, path in sources.items()}
    runs = {**{name: sources[name] for name in sources if is_run[name]}, **(runs or {})}
    tokenizers = {name: load_tokenizer(sources[name], chat_template=None if is_run[name] else chat_template)
                  if name in sources else spec[1] for name, spec in models.items()}
    for name, tokenizer in tokenizers.items():  # every model can be asked, before any is evaluated
        check_chat_template(tokenizer, sources.get(name, name))
    results: dict[str, EvalResult] = {}
    bias_results: dict[str, Any] = {}
    for name, spec in models.items():
        model, tokenizer = (load_model(sources[name]) if name in sources else spec[0]), tokenizers[name]
        results[name] = evaluate(model, tokenizer, conversations, metrics=metrics, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, group_by=group_by, progress=progress)
        if bias:
            from sftlab.evaluation.bias import bias_probe

            bias_results[name] = bias_probe(model, tokenizer, probes, batch_size=batch_size, progress=progress)
        del model
    return write_compare_report(results, out_dir, run_dirs=runs, bias=bias_results, sources=sources,
                                n_bootstrap=n_bootstrap)
