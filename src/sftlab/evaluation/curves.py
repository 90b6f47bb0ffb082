"""Training curves from RUN/metrics.jsonl, and where overfitting started.

Overfitting here means: validation loss has not improved on its best value for `patience`
evaluations in a row while training loss fell over the same stretch. It "started" at the
best evaluation (the checkpoint early stopping would keep). The training callback and the
comparison report use this one rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PATIENCE = 3


@dataclass
class Curves:
    train: list[tuple[float, float]] = field(default_factory=list)  # (step, loss)
    validation: list[tuple[float, float]] = field(default_factory=list)  # (step, eval_loss)
    flagged: list[dict] = field(default_factory=list)  # overfit warnings written during training


def metric_events(path: str | Path) -> Iterator[dict]:
    """The events of a metrics.jsonl in order; unreadable lines (a crash mid-write) are skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                yield event


def read_metrics_jsonl(path: str | Path) -> Curves:
    """Train and validation losses by step; unreadable lines (a crash mid-write) are skipped.

    After a resumed run a step can appear twice: the later line wins."""
    curves = Curves()
    train: dict[float, float] = {}
    validation: dict[float, float] = {}
    for event in metric_events(path):
        step = event.get("step")
        if step is None:
            continue
        if event.get("overfit_warning"):
            curves.flagged.append(event)
        elif isinstance(event.get("loss"), (int, float)):
            train[step] = float(event["loss"])
        if isinstance(event.get("eval_loss"), (int, float)):
            validation[step] = float(event["eval_loss"])
    curves.train, curves.validation = sorted(train.items()), sorted(validation.items())
    return curves


def _train_loss_at(train: Sequence[tuple[float, float]], step: float, since: float) -> float | None:
    """Mean training loss logged in (since, step], or the last one at or before `step`."""
    window = [loss for s, loss in train if since < s <= step]
    if window:
        return sum(window) / len(window)
    before = [loss for s, loss in train if s <= step]
    return before[-1] if before else None


def overfitting_onset(
    train: Sequence[tuple[float, float]], validation: Sequence[tuple[float, float]], patience: int = DEFAULT_PATIENCE
) -> float | None:
    """Step of the best validation loss after which overfitting set in, or None (see module doc)."""
    best = 0
    for i in range(1, len(validation)):
        if validation[i][1] < validation[best][1]:
            best = i
            continue
        if i - best >= patience:
            start_step, end_step = validation[best][0], validation[i][0]
            previous = validation[best - 1][0] if best > 0 else float("-inf")
            before = _train_loss_at(train, start_step, previous)
            after = _train_loss_at(train, end_step, validation[i - 1][0])
            if before is not None and after is not None and after < before:
                return start_step
    return None
