"""A stuck-loss alarm: one warning line when the training loss diverges or sits at chance.

A network that predicts nothing scores ln(classes) (2.30 for 10 classes, 6.91 for 1000): Caffe
users saw ImageNet runs of the paper's initialisation sit there for tens of thousands of steps
(BVLC/caffe issues 401, 59, 2085). The alarm says so within half an epoch and names the flags
that fix it; it judges the mean loss of the last `alarm_window` steps, never one noisy batch.
"""

from __future__ import annotations

import math
from collections import deque

from alexnet2gpu.config import TrainConfig

FIXES = {
    "diverging": (
        "the first updates are too large for the inputs' scale (the paper's N(0, 0.01) init with biases 1 "
        "does this on 0-255 pixels); try --init caffe, a smaller --lr or --warmup-steps"
    ),
    "flat": (
        "the network outputs chance (dead ReLUs, or updates too small to leave it); try --init caffe, "
        "--bias-rule convnet or a larger --lr"
    ),
}


class LossAlarm:
    """Feed it every step's training loss; it returns a warning at most once per kind."""

    def __init__(self, num_classes: int, config: TrainConfig, steps_per_epoch: int = 0) -> None:
        self.chance = math.log(num_classes)
        self.window = deque(maxlen=config.alarm_window)
        self.after_steps = config.alarm_after_steps
        self.diverge_above = config.alarm_diverge_factor * self.chance
        self.flat_margin = config.alarm_flat_margin * self.chance
        self.flat_steps = config.alarm_flat_steps and max(
            config.alarm_flat_steps, math.ceil(config.alarm_flat_epochs * steps_per_epoch)
        )
        self.flat_run = 0  # consecutive steps whose mean loss sat within the margin of chance
        self.fired: set[str] = set()

    def observe(self, step: int, loss: float) -> str | None:
        """`step` counts from 1; the warning names the step, the loss, the likely cause and the fix."""
        self.window.append(loss)
        if len(self.window) < self.window.maxlen:
            return None
        mean = sum(self.window) / len(self.window)
        self.flat_run = self.flat_run + 1 if abs(mean - self.chance) <= self.flat_margin else 0
        if step > self.after_steps and mean > self.diverge_above:
            what = f"is {mean:.2f}, well above chance (ln {math.exp(self.chance):.0f} = {self.chance:.2f})"
            return self._fire("diverging", step, what)
        if self.flat_steps and self.flat_run >= self.flat_steps:
            what = f"has stayed within {self.flat_margin:.2f} of chance ({self.chance:.2f}) for {self.flat_run} steps"
            return self._fire("flat", step, what)
        return None

    def _fire(self, kind: str, step: int, what: str) -> str | None:
        if kind in self.fired:
            return None
        self.fired.add(kind)
        mean_of = f"mean of {len(self.window)} steps"
        return f"warning: step {step}: the training loss ({mean_of}) {what}: {kind}. {FIXES[kind]}"
