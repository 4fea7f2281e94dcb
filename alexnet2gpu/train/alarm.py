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
    """Feed it every step's training loss; it returns a warning at most once per kind.

    diverging: the mean of the last `alarm_window` losses is above `alarm_diverge_factor`
    ln(classes) after the first `alarm_after_steps` steps. flat: the mean of the last half epoch of
    losses (at least `alarm_flat_steps`) is within `alarm_flat_margin` ln(classes) of ln(classes).
    """

    def __init__(self, num_classes: int, config: TrainConfig, steps_per_epoch: int = 0) -> None:
        self.chance = math.log(num_classes)
        self.recent = deque(maxlen=config.alarm_window)
        self.after_steps = config.alarm_after_steps
        self.diverge_above = config.alarm_diverge_factor * self.chance
        self.flat_margin = config.alarm_flat_margin * self.chance
        flat_steps = max(config.alarm_flat_steps, math.ceil(config.alarm_flat_epochs * steps_per_epoch))
        self.long = deque(maxlen=flat_steps) if config.alarm_flat_steps else None
        self.long_sum = 0.0
        self.fired: set[str] = set()

    def observe(self, step: int, loss: float) -> str | None:
        """`step` counts from 1; the warning names the step, the loss, the likely cause and the fix."""
        self.recent.append(loss)
        mean = sum(self.recent) / len(self.recent)
        if step > self.after_steps and len(self.recent) == self.recent.maxlen and mean > self.diverge_above:
            return self._fire("diverging", step, f"mean of the last {len(self.recent)} steps is {mean:.2f}")
        if self.long is None:
            return None
        if len(self.long) == self.long.maxlen:
            self.long_sum -= self.long[0]
        self.long.append(loss)
        self.long_sum += loss
        flat = self.long_sum / len(self.long)
        if len(self.long) == self.long.maxlen and abs(flat - self.chance) <= self.flat_margin:
            return self._fire("flat", step, f"mean of the last {len(self.long)} steps is {flat:.2f}")
        return None

    def state_dict(self) -> dict:
        """What the alarm has heard, for the checkpoint: a resumed run judges the same windows and
        never repeats a warning it gave."""
        return {"recent": list(self.recent), "long": list(self.long or []), "fired": sorted(self.fired)}

    def load_state_dict(self, state: dict) -> None:
        self.recent.extend(state.get("recent", []))
        if self.long is not None:
            self.long.extend(state.get("long", []))
            self.long_sum = sum(self.long)
        self.fired.update(state.get("fired", []))

    def _fire(self, kind: str, step: int, what: str) -> str | None:
        if kind in self.fired:
            return None
        self.fired.add(kind)
        chance = f"ln {math.exp(self.chance):.0f} = {self.chance:.2f}"
        where = "well above chance" if kind == "diverging" else f"within {self.flat_margin:.2f} of chance"
        return f"warning: step {step}: training loss {kind} ({what}, {where}, {chance}). {FIXES[kind]}"
