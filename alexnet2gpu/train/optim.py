"""The paper's SGD (P 5), the bias rule's parameter groups and the learning-rate schedule."""

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
        """One update of every parameter that has a gradient, in a few `torch._foreach_*` kernels per
        (device, dtype) of each group rather than four small ones per parameter."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for params, grads, velocities in self._by_device_and_dtype(group):
                # the same operations, in the same order, as v.mul_(m).add_(w, alpha=-decay*lr).add_(g, alpha=-lr)
                torch._foreach_mul_(velocities, momentum)
                torch._foreach_add_(velocities, params, alpha=-decay * lr)
                torch._foreach_add_(velocities, grads, alpha=-lr)
                torch._foreach_add_(params, velocities)
        return loss

    def _by_device_and_dtype(self, group: dict) -> list[tuple[list, list, list]]:
        """(params, grads, velocities) of the group's parameters with a gradient, one triple per
        (device, dtype): a foreach kernel takes tensors of one device and dtype. A velocity starts at zero."""
        found: dict[tuple[torch.device, torch.dtype], tuple[list, list, list]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "velocity" not in state:
                state["velocity"] = torch.zeros_like(p)
            params, grads, velocities = found.setdefault((p.device, p.dtype), ([], [], []))
            params.append(p)
            grads.append(p.grad)
            velocities.append(state["velocity"])
        return list(found.values())


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """The optimiser's parameter groups under `config.bias_rule`.

    "paper": one group of every parameter in `model.parameters()` order (the layout tower-process
    runs and older checkpoints use). "convnet": the weights first, then the biases (1-D parameters)
    at `lr_mult` 2 with no weight decay (cuda-convnet epsB = 2 epsW, wc on weights; CF lr_mult 2,
    decay_mult 0). Each group keeps its `lr_mult` and `decay_mult`, so the lr schedule keeps the ratio.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if config.bias_rule == "paper":
        return [dict(params=params, name="all", lr_mult=1.0, decay_mult=1.0)]
    weights = [p for p in params if p.ndim > 1]
    biases = [p for p in params if p.ndim <= 1]
    return [
        dict(params=weights, name="weights", lr_mult=1.0, decay_mult=1.0),
        dict(params=biases, name="biases", lr_mult=2.0, decay_mult=0.0),
    ]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config)
    for group in groups:
        group.update(lr=config.base_lr * group["lr_mult"], weight_decay=config.weight_decay * group["decay_mult"])
    if config.optimizer == "paper":
        return PaperSGD(groups, config.base_lr, config.momentum, config.weight_decay)
    return torch.optim.SGD(groups, lr=config.base_lr, momentum=config.momentum, weight_decay=config.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the base learning rate: each group gets `lr` times its `lr_mult` (1 where it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """lr / 10 when the validation error stops improving, at most `lr_drops` times, in every group."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=config.lr_patience, min_lr=_floors(optimizer, config)
    )


def _floors(optimizer: torch.optim.Optimizer, config: TrainConfig) -> list[float]:
    """Each group's lr after the last allowed drop: a shared floor would hold the bias group back."""
    floor = config.base_lr * 0.1**config.lr_drops
    return [floor * group.get("lr_mult", 1.0) for group in optimizer.param_groups]
