"""How many bytes cross between the towers' devices, from the shapes and counted on a real run.

Per image and step, in float32: forward, each tower sends its half of the activations at each
exchange point (P 3.2: into conv3, fc6, fc7, fc8) and tower B sends its logits to device 0;
backward, the gradient of every copy travels back. The input batch goes to each device once
(counted apart: it comes from the data loader, not from the other tower). Caffe's LRN across the
towers (`lrn_scope="all"`) adds a halo of 2 edge channels each way at LRN1 and LRN2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alexnet2gpu.config import AlexNetConfig
from alexnet2gpu.model.layers import halo_widths


class CopyCounter(TorchDispatchMode):
    """Records (from, to, shape, bytes) for every op whose output lands on another device."""

    def __init__(self) -> None:
        super().__init__()
        self.moves: list[tuple[str, str, tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if isinstance(out, torch.Tensor) and src is not None and out.device != src.device:
            self.moves.append((str(src.device), str(out.device), tuple(out.shape), out.numel() * out.element_size()))
        return out


@dataclass(frozen=True)
class Exchange:
    point: str
    features: int  # per image, per tower, each direction
    directions: int = 2

    def forward_bytes(self, itemsize: int = 4) -> int:
        return self.features * self.directions * itemsize

    def step_bytes(self, itemsize: int = 4) -> int:
        """Forward copies plus their gradients in the backward pass."""
        return 2 * self.forward_bytes(itemsize)


def exchanges(config: AlexNetConfig | None = None) -> list[Exchange]:
    """The paper's exchange points, per image."""
    c = config or AlexNetConfig()
    _, _, s2, s5 = c.map_sizes  # 13 and 6 in P's network
    pool2, pool5 = c.conv_channels[1] // 2 * s2 * s2, c.conv_channels[4] // 2 * s5 * s5
    fc6, fc7 = c.fc_features[0] // 2, c.fc_features[1] // 2
    rows = []
    if c.lrn_across:  # CF, not P: LRN windows that cross the towers read the other's edge channels
        to_a, to_b = halo_widths(c.lrn_size)
        s1, s1p = c.map_sizes[0], c.map_sizes[1]  # 55 and 27: conv1's and conv2's maps
        for name, s in (("lrn1 halo (conv1)", s1), ("lrn2 halo (conv2)", s1p)):
            if to_a == to_b:
                rows.append(Exchange(name, to_a * s * s))
            else:  # an even window: more channels one way than the other
                rows += [Exchange(f"{name} to A", to_a * s * s, 1), Exchange(f"{name} to B", to_b * s * s, 1)]
    rows += [Exchange("conv3 input (pool2)", pool2), Exchange("fc6 input (pool5)", pool5)]
    rows += [Exchange("fc7 input (fc6)", fc6), Exchange("fc8 input (fc7)", fc7)]
    if c.fc8_split:
        rows.append(Exchange("logits to device 0", c.fc8_out[1], directions=1))
    else:  # tower A alone needs tower B's fc7 output
        rows[-1] = Exchange("fc8 input (fc7)", fc7, directions=1)
    return rows


def naive_exchanges(config: AlexNetConfig | None = None) -> list[Exchange]:
    """A split that shares every layer's output with the other tower (after pooling where a layer
    pools), as one model-parallel layer per layer would: the figure the paper's design avoids."""
    c = config or AlexNetConfig()
    half = [ch // 2 for ch in c.conv_channels]
    _, s1, s2, s5 = c.map_sizes
    sizes = [s1, s2, s2, s2, s5]  # pool1, pool2, conv3, conv4, pool5: 27, 13, 13, 13, 6 in P's network
    rows = [Exchange(f"conv{i + 1} output", half[i] * s * s) for i, s in enumerate(sizes)]
    rows += [Exchange("fc6 output", c.fc_features[0] // 2), Exchange("fc7 output", c.fc_features[1] // 2)]
    rows.append(Exchange("logits to device 0", c.fc8_out[1], directions=1))
    return rows


def table(config: AlexNetConfig | None = None, itemsize: int = 4) -> str:
    """Both splits side by side, as `bench` prints them."""
    lines = []
    for name, rows in (
        ("paper: conv3, fc6, fc7, fc8", exchanges(config)),
        ("naive: every layer", naive_exchanges(config)),
    ):
        lines.append(f"{name:<28} {'forward B/img':>14} {'fwd + bwd B/img':>17}")
        for row in rows:
            lines.append(f"  {row.point:<26} {row.forward_bytes(itemsize):>14,} {row.step_bytes(itemsize):>17,}")
        forward, step = sum(r.forward_bytes(itemsize) for r in rows), sum(r.step_bytes(itemsize) for r in rows)
        lines.append(f"  {'total':<26} {forward:>14,} {step:>17,}")
    return "\n".join(lines)


def counted_forward_bytes(config: AlexNetConfig | None = None, batch: int = 2) -> int:
    """Bytes moved between cuda:0 and cuda:1 in one forward pass of fake tensors (no GPU needed),
    the input batch excluded; per image."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from alexnet2gpu.model.alexnet import AlexNet2GPU

    c = config or AlexNetConfig()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = AlexNet2GPU(c, devices=("cuda:0", "cuda:1"))
        x = torch.zeros(batch, c.in_channels, c.input_size, c.input_size, device="cuda:0")
        with CopyCounter() as counter:
            model(x)
    between = [m for m in counter.moves if {m[0], m[1]} == {"cuda:0", "cuda:1"} and m[2] != tuple(x.shape)]
    return sum(m[3] for m in between) // batch
