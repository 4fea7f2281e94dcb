"""The paper's SGD (P 5), the bias rule's parameter groups and the learning-rate schedules."""

from __future__ import annotations

import math
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
            if lr == 0:  # a frozen layer is not updated at all (K12 src/weights.cu: only a rate > 0 updates)
                continue
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


# The layers in the order their parameter groups take under the "2012" schedule (`fc_hidden` is the seed's)
LAYER_ORDER = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc_hidden", "fc8")


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """The optimiser's parameter groups under `config.bias_rule` and `config.schedule`.

    "paper": one group of every parameter in `model.parameters()` order (the layout tower-process
    runs and older checkpoints use). "convnet": the weights first, then the biases (1-D parameters)
    at `lr_mult` 2 with no weight decay (cuda-convnet epsB = 2 epsW, wc on weights; CF lr_mult 2,
    decay_mult 0). Each group keeps its `lr_mult` and `decay_mult`, so the lr schedule keeps the ratio.
    Under the "2012" schedule every layer's weights and biases are a group of their own ("conv1.weight",
    "conv1.bias", ...), since run 145 set conv1's rates apart; a layer this process lacks (tower B's fc8
    when one fc8 sits on tower A) is an empty group, so that every process has the same groups.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if config.schedule == "2012":
        return _layer_groups(model, config)
    if config.bias_rule == "paper":
        return [dict(params=params, name="all", lr_mult=1.0, decay_mult=1.0)]
    weights = [p for p in params if p.ndim > 1]
    biases = [p for p in params if p.ndim <= 1]
    return [
        dict(params=weights, name="weights", lr_mult=1.0, decay_mult=1.0),
        dict(params=biases, name="biases", lr_mult=2.0, decay_mult=0.0),
    ]


def _layer_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    found: dict[tuple[str, str], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            *_, layer, kind = name.split(".")  # tower_a.conv1.weight, tower.conv1.bias, module.tower.fc8.weight
            found.setdefault((layer, kind), []).append(p)
    unknown = sorted({layer for layer, _ in found} - set(LAYER_ORDER))
    if unknown:
        raise ValueError(f"the 2012 schedule sets rates by layer and knows {', '.join(LAYER_ORDER)}; got {unknown}")
    layers = [layer for layer in LAYER_ORDER if layer != "fc_hidden" or ("fc_hidden", "weight") in found]
    bias_mult, bias_decay = (1.0, 1.0) if config.bias_rule == "paper" else (2.0, 0.0)
    return [
        dict(
            params=found.get((layer, kind), []),
            name=f"{layer}.{kind}",
            layer=layer,
            lr_mult=1.0 if kind == "weight" else bias_mult,
            decay_mult=1.0 if kind == "weight" else bias_decay,
        )
        for layer in layers
        for kind in ("weight", "bias")
    ]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config)
    for group in groups:
        group.update(lr=config.base_lr * group["lr_mult"], weight_decay=config.weight_decay * group["decay_mult"])
    if config.optimizer == "paper":
        return PaperSGD(groups, config.base_lr, config.momentum, config.weight_decay)
    return torch.optim.SGD(groups, lr=config.base_lr, momentum=config.momentum, weight_decay=config.weight_decay)


def weights_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr the logs report: the weights' (the first group at lr_mult 1 outside conv1, which the 2012
    schedule slows and freezes on its own), else the first group's."""
    for group in optimizer.param_groups:
        if group.get("lr_mult", 1.0) == 1.0 and group.get("layer") != "conv1":
            return group["lr"]
    return optimizer.param_groups[0]["lr"]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the base learning rate: each group gets `lr` times its `lr_mult` (1 where it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


class Plateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """P 5's text: lr / 10 when the validation error stops improving, at most `lr_drops` times, in every group."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
        super().__init__(
            optimizer, mode="min", factor=0.1, patience=config.lr_patience, min_lr=_floors(optimizer, config)
        )

    def colour_noise(self, epoch: int) -> bool:
        """Whether epoch `epoch` (from 0) adds PCA colour noise: always, under this rule."""
        return True

    def describe(self) -> str | None:
        return None


# Run 145 as its layer-params-145.cfg's comments record it (K12): the epochs (from 1) from which each
# change held, and the epoch it was stopped after.
RUN_145 = dict(epochs=91, weight_drops=(25, 51, 79), conv1_slow=67, conv1_frozen=72, noise_off=67)
CONV1_SLOW = 1e-3  # conv1's epsW 0.00001 from epoch 67: 1e-3 of the starting 0.01


class Recorded:
    """The "2012" schedule: run 145's epochs, each change from the same fraction of this run's epochs
    as of run 145's 91 (rounded up to a whole epoch, so 90 epochs keep them all and one epoch none).

    Weights start at the base lr and lose a factor 10 at each drop; conv1's weights fall to 1e-3 of the
    base lr at `conv1_slow` and conv1 is frozen (weights and biases) at `conv1_frozen`; the biases keep
    the base lr times their lr_mult (K12: epsB 0.02 throughout); the colour noise stops at `noise_off`.
    `step` moves to the next epoch, as the plateau rule's; the validation error is not read."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
        self.optimizer, self.base_lr, self.epochs, self.last_epoch = optimizer, config.base_lr, config.epochs, 0
        self.starts = {
            key: self.scaled(value) if isinstance(value, int) else tuple(self.scaled(v) for v in value)
            for key, value in RUN_145.items()
            if key != "epochs"
        }
        self.apply(0)

    def scaled(self, epoch: int) -> int:
        """Run 145's epoch `epoch` (from 1) as this run's epoch index (from 0)."""
        return math.ceil((epoch - 1) * self.epochs / RUN_145["epochs"])

    def factor(self, epoch: int, layer: str, kind: str) -> float:
        """The lr of `layer`'s weights or biases in epoch `epoch` (from 0), as a multiple of the base lr."""
        s = self.starts
        if layer == "conv1" and epoch >= s["conv1_frozen"]:
            return 0.0
        if kind == "bias":
            return 1.0
        weights = 0.1 ** sum(epoch >= start for start in s["weight_drops"])
        return min(weights, CONV1_SLOW) if layer == "conv1" and epoch >= s["conv1_slow"] else weights

    def apply(self, epoch: int) -> None:
        for group in self.optimizer.param_groups:
            layer, kind = group["name"].split(".")
            group["lr"] = self.base_lr * group["lr_mult"] * self.factor(epoch, layer, kind)

    def step(self, metric: float | None = None) -> None:
        self.last_epoch += 1
        self.apply(self.last_epoch)

    def colour_noise(self, epoch: int) -> bool:
        return epoch < self.starts["noise_off"]

    def describe(self) -> str:
        """What this run gets of run 145's schedule, in epochs from 1 (for the run's first lines)."""
        s = self.starts

        def at(index: int) -> str:
            return str(index + 1) if index < self.epochs else f"{index + 1} (past this run)"

        scaled = "" if self.epochs == RUN_145["epochs"] else f" scaled from its 91 epochs to {self.epochs}"
        return (
            f"schedule 2012 (K12 run 145{scaled}): the weights' lr / 10 from epochs "
            f"{', '.join(at(e) for e in s['weight_drops'])}; conv1's {CONV1_SLOW:g}x from {at(s['conv1_slow'])} "
            f"and frozen from {at(s['conv1_frozen'])}; colour noise off from {at(s['noise_off'])}; biases never lowered"
        )

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = int(state["last_epoch"])
        self.apply(self.last_epoch)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> Plateau | Recorded:
    """The schedule `config.schedule` names: P 5's plateau rule or run 145's recorded epochs."""
    return Recorded(optimizer, config) if config.schedule == "2012" else Plateau(optimizer, config)


def _floors(optimizer: torch.optim.Optimizer, config: TrainConfig) -> list[float]:
    """Each group's lr after the last allowed drop: a shared floor would hold the bias group back."""
    floor = config.base_lr * 0.1**config.lr_drops
    return [floor * group.get("lr_mult", 1.0) for group in optimizer.param_groups]
