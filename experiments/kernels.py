"""Experiment 5: the conv1 kernels of each tower (the paper's Figure 3). P saw tower A's kernels
turn colour-agnostic and tower B's colour-specific. Measured here per tower: how colourful the
kernels are (the share of each kernel's variance across its RGB channels; 0 for grayscale input)
and how much of their energy is at high spatial frequency.

    python experiments/kernels.py --size cpu     # on Fashion-MNIST: one channel, so only frequency
"""

from __future__ import annotations

import runner
import torch

from alexnet2gpu.analysis.plot import plot_kernels
from alexnet2gpu.train import checkpoint as ckpt


def measures(weight: torch.Tensor) -> tuple[float, float]:
    """(colourfulness, high-frequency energy share), averaged over the tower's kernels."""
    w = weight.float()  # (K, C, 11, 11)
    colour = (w - w.mean(1, keepdim=True)).pow(2).sum((1, 2, 3)) / w.pow(2).sum((1, 2, 3)).clamp_min(1e-12)
    spectrum = torch.fft.fftshift(torch.fft.fft2(w - w.mean((2, 3), keepdim=True)).abs().pow(2).sum(1), dim=(-2, -1))
    yy, xx = torch.meshgrid(torch.arange(11) - 5, torch.arange(11) - 5, indexing="ij")
    high = (yy.abs() + xx.abs() > 4).float()  # outside the low-frequency diamond
    share = (spectrum * high).sum((1, 2)) / spectrum.sum((1, 2)).clamp_min(1e-12)
    return colour.mean().item(), share.mean().item()


def main() -> None:
    args = runner.parse(__doc__.splitlines()[0])
    r = runner.run("kernels", args, runner.BASE_MODEL, runner.BASE_DATA, runner.BASE_TRAIN)
    state = ckpt.load(r["dir"] / "last.pt")["model"]
    figure = plot_kernels(state, r["dir"] / "conv1_kernels.png", "conv1 kernels after training (P Figure 3)")
    lines = ["| tower | colourfulness | high-frequency share |", "|---|---|---|"]
    for tower in ("tower_a", "tower_b"):
        colour, high = measures(state[f"{tower}.conv1.weight"])
        lines.append(f"| {tower} | {colour:.3f} | {high:.3f} |")
    runner.record(args, "Experiment 5: conv1 kernels of each tower", runner.command_line(), lines, figure)


if __name__ == "__main__":
    main()
