"""The small pieces the towers and the fused model share: LRN per group, the exchange, the init."""

from __future__ import annotations

import math

import torch
from torch import nn

from alexnet2gpu.model.lrn import local_response_norm, spatial_response_norm


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
        lrn = nn.functional.local_response_norm if self.reference else local_response_norm  # the same maths
        if self.groups > 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # a reshape would copy channels-last maps back to NCHW: each group's channel slice instead
            parts = [lrn(part, self.size, self.alpha, self.beta, self.k) for part in x.chunk(self.groups, dim=1)]
            return torch.cat(parts, dim=1).contiguous(memory_format=torch.channels_last)
        x = x.reshape(n * self.groups, c // self.groups, h, w)  # (N*G, C/G, H, W): one group per row
        return lrn(x, self.size, self.alpha, self.beta, self.k).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, groups={self.groups}"


class SpatialNorm(nn.Module):
    """K12's normalisation within each map (`cnorm2`): b = a / (1 + alpha/size^2 * sum of a^2 over the
    size x size window around the pixel)^beta. Each map alone, so the towers and the fused model agree."""

    def __init__(self, size: int, alpha: float, beta: float) -> None:
        super().__init__()
        self.size, self.alpha, self.beta = size, alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spatial_response_norm(x, self.size, self.alpha, self.beta)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}"


class Dropout(nn.Module):
    """P 4.2: zero each unit with probability p in training. `scale` says where the factor goes: "test"
    (P 4.2, K12) keeps the survivors as they are and multiplies every output by 1 - p at test; "train"
    (inverted, PyTorch's) scales the survivors by 1/(1-p) and leaves the test outputs alone.

    Without a mask, the mask comes from the global generator. Training passes `mask`, a 0/1 tensor
    of x's shape drawn before the forward (`dropout_masks`): a compiled model then stays one graph
    (a generator inside it breaks the graph at every mask), and a process feeding part of a global
    batch applies exactly the masks one process feeding the whole batch would.
    """

    def __init__(self, p: float, scale: str = "train") -> None:
        super().__init__()
        self.p, self.scale = p, scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.p == 0:
            return x
        if not self.training:
            return x * (1 - self.p) if self.scale == "test" else x
        if mask is None:
            mask = torch.empty_like(x).bernoulli_(1 - self.p)
        kept = x * mask.to(x.dtype)  # (N, features)
        return kept if self.scale == "test" else kept / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, scale={self.scale}"


def step_seed(seed: int, step: int) -> int:
    """The seed of a step's random draws (crops, flips, colour noise, dropout): a function of (seed, step) alone."""
    return (seed * 1_000_003 + step) % (2**63)


def dropout_generator(seed: int, step: int, tower: int, device: torch.device) -> torch.Generator:
    """Tower `tower`'s dropout masks of `step`: a function of (seed, step, tower) alone."""
    return torch.Generator(device=device).manual_seed((step_seed(seed, step) * 8 + tower) % 2**63)


def dropout_masks(
    p: float, features: tuple[int, int], generator: torch.Generator, rows: slice, total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tower's fc6 and fc7 keep-masks (0/1) for rows `rows` of a global batch of `total`: drawn
    for the whole batch (fc6's, then fc7's) on the generator's device, so that the rows a process
    takes do not depend on how the batch is split."""
    total = max(total, rows.stop)
    dtype = torch.get_default_dtype()  # float32 unless a test sets float64
    draw = [
        torch.empty((total, f), device=generator.device, dtype=dtype).bernoulli_(1 - p, generator=generator)
        for f in features
    ]
    return draw[0][rows], draw[1][rows]  # (n, fc6 features), (n, fc7 features)


def join(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Both towers' activations on `device`, tower A's channels first (the fused layout)."""
    return torch.cat([a.to(device), b.to(device)], dim=1)


def exchange(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The only place the towers talk (P 3.2): before conv3, fc6, fc7 and fc8 each tower gets the
    other's activations, one copy in each direction. A no-op move when both share a device."""
    return join(a, b, a.device), join(a, b, b.device)


def halo_widths(size: int) -> tuple[int, int]:
    """(channels tower A needs from tower B, channels tower B needs from tower A) for an LRN window
    of `size` across both towers: the window of channel c runs from c - size//2 to c + (size-1)//2."""
    return (size - 1) // 2, size // 2


def halo(a: torch.Tensor, b: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Caffe's LRN across the towers (`AlexNetConfig.lrn_scope="all"`), an exchange P does not have:
    tower A gets B's first (size-1)//2 channels after its own, tower B gets A's last size//2 before
    its own (2 each for size 5): (N, C, H, W) per tower -> (N, C + 2, H, W)."""
    after, before = halo_widths(size)
    a_ext = torch.cat([a, b[:, :after].to(a.device)], dim=1)
    b_ext = torch.cat([a[:, a.shape[1] - before :].to(b.device), b], dim=1)
    return a_ext, b_ext


def lrn_across(
    lrn_a: nn.Module, lrn_b: nn.Module, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both towers' maps normalised as one LRN over all their channels (A's first) would: each tower
    normalises its maps with the halo (`halo`) and keeps its own channels. Exact: a channel's window
    never reaches past the halo, and past the halo is the zero padding an LRN over all channels has."""
    c, before = a.shape[1], halo_widths(lrn_a.size)[1]
    a_ext, b_ext = halo(a, b, lrn_a.size)
    return lrn_a(a_ext)[:, :c], lrn_b(b_ext)[:, before:]  # (N, C, H, W) per tower


def activation(name: str) -> nn.Module:
    return nn.ReLU(inplace=True) if name == "relu" else nn.Tanh()


# P 5: weights N(0, 0.01); bias 1 in conv2, conv4, conv5, fc6, fc7 (ReLUs start with positive
# inputs), bias 0 in conv1, conv3 and fc8 (and in the seed's fc_hidden, which P does not have).
BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


def _paper(name: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
    weight.normal_(0.0, 0.01)
    bias.fill_(1.0 if name in BIAS_ONE else 0.0)


def _k12(name: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """K12 layers-145.cfg (`initW`, `initB`): N(0, 0.03) for conv3, conv4 and conv5, N(0, 0.01) for the
    others; biases 1 in conv2, conv4, conv5, fc6 and fc7, 0 elsewhere (as P 5's)."""
    weight.normal_(0.0, 0.03 if name in ("conv3", "conv4", "conv5") else 0.01)
    bias.fill_(1.0 if name in BIAS_ONE else 0.0)


def _caffe(name: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """CF bvlc_alexnet: biases of 1 "gave flat loss", so 0.1 where P has 1; fc6, fc7 N(0, 0.005)."""
    weight.normal_(0.0, 0.005 if name in ("fc6", "fc7") else 0.01)
    bias.fill_(0.1 if name in BIAS_ONE else 0.0)


def _he(name: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
    nn.init.kaiming_normal_(weight, nonlinearity="relu")
    bias.zero_()


def _torch(name: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """PyTorch's own init (the seed's network sets none), as nn.Conv2d / nn.Linear.reset_parameters:
    weights kaiming_uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases from the same range."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    fan_in = weight[0].numel()
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(bias, -bound, bound)


# One function per AlexNetConfig.init: (layer name as in P, weight, bias) -> None, in place on CPU tensors.
INIT_SCHEMES = {"paper": _paper, "k12": _k12, "caffe": _caffe, "he": _he, "torch": _torch}


@torch.no_grad()
def init_weights(module: nn.Module, scheme: str = "paper") -> None:
    """Initialise every conv and linear layer below `module`, in module order, drawing every value on
    the CPU from its default generator (so `torch.manual_seed` makes it reproducible) and copying it to
    the layer's device: the weights are a function of the seed alone, the same on every device. (Drawn
    on the devices, two GPUs seeded alike by `torch.manual_seed` would give both towers the same.)
    "paper" is P 5's text; "k12" is the 2012 code's (layers-145); "caffe" is CF bvlc_alexnet's; "he" is
    He et al. 2015's N(0, 2 / fan_in) with zero biases; "torch" is PyTorch's default."""
    init = INIT_SCHEMES[scheme]
    for name, layer in module.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            weight, bias = torch.empty(layer.weight.shape), torch.empty(layer.bias.shape)  # on the CPU
            init(name.split(".")[-1], weight, bias)
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
