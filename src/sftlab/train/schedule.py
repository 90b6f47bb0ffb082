"""The LR warm-up as a ratio of the run's real number of steps, shared by `sftlab train` and
`sftlab align`.

transformers reads a `warmup_steps` >= 1 as a step count, and sftlab passes `warmup_steps=0`
to TrainingArguments (the number of steps is not known when they are built), so each trainer
sets the step count here, once the scheduler is created.
"""

from __future__ import annotations

import logging
import math

logger = logging.getLogger("sftlab.train")


class RatioWarmup:
    """A mixin for a transformers Trainer: `warmup_ratio` of the steps warm the LR up (None: the
    arguments' own `warmup_steps`, when the config gives one, stand)."""

    warmup_ratio: float | None = None

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.warmup_ratio is not None:
            self.args.warmup_steps = warmup_steps(self.warmup_ratio, num_training_steps)
        return super().create_scheduler(num_training_steps, optimizer)


def warmup_steps(ratio: float, steps: int) -> int:
    """ceil(ratio x steps), as transformers counts a warm-up ratio, except for a one-step run: a
    warm-up's first step has a learning rate of 0, so one step of warm-up (what any ratio above 0
    gives it) would end the run where it started, without a word."""
    n = math.ceil(ratio * steps)
    if n and steps == 1:
        logger.warning("warm-up: a one-step run is not warmed up (warmup_ratio %g would give it a learning rate "
                       "of 0: nothing would be trained)", ratio)
        return 0
    return n
