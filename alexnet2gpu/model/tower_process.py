"""One tower per process: tower A or B of AlexNet2GPU, the exchanges as all-gathers over the pair."""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from alexnet2gpu.config import AlexNetConfig
from alexnet2gpu.model.alexnet import TOWERS, Tower, check_input
from alexnet2gpu.model.layers import halo_widths

# all_gather_single_autograd replaces all_gather_tensor_autograd in newer torch; both are differentiable
_all_gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


class TowerProcess(nn.Module):
    """Tower `index` of AlexNet2GPU; the other tower lives in the other rank of `group`."""

    def __init__(self, config: AlexNetConfig, index: int, group, device: torch.device | str | None = None) -> None:
        super().__init__()
        if config.towers != 2 or (config.fc8_split and config.num_classes % 2):
            raise ValueError("tower processes need two towers, and an even num_classes where fc8 is split")
        self.config, self.index, self.group = config, index, group
        self.tower = Tower(config, index, torch.device(device) if device is not None else None)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Both towers' activations, tower A's first: the exchange, as one all-gather each way."""
        both = _all_gather(x.contiguous(), gather_dim=0, group=self.group)  # (2N, ...): A's rows, then B's
        return torch.cat(both.chunk(2), dim=1)  # (N, 2C, ...)

    def lrn_across(self, lrn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """This tower's maps normalised as one LRN over both towers' channels would (`layers.lrn_across`):
        the halo is one all-gather of each tower's edge channels (A's last, B's first; 2 each for size 5)."""
        to_a, to_b = halo_widths(lrn.size)
        h, c = max(to_a, to_b), x.shape[1]
        edge = x[:, c - h :] if self.index == 0 else x[:, :h]  # (N, h, H, W)
        both = _all_gather(edge.contiguous(), gather_dim=0, group=self.group).chunk(2)  # A's tail, B's head
        if self.index == 0:
            return lrn(torch.cat([x, both[1][:, :to_a]], dim=1))[:, :c]
        return lrn(torch.cat([both[0][:, h - to_b :], x], dim=1))[:, to_b:]

    def forward(self, x: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (N, num_classes), the same on both ranks of the pair. `masks`: this tower's fc6 and
        fc7 dropout masks (`Tower.dropout_masks`); drawn here when None."""
        check_input(x, self.config)
        t = self.tower
        m6, m7 = masks or (None, None)
        if self.config.lrn_across:  # CF: LRN1 and LRN2 read the other tower's edge channels
            x = self.lrn_across(t.lrn1, t.conv1_maps(x))  # (N, 48, 55, 55)
            x = t.pool2_maps(self.lrn_across(t.lrn2, t.conv2_maps(x)))  # (N, 128, 13, 13)
        else:
            x = t.own_maps(x)  # (N, 128, 13, 13)
        a = self.gather(x)  # conv3 reads both towers: (N, 256, 13, 13)
        a = self.gather(t.upper_maps(a))  # fc6: (N, 9216)
        a = self.gather(t.fc(t.fc6, a, m6))  # fc7: (N, 4096)
        a = self.gather(t.fc(t.fc7, a, m7))  # fc8: (N, 4096)
        if self.config.fc8_split:
            return self.gather(t.fc8(a))  # (N, 500 + 500)
        if t.fc8 is not None:
            return self.from_tower_a(t.fc8(a))
        # tower B's zeros hang on its graph (a sum of nothing: 0 even where `a` is not finite), so that its
        # backward runs the same collectives as tower A's, in the same order
        return self.from_tower_a(a.new_zeros(len(a), self.config.num_classes) + a[:, :0].sum())

    def from_tower_a(self, x: torch.Tensor) -> torch.Tensor:
        """Tower A's x on both ranks (one fc8 on tower A, K12's and C2's): an all-gather in which tower B
        sends zeros of x's shape. Its backward sums both ranks' gradients into tower A's x, as `gather`'s."""
        both = _all_gather(x.contiguous(), gather_dim=0, group=self.group)  # (2N, classes): A's rows, then B's
        return both[: len(x)].clone()  # (N, classes); a slice would stay the collective's lazy wrapper

    def load_from_towers(self, state: dict[str, torch.Tensor]) -> None:
        """Take this tower's weights from an AlexNet2GPU state dict."""
        prefix = TOWERS[self.index] + "."
        self.tower.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})


def replicated_loss(logits: torch.Tensor, labels: torch.Tensor, towers: int = 2) -> torch.Tensor:
    """Both ranks of a pair hold the same logits and loss, and the all-gathers' backward sums what
    both send back: divided by the tower count, the gradient is the single-process one."""
    return F.cross_entropy(logits, labels) / towers
