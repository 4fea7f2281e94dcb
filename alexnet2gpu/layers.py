"""The small pieces the towers and the fused model share: LRN per group, the exchange, the init."""

from __future__ import annotations

import torch
from torch import nn

from alexnet2gpu.lrn import local_response_norm


class LocalResponseNorm(nn.Module):
    """P 3.3: b = a / (k + alpha/n * sum of a^2 over n neighbouring maps)^beta, within each group.

    With `groups=2` the window never crosses from one tower's channels into the other's, which is
    what makes the fused model the same function as the two towers.
    """

    def __init__(self, size: int, alpha: float, beta: float, k: float, groups: int = 1) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k, self.groups = size, alpha, beta, k, groups
        self.reference = False  # True: PyTorch's own F.local_response_norm (the bench's baseline)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = x.reshape(n * self.groups, c // self.groups, h, w)  # (N*G, C/G, H, W): one group per row
        lrn = nn.functional.local_response_norm if self.reference else local_response_norm  # the same maths
        return lrn(x, self.size, self.alpha, self.beta, self.k).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, groups={self.groups}"


class Dropout(nn.Module):
    """P 4.2: zero each unit with probability p in training (inverted: survivors scaled by 1/(1-p)).

    By default the masks come from the global generator. With `masks = (generator, start, total)`
    set, the mask of a whole batch of `total` rows is drawn from `generator` and this module takes
    rows `start` onwards: a process feeding part of a global batch (`alexnet2gpu.distributed`) then
    applies exactly the masks that one process feeding the whole batch would.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.masks: tuple[torch.Generator, int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.masks is None:
            return nn.functional.dropout(x, self.p, training=True)
        generator, start, total = self.masks
        rows = max(total, start + x.shape[0])
        keep = torch.empty((rows, *x.shape[1:]), device=x.device, dtype=x.dtype).bernoulli_(
            1 - self.p, generator=generator
        )
        return x * keep[start : start + x.shape[0]] / (1 - self.p)  # (N, features)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def join(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Both towers' activations on `device`, tower A's channels first (the fused layout)."""
    return torch.cat([a.to(device), b.to(device)], dim=1)


def exchange(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The only place the towers talk (P 3.2): before conv3, fc6, fc7 and fc8 each tower gets the
    other's activations, one copy in each direction. A no-op move when both share a device."""
    return join(a, b, a.device), join(a, b, b.device)


def activation(name: str) -> nn.Module:
    return nn.ReLU(inplace=True) if name == "relu" else nn.Tanh()


# P 5: weights N(0, 0.01); bias 1 in conv2, conv4, conv5, fc6, fc7 (ReLUs start with positive
# inputs), bias 0 in conv1, conv3 and fc8 (and in the seed's fc_hidden, which P does not have).
BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


def _paper(name: str, layer: nn.Module) -> None:
    layer.weight.normal_(0.0, 0.01)
    layer.bias.fill_(1.0 if name in BIAS_ONE else 0.0)


def _caffe(name: str, layer: nn.Module) -> None:
    """CF bvlc_alexnet: biases of 1 "gave flat loss", so 0.1 where P has 1; fc6, fc7 N(0, 0.005)."""
    layer.weight.normal_(0.0, 0.005 if name in ("fc6", "fc7") else 0.01)
    layer.bias.fill_(0.1 if name in BIAS_ONE else 0.0)


def _he(name: str, layer: nn.Module) -> None:
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    layer.bias.zero_()


def _torch(name: str, layer: nn.Module) -> None:
    """PyTorch's own init (the seed's network sets none): weights kaiming_uniform with a=sqrt(5),
    i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases from the same range."""
    layer.reset_parameters()


# One function per AlexNetConfig.init: (layer name as in P, the layer) -> None, in place.
INIT_SCHEMES = {"paper": _paper, "caffe": _caffe, "he": _he, "torch": _torch}


@torch.no_grad()
def init_weights(module: nn.Module, scheme: str = "paper") -> None:
    """Initialise every conv and linear layer below `module`, drawing from each device's default
    generator (so `torch.manual_seed` makes it reproducible). "paper" is P 5; "caffe" is CF
    bvlc_alexnet's; "he" is He et al. 2015's N(0, 2 / fan_in) with zero biases; "torch" is PyTorch's default."""
    init = INIT_SCHEMES[scheme]
    for name, layer in module.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            init(name.split(".")[-1], layer)
