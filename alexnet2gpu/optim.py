"""The paper's SGD (P 5) and its learning-rate schedule."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from alexnet2gpu.config import TrainConfig


class PaperSGD(torch.optim.Optimizer):
    """P 5, exactly: v <- momentum * v - weight_decay * lr * w - lr * grad; w <- w + v.

    The learning rate sits inside the velocity, so after a drop the old velocity keeps its old
    size; `torch.optim.SGD` (v <- m v + g + wd w; w <- w - lr v) rescales it at once.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                v = state["velocity"]
                v.mul_(momentum).add_(p, alpha=-decay * lr).add_(p.grad, alpha=-lr)
                p.add_(v)
        return loss


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if config.optimizer == "paper":
        return PaperSGD(params, config.lr, config.momentum, config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """lr / 10 when the validation error stops improving, at most `lr_drops` times."""
    floor = config.lr * 0.1**config.lr_drops  # the lr after the last allowed drop
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=config.lr_patience, min_lr=floor
    )
