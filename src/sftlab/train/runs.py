"""Summaries of run directories (run.json + config.yaml + metrics.jsonl) for `sftlab runs`."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from sftlab.errors import SftlabError
from sftlab.evaluation.curves import metric_events
from sftlab.yamlio import safe_load

COLUMNS = ("run", "method", "data", "steps", "final_loss", "best_eval_loss", "best_eval_step", "train_seconds", "finished")


def find_runs(root: Path) -> list[Path]:
    """Every folder under `root` (itself included) holding run.json and config.yaml."""
    if not root.is_dir():
        raise SftlabError(f"{root}: not a folder")
    return sorted(p.parent for p in root.rglob("run.json") if (p.parent / "config.yaml").exists())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SftlabError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def _eval_metrics(run: Path) -> dict[str, float]:
    """What `sftlab eval RUN` wrote to RUN/eval/metrics.json, as eval_<metric> columns."""
    path = run / "eval" / "metrics.json"
    metrics = _read_json(path).get("metrics", {}) if path.is_file() else {}
    return {f"eval_{name}": v for name, v in metrics.items() if isinstance(v, (int, float))}


def summarize(run: Path, root: Path) -> dict[str, Any]:
    info = _read_json(run / "run.json")
    config = safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    losses, evals = [], []
    metrics = run / "metrics.jsonl"
    for event in metric_events(metrics) if metrics.exists() else ():  # a line cut by a crash is skipped
        if isinstance(event.get("loss"), (int, float)):
            losses.append(event["loss"])
        if isinstance(event.get("eval_loss"), (int, float)):
            evals.append((event["eval_loss"], event.get("step")))
    best = min(evals, key=lambda e: e[0]) if evals else (None, None)
    data = (config.get("data") or {}).get("train")
    return {
        "run": str(run.relative_to(root)) if run != root else run.name,
        "method": _method(info, config),
        "data": Path(data).name if data else None,
        "steps": info.get("global_step"),
        "final_loss": losses[-1] if losses else info.get("train_loss"),
        "best_eval_loss": best[0],
        "best_eval_step": best[1],
        "train_seconds": info.get("train_seconds"),
        "finished": bool(info.get("finished")),
        **_sweep_state(run),
        **_eval_metrics(run),
    }


def _sweep_state(run: Path) -> dict[str, Any]:
    """For a sweep's trial, its state as the sweep judged it (a trial that trained to the end fails when
    its evaluation does), from the sweep.json beside it."""
    summary = run.parent / "sweep.json"
    if not summary.is_file():
        return {}
    trial = next((t for t in _read_json(summary).get("trials", [])
                  if t.get("run_dir") and Path(t["run_dir"]).resolve() == run.resolve()), None)
    return {"sweep_trial": trial["state"]} if trial else {}


def _method(info: dict, config: dict) -> str | None:
    """The training method; for an alignment run, its loss with it (`dpo (lora)`)."""
    method = info.get("method", config.get("method"))
    align = (info.get("align") or {}).get("loss") or (config.get("align") or {}).get("loss")
    return f"{align} ({method})" if align else method


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    """`table` (aligned text), `csv` or `markdown`; the eval metric columns are those any run has."""
    columns = [*COLUMNS, *dict.fromkeys(k for r in rows for k in r if k not in COLUMNS)]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    cells = [columns] + [[_cell(r.get(c)) for c in columns] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        lines.insert(1, "|" + "|".join("---" for _ in columns) + "|")
        return "\n".join(lines) + "\n"
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells) + "\n"
