"""The LR warm-up as a ratio of the run's real number of steps, shared by `sftlab train` and
`sftlab align`.

transformers reads a `warmup_steps` >= 1 as a step count, and sftlab passes `warmup_steps=0`
to TrainingArguments (the number of steps is not known when they are built), so each trainer
sets the step count here, once the scheduler is created.
"""

from __future__ import annotations

import math


class RatioWarmup:
    """A mixin for a transformers Trainer: `warmup_ratio` of the steps warm the LR up (None: the
    arguments' own `warmup_steps`, when the config gives one, stand)."""

    warmup_ratio: float | None = None

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.warmup_ratio is not None:
            self.args.warmup_steps = math.ceil(self.warmup_ratio * num_training_steps)
        return super().create_scheduler(num_training_steps, optimizer)
