"""Report figures (matplotlib, headless), returned as PNG bytes."""

from __future__ import annotations

import io
from typing import Any

from sftlab.evaluation.metrics import LOWER_IS_BETTER

PERCENT_SCALE = {"bleu", "chrf"}  # already 0-100; other higher-is-better metrics are 0-1


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height), dpi=110)


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def metric_bars(data: dict[str, Any]) -> bytes:
    """Grouped bars of every higher-is-better overall metric, one colour per model, on 0-100."""
    models = list(data["models"])
    keys = [k for k in data["models"][data["base"]]["metrics"] if k not in LOWER_IS_BETTER]
    plt, fig, ax = _figure(max(5.0, 1.2 * len(keys) + 2), 3.6)
    width = 0.8 / len(models)
    for i, name in enumerate(models):
        values = [data["models"][name]["metrics"].get(k, 0.0) * (1 if k in PERCENT_SCALE else 100) for k in keys]
        bars = ax.bar([x + i * width for x in range(len(keys))], values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(keys))], keys, rotation=20)
    ax.set_ylabel("score (0-100)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title("Overall metrics")
    return _png(plt, fig)


def loss_curves(name: str, curves: dict[str, Any]) -> bytes:
    """Train and validation loss by step; a dashed line where overfitting started."""
    plt, fig, ax = _figure(6.0, 3.4)
    if curves["train"]:
        ax.plot(*zip(*curves["train"]), label="train loss", lw=1.2)
    if curves["validation"]:
        ax.plot(*zip(*curves["validation"]), "o-", label="validation loss", lw=1.2, ms=3)
    onset = curves.get("overfit_start_step")
    if onset is not None:
        ax.axvline(onset, color="crimson", ls="--", lw=1)
        ax.annotate(f"overfitting from step {onset:g}", (onset, ax.get_ylim()[1]), color="crimson",
                    fontsize=8, ha="left", va="top", xytext=(4, -4), textcoords="offset points")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{name}: training curves")
    ax.legend(fontsize=8)
    return _png(plt, fig)


def group_bars(data: dict[str, Any], key: str) -> bytes:
    """`key` (e.g. exact_match) per task, one colour per model."""
    models = list(data["models"])
    groups = list(dict.fromkeys(g for m in models for g, s in data["models"][m]["by_group"].items() if key in s))
    plt, fig, ax = _figure(max(5.0, 1.1 * len(groups) + 2), 3.4)
    width = 0.8 / len(models)
    scale = 1 if key in PERCENT_SCALE else 100
    for i, name in enumerate(models):
        values = [data["models"][name]["by_group"].get(g, {}).get(key, 0.0) * scale for g in groups]
        bars = ax.bar([x + i * width for x in range(len(groups))], values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(groups))], groups, rotation=20)
    ax.set_ylabel(f"{key} (0-100)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title(f"{key} per task")
    return _png(plt, fig)
