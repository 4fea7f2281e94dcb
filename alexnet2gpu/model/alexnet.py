"""The 2012 AlexNet as it was trained: two half-width towers on two devices (`AlexNet2GPU`), and
the same function as one module with grouped convolutions (`AlexNetFused`).

P = Krizhevsky, Sutskever, Hinton, NIPS 2012. Per tower, as P 3.5 and Figure 2:

    conv1 11x11/4  48 -> ReLU -> LRN -> pool 3/2   (N, 48, 55, 55) -> (N, 48, 27, 27)
    conv2 5x5     128 -> ReLU -> LRN -> pool 3/2   (N, 128, 27, 27) -> (N, 128, 13, 13)
    (K12, the 2012 code's layers-145.cfg: conv1 -> LRN -> pool -> ReLU, and a spatial norm within each
    map between conv2's LRN and pool: `lrn1_input="linear"`, `spatial_norm=True`)
    conv3 3x3     192 -> ReLU     reads both towers (N, 256, 13, 13) in
    conv4 3x3     192 -> ReLU
    conv5 3x3     128 -> ReLU -> pool 3/2          (N, 128, 6, 6)
    fc6 2048 -> ReLU -> dropout                    reads both towers (N, 9216) in
    fc7 2048 -> ReLU -> dropout                    reads both towers (N, 4096) in
    fc8 500                                        reads both towers (N, 4096) in

With `lrn_scope="all"` (Caffe's bvlc_alexnet, `AlexNetConfig.caffe`) LRN1 and LRN2 run over both
towers' channels: each tower reads the other's 2 edge channels there (`layers.lrn_across`).

The seed's network (`AlexNetConfig.seed_mnist`), which P does not have, changes two things: with
`conv1_padding="none"` a 224 input gives 54, 26, 12 and 5x5 maps (towers and fused alike), and a
one-tower `fc_hidden` layer sits between fc7 and fc8.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alexnet2gpu.config import AlexNetConfig
from alexnet2gpu.model.layers import (
    LAYERS,
    Dropout,
    LocalResponseNorm,
    SpatialNorm,
    activation,
    dropout_masks,
    exchange,
    init_weights,
    join,
    lrn_across,
)

TOWERS = ("tower_a", "tower_b")  # the towers' attribute names: the prefixes of every two-tower state dict
Device = torch.device | str
Masks = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def check_input(x: torch.Tensor, config: AlexNetConfig) -> None:
    """Reject an input the network was not built for, saying what it expects."""
    expected = (config.in_channels, config.input_size, config.input_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"AlexNet input has shape {tuple(x.shape)}; expected (N, {', '.join(map(str, expected))}): "
            f"{config.in_channels}-channel {config.input_size}x{config.input_size} crops "
            f"(set AlexNetConfig.in_channels / input_size to match your data)"
        )


def _lrn(config: AlexNetConfig, groups: int) -> nn.Module:
    if not config.lrn:
        return nn.Identity()
    return LocalResponseNorm(config.lrn_size, config.lrn_alpha, config.lrn_beta, config.lrn_k, groups)


def _spatial_norm(config: AlexNetConfig) -> nn.Module:
    if not config.spatial_norm:
        return nn.Identity()
    return SpatialNorm(config.spatial_norm_size, config.spatial_norm_alpha, config.spatial_norm_beta)


def _relu_before_lrn1(config: AlexNetConfig) -> bool:
    """Whether conv1's ReLU comes before LRN1 (P's text) or after pool1 (K12: LRN1 reads the linear output)."""
    return config.lrn1_input == "relu"


def _pool(config: AlexNetConfig) -> nn.MaxPool2d:
    kernel, stride = config.pool_kernel_stride
    return nn.MaxPool2d(kernel, stride)


class Tower(nn.Module):
    """One tower: its share of every layer. conv3 and the fc layers take both towers' inputs."""

    def __init__(self, config: AlexNetConfig, index: int, device: Device | None = None) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = (c // config.towers for c in config.conv_channels)
        f6, f7 = (f // config.towers for f in config.fc_features)
        both = dict(device=device)
        self.conv1 = nn.Conv2d(config.in_channels, c1, 11, stride=4, **both)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2, **both)
        self.conv3 = nn.Conv2d(config.conv_channels[1], c3, 3, padding=1, **both)  # both towers' pool2
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1, **both)
        self.conv5 = nn.Conv2d(c4, c5, 3, padding=1, **both)
        pool5 = config.map_sizes[-1]  # 6 (P), 5 unpadded
        self.fc6 = nn.Linear(config.conv_channels[4] * pool5 * pool5, f6, **both)  # both towers' pool5
        self.fc7 = nn.Linear(config.fc_features[0], f7, **both)
        fc8_out = config.fc8_out[index]
        self.fc8 = nn.Linear(config.fc_features[1], fc8_out, **both) if fc8_out else None
        self.lrn1, self.lrn2 = _lrn(config, 1), _lrn(config, 1)
        self.norm2 = _spatial_norm(config)
        self.pool1, self.pool2, self.pool5 = _pool(config), _pool(config), _pool(config)
        self.act = activation(config.activation)
        self.drop = Dropout(config.dropout, config.dropout_scale)
        self.conv1_pad = config.conv1_pad
        self.relu_before_lrn1 = _relu_before_lrn1(config)

    def own_maps(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 to pool2, which see only this tower's maps: (N, C, 227|224, ..) -> (N, 128, 13, 13)."""
        x = self.conv2_maps(self.lrn1(self.conv1_maps(x)))  # (N, 128, 27, 27)
        return self.pool2_maps(self.lrn2(x))  # (N, 128, 13, 13)

    def conv1_maps(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 (and its ReLU, where it comes before LRN1), what LRN1 reads: (N, C, 227|224, ..) -> (N, 48, 55, 55)."""
        x = F.pad(x, (0, self.conv1_pad, 0, self.conv1_pad))  # C2: zeros past the right/bottom edge
        x = self.conv1(x)  # (N, 48, 55, 55)
        return self.act(x) if self.relu_before_lrn1 else x

    def conv2_maps(self, x: torch.Tensor) -> torch.Tensor:
        """pool1 (then conv1's ReLU in K12's order), conv2 and its ReLU, between LRN1 and LRN2:
        (N, 48, 55, 55) -> (N, 128, 27, 27)."""
        x = self.pool1(x)  # (N, 48, 27, 27)
        x = x if self.relu_before_lrn1 else self.act(x)
        return self.act(self.conv2(x))  # (N, 128, 27, 27)

    def pool2_maps(self, x: torch.Tensor) -> torch.Tensor:
        """K12's spatial norm (where on) and pool2, after LRN2: (N, 128, 27, 27) -> (N, 128, 13, 13)."""
        return self.pool2(self.norm2(x))

    def upper_maps(self, x: torch.Tensor) -> torch.Tensor:
        """conv3 (fed by both towers) to pool5: (N, 256, 13, 13) -> (N, 4608)."""
        x = self.act(self.conv3(x))  # (N, 192, 13, 13)
        x = self.act(self.conv4(x))  # (N, 192, 13, 13)
        return self.pool5(self.act(self.conv5(x))).flatten(1)  # (N, 128, 6, 6) -> (N, 4608)

    def fc(self, layer: nn.Linear, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """fc6 or fc7 of this tower, fed by both towers: ReLU, then dropout (P 4.2) with `mask`."""
        return self.drop(self.act(layer(x)), mask)

    def dropout_masks(self, generator: torch.Generator, rows: slice, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This tower's fc6 and fc7 masks for rows `rows` of a global batch of `total` (`layers.dropout_masks`)."""
        features = (self.fc6.out_features, self.fc7.out_features)
        return dropout_masks(self.drop.p, features, generator, rows, total)


class AlexNet2GPU(nn.Module):
    """The two-tower network: tower A on `devices[0]`, tower B on `devices[1]`.

    Parameters are created on their device, so the model also builds on fake devices. The initial
    weights are drawn on the CPU and copied there: a function of the seed alone, the same in every
    placement (drawn on the devices, two GPUs seeded alike would give tower B a copy of tower A's).
    `devices=("cpu", "cpu")` or `("cuda:0", "cuda:0")` puts both towers on one device.
    """

    def __init__(self, config: AlexNetConfig | None = None, devices: Sequence[Device] = ("cuda:0", "cuda:1")) -> None:
        super().__init__()
        self.config = config or AlexNetConfig()
        if self.config.towers != 2:
            raise ValueError("AlexNet2GPU needs AlexNetConfig.towers=2; build a one-tower net with AlexNetFused")
        if len(devices) != 2:
            raise ValueError(f"AlexNet2GPU takes two devices, one per tower; got {list(devices)}")
        with torch.random.fork_rng(devices=[]):  # the layers' own init draws leave the CPU generator as it was
            self.tower_a = Tower(self.config, 0, torch.device(devices[0]))
            self.tower_b = Tower(self.config, 1, torch.device(devices[1]))
        init_weights(self, self.config.init)  # drawn on the CPU, copied to each tower's device

    @property
    def devices(self) -> tuple[torch.device, torch.device]:
        return self.tower_a.conv1.weight.device, self.tower_b.conv1.weight.device

    def forward(self, x: torch.Tensor, masks: Masks | None = None) -> torch.Tensor:
        """Logits (N, num_classes) on tower A's device. `masks`: each tower's fc6 and fc7 dropout
        masks ((A's fc6, A's fc7), (B's fc6, B's fc7)), on its device; drawn here when None."""
        ta, tb = self.tower_a, self.tower_b
        a, b = self.hidden(x, masks)  # (N, 2048) per tower
        dev_a = a.device
        if tb.fc8 is None:  # one fc8 on tower A (C2): only tower B's half moves
            return ta.fc8(join(a, b, dev_a))
        a, b = exchange(a, b)  # fc8 reads both: (N, 4096)
        return join(ta.fc8(a), tb.fc8(b), dev_a)  # (N, 500 + 500) gathered on device 0

    def hidden(self, x: torch.Tensor, masks: Masks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each tower's fc7 activations (after ReLU and dropout), on its device: (N, 2048) each."""
        check_input(x, self.config)
        ta, tb = self.tower_a, self.tower_b
        (ma6, ma7), (mb6, mb7) = masks or ((None, None), (None, None))
        dev_a, dev_b = self.devices
        x_a = x.to(dev_a)
        x_b = x_a if dev_b == dev_a else x.to(dev_b)  # the batch goes to each device once
        if self.config.lrn_across:  # CF: LRN1 and LRN2 read the other tower's 2 edge channels
            a, b = lrn_across(ta.lrn1, tb.lrn1, ta.conv1_maps(x_a), tb.conv1_maps(x_b))  # (N, 48, 55, 55) per tower
            a, b = lrn_across(ta.lrn2, tb.lrn2, ta.conv2_maps(a), tb.conv2_maps(b))  # (N, 128, 27, 27) per tower
            a, b = ta.pool2_maps(a), tb.pool2_maps(b)  # (N, 128, 13, 13)
        else:
            a, b = ta.own_maps(x_a), tb.own_maps(x_b)
        a, b = exchange(a, b)  # conv3 reads both towers: (N, 256, 13, 13) on each device
        a, b = exchange(ta.upper_maps(a), tb.upper_maps(b))  # fc6 reads both: (N, 9216)
        a, b = exchange(ta.fc(ta.fc6, a, ma6), tb.fc(tb.fc6, b, mb6))  # fc7 reads both: (N, 4096)
        return ta.fc(ta.fc7, a, ma7), tb.fc(tb.fc7, b, mb7)  # (N, 2048) per tower

    @classmethod
    def from_fused(cls, fused: AlexNetFused, devices: Sequence[Device] = ("cuda:0", "cuda:1")) -> AlexNet2GPU:
        """The towers holding exactly the fused model's weights."""
        model = cls(fused.config, devices)
        model.load_state_dict(fused_to_towers(fused.state_dict(), fused.config))
        return model


class AlexNetFused(nn.Module):
    """The same network as one module (Caffe's layout): grouped conv2, conv4, conv5 and LRN per
    group; tower A's channels come first in every layer. With `towers=1` it is a one-tower net."""

    def __init__(self, config: AlexNetConfig | None = None, device: Device | None = None) -> None:
        super().__init__()
        self.config = c = config or AlexNetConfig()
        g = c.towers
        c1, c2, c3, c4, c5 = c.conv_channels
        f6, f7 = c.fc_features
        pool5 = c.map_sizes[-1]  # 6 (P), 5 unpadded
        with torch.random.fork_rng(devices=[]):  # the layers' own init draws leave the CPU generator as it was
            self.conv1 = nn.Conv2d(c.in_channels, c1, 11, stride=4, device=device)
            self.conv2 = nn.Conv2d(c1, c2, 5, padding=2, groups=g, device=device)
            self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, device=device)
            self.conv4 = nn.Conv2d(c3, c4, 3, padding=1, groups=g, device=device)
            self.conv5 = nn.Conv2d(c4, c5, 3, padding=1, groups=g, device=device)
            self.fc6 = nn.Linear(c5 * pool5 * pool5, f6, device=device)
            self.fc7 = nn.Linear(f6, f7, device=device)
            self.fc_hidden = nn.Linear(f7, c.fc_hidden, device=device) if c.fc_hidden else None  # the seed's
            self.fc8 = nn.Linear(c.fc_hidden or f7, c.num_classes, device=device)
        lrn_groups = 1 if c.lrn_scope == "all" else g  # per group: the towers' LRN windows; "all": Caffe's
        self.lrn1, self.lrn2 = _lrn(c, lrn_groups), _lrn(c, lrn_groups)
        self.norm2 = _spatial_norm(c)  # within each map: the same on the fused channels as per tower
        self.pool1, self.pool2, self.pool5 = _pool(c), _pool(c), _pool(c)
        self.act = activation(c.activation)
        self.drop = Dropout(c.dropout, c.dropout_scale)
        init_weights(self, self.config.init)  # drawn on the CPU, as the towers'

    def forward(self, x: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (N, num_classes). `masks`: fc6's and fc7's dropout masks (N, 4096), tower A's
        features first; drawn here when None."""
        x = self.hidden(x, masks)  # (N, 4096)
        if self.fc_hidden is not None:  # the seed's extra layer: ReLU, no dropout
            x = self.act(self.fc_hidden(x))  # (N, 1000)
        return self.fc8(x)  # (N, num_classes)

    def hidden(self, x: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """fc7's activations (after ReLU and dropout): (N, 4096), tower A's features first."""
        check_input(x, self.config)
        m6, m7 = masks or (None, None)
        pad = self.config.conv1_pad
        x = F.pad(x.to(self.conv1.weight.device), (0, pad, 0, pad))
        x = self.conv1(x)  # (N, 96, 55, 55)
        if _relu_before_lrn1(self.config):  # P's text: conv1 -> ReLU -> LRN1 -> pool1
            x = self.pool1(self.lrn1(self.act(x)))  # (N, 96, 27, 27)
        else:  # K12: conv1 -> LRN1 -> pool1 -> ReLU
            x = self.act(self.pool1(self.lrn1(x)))  # (N, 96, 27, 27)
        x = self.pool2(self.norm2(self.lrn2(self.act(self.conv2(x)))))  # (N, 256, 13, 13)
        x = self.act(self.conv3(x))  # (N, 384, 13, 13)
        x = self.act(self.conv4(x))  # (N, 384, 13, 13)
        x = self.pool5(self.act(self.conv5(x))).flatten(1)  # (N, 256, 6, 6) -> (N, 9216)
        x = self.drop(self.act(self.fc6(x)), m6)  # (N, 4096)
        return self.drop(self.act(self.fc7(x)), m7)  # (N, 4096)

    @classmethod
    def from_towers(cls, model: AlexNet2GPU, device: Device | None = None) -> AlexNetFused:
        """The fused model holding exactly the towers' weights (on `device`, else tower A's)."""
        fused = cls(model.config, device=device or model.devices[0])
        fused.load_state_dict(towers_to_fused(model.state_dict()))
        return fused


# The one mapping between the layouts: every fused parameter is tower A's rows then tower B's,
# along the output dimension (dim 0), in conv1 to fc8 alike; conv3 and fc6 to fc8 already read
# both towers in the fused (A first) order.


def towers_to_fused(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tower_a.conv1.weight` + `tower_b.conv1.weight` -> `conv1.weight`, on tower A's device."""
    fused = {}
    for key, a in state.items():
        if key.startswith(TOWERS[0] + "."):
            name = key.removeprefix(TOWERS[0] + ".")
            b = state.get(f"{TOWERS[1]}.{name}")
            fused[name] = a if b is None else torch.cat([a, b.to(a.device)])
    return fused


def fused_to_towers(state: Mapping[str, torch.Tensor], config: AlexNetConfig) -> dict[str, torch.Tensor]:
    """The inverse of `towers_to_fused`."""
    towers = {}
    for key, value in state.items():
        layer = key.split(".")[0]
        if layer not in LAYERS:
            raise KeyError(f"unexpected fused parameter {key!r}")
        sizes = config.fc8_out if layer == "fc8" else (value.shape[0] // 2, value.shape[0] // 2)
        for tower, part in zip(TOWERS, value.split(sizes), strict=True):
            if part.shape[0]:
                towers[f"{tower}.{key}"] = part
    return towers


def build_model(config: AlexNetConfig, devices: tuple[torch.device, torch.device]) -> nn.Module:
    """The two towers on `devices`, or a one-tower net (towers=1) on the first device."""
    if config.towers == 2:
        return AlexNet2GPU(config, devices)
    return AlexNetFused(config, device=devices[0])
