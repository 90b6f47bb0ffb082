"""The sweep's report: sweep.json, best.yaml, plots and report.html (jinja2, autoescaped)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sftlab.files import atomic_write, write_json


def trial_rows(study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
                     "run_dir": t.user_attrs.get("run_dir"), "retry_of": t.user_attrs.get("retry_of"),
                     "seconds": round(seconds, 1) if seconds is not None else None,
                     "last_step": t.last_step})
    return rows


def importances(study) -> dict[str, float]:
    """fANOVA importance of each parameter (needs two complete trials that differ)."""
    import optuna

    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(complete) < 2 or len({t.value for t in complete}) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):  # e.g. every complete trial has the same parameters
        return {}


def plot(study, rows: list[dict], space: dict, objective: str, out: Path) -> list[str]:
    """objective.png (value per trial, best so far) and one slice-<param>.png per parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    done = [r for r in rows if r["state"] == "complete"]
    minimize = study.direction.name == "MINIMIZE"
    names = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if done:
        xs = [r["number"] for r in done]
        ys = [r["value"] for r in done]
        best, run = [], math.inf if minimize else -math.inf
        for y in ys:
            run = min(run, y) if minimize else max(run, y)
            best.append(run)
        ax.plot(xs, ys, "o", label="trial")
        ax.step(xs, best, where="post", label="best so far")
        ax.legend()
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers, not 0.25, 0.5, ...
    ax.set_ylabel(objective)
    fig.tight_layout()
    fig.savefig(out / "objective.png", dpi=90)
    plt.close(fig)
    names.append("objective.png")
    for key, spec in space.items():
        fig, ax = plt.subplots(figsize=(4, 3))
        pts = [(r["params"][key], r["value"]) for r in done if key in r["params"]]
        if pts:
            xs = [str(x) for x, _ in pts] if isinstance(spec, list) else [x for x, _ in pts]
            ax.plot(xs, [y for _, y in pts], "o")
        if isinstance(spec, dict) and "log_uniform" in spec:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(objective)
        fig.tight_layout()
        name = f"slice-{key.replace('.', '_')}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        names.append(name)
    return names


def write_report(study, config, sweep_dir: Path) -> dict[str, Any]:
    from jinja2 import Environment, PackageLoader, select_autoescape

    from sftlab.train.sweep import best_config, direction_of

    rows = trial_rows(study)
    complete = [r for r in rows if r["state"] == "complete"]
    best = None
    if complete:
        t = study.best_trial
        best = {"number": t.number, "value": t.value, "params": t.params, "run_dir": t.user_attrs.get("run_dir")}
        atomic_write(sweep_dir / "best.yaml", best_config(config, t.params, sweep_dir))
    sweep = config.sweep
    summary = {"objective": sweep.objective, "direction": direction_of(sweep), "space": sweep.space,
               "best": best, "importance": importances(study), "trials": rows}
    write_json(sweep_dir / "sweep.json", summary)
    images = plot(study, rows, sweep.space, sweep.objective, sweep_dir)
    env = Environment(loader=PackageLoader("sftlab.train", "templates"), autoescape=select_autoescape(["html", "jinja"]))
    html = env.get_template("sweep_report.html.jinja").render(s=summary, images=images, name=sweep_dir.name)
    atomic_write(sweep_dir / "report.html", html)
    return summary
