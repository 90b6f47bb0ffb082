"""Trainer callbacks: every log event to RUN/metrics.jsonl and an overfitting warning.

What they expect from the Trainer set-up:
- `MetricsJsonlCallback(path)` writes one JSON object per log event (`step`, `epoch` and the
  event's own keys: `loss`, `eval_loss`, `learning_rate`, ...). Each line is written with a
  single append, so a crash never leaves half a line, and only the main process writes.
- `OverfitWarningCallback(patience, metrics_path)` needs evaluation during training
  (`eval_strategy="steps"`) and training-loss logs between evaluations (`logging_steps` no
  larger than `eval_steps`). When validation loss has not beaten its best for `patience`
  evaluations while training loss fell (rule in `sftlab.evaluation.curves`), it logs a warning
  once and, given `metrics_path`, appends `{"step", "overfit_warning": true,
  "overfit_start_step", ...}` to metrics.jsonl; the comparison report marks that step.
  Stopping is left to `transformers.EarlyStoppingCallback` (with `load_best_model_at_end`,
  `metric_for_best_model="eval_loss"`), so the best checkpoint is the one kept.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from transformers import TrainerCallback

from sftlab.evaluation.curves import DEFAULT_PATIENCE, overfitting_onset
from sftlab.models import name_in_layer

logger = logging.getLogger("sftlab.train")


def append_jsonl(path: str | Path, event: dict) -> None:
    """Append one JSON line with a single write on an O_APPEND descriptor (atomic for a line)."""
    line = (json.dumps(event, default=_jsonable, allow_nan=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _jsonable(value):
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


class MetricsJsonlCallback(TrainerCallback):
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})


class OverfitWarningCallback(TrainerCallback):
    def __init__(self, patience: int = DEFAULT_PATIENCE, metrics_path: str | Path | None = None):
        self.patience = patience
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.onset_step: float | None = None
        self._train: list[tuple[float, float]] = []
        self._validation: list[tuple[float, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            self._train.append((state.global_step, float(loss)))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        eval_loss = (metrics or {}).get("eval_loss")
        if self.onset_step is not None or not isinstance(eval_loss, (int, float)):
            return
        self._validation.append((state.global_step, float(eval_loss)))
        onset = overfitting_onset(self._train, self._validation, self.patience)
        if onset is None:
            return
        self.onset_step = onset
        best = min(loss for _, loss in self._validation)
        logger.warning(
            "overfitting: validation loss has not improved on %.4f (step %s) for %d evaluations while "
            "training loss fell; now %.4f at step %s",
            best, onset, self.patience, eval_loss, state.global_step,
        )
        if self.metrics_path is not None and state.is_world_process_zero:
            append_jsonl(self.metrics_path, {
                "step": state.global_step, "epoch": state.epoch, "overfit_warning": True,
                "overfit_start_step": onset, "best_eval_loss": best, "eval_loss_now": float(eval_loss),
            })


class IdleAdaptersCallback(TrainerCallback):
    """Once, before the first optimizer step: names the adapted layers whose adapters got no gradient. The model
    reads such a layer's weight directly instead of calling it (Mamba's and Jamba's dt_proj: dt_proj.weight @ x;
    a fused Mamba-2 kernel's out_proj on a GPU), so its adapter trains nothing while it counts as trained.
    One process only (ZeRO and FSDP keep gradients elsewhere); nothing when no gradient exists at all (a
    skipped step)."""

    def __init__(self, log):
        self.log, self.done = log, False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.done or model is None or args.world_size > 1:
            return
        self.done = True
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
        if not any(p.grad is not None for _, p in trainable):
            return
        # base_model.model.model.layers.0.mamba.dt_proj.lora_A.default.weight -> mamba.dt_proj
        idle = sorted({name_in_layer(n.split(".lora_")[0]) for n, p in trainable if p.grad is None})
        if idle:
            self.log(f"lora: the adapters on {', '.join(idle)} got no gradient in the first step: the model reads "
                     "those layers' weights directly, not through the layers (or, experts, no token reached them), "
                     "so they may train nothing; name the layers to adapt without them in lora.target_modules")
