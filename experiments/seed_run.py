"""Experiment 1: the seed's run, the seed's own network beside the faithful two towers.

The seed's one-tower network (`AlexNetConfig.seed_mnist`: no LRN, 54x54 conv1, a 1000-unit layer
before the logits, PyTorch's default init) with the seed's recipe (batch 60, inputs normalised then
resized to 224) beside the faithful two-tower AlexNet on the same data and budget (He init); the
two towers with the paper's recipe (mean image, random crops, PCA noise, batch 128, N(0, 0.01)
init) and with the paper's pipeline at unit input scale and He init; test error with the centre
crop and with ten crops.

The seed names batch 60 and 30 epochs but no optimiser: every run uses the base recipe's SGD
(runner.BASE_TRAIN: the paper's update, lr 0.01, momentum 0.9, weight decay 5e-4).

    python experiments/seed_run.py --size cpu   # minutes on 2 cores
    python experiments/seed_run.py --size gpu   # 30 epochs on the whole set (goal: >= 93% accuracy)
"""

from __future__ import annotations

from dataclasses import replace

import runner

from alexnet2gpu.analysis.plot import plot_curves
from alexnet2gpu.config import AlexNetConfig


def main() -> None:
    args = runner.parse(__doc__.splitlines()[0])
    seed_train = replace(runner.BASE_TRAIN, batch_size=60)
    seed_net = runner.run("seed-network", args, AlexNetConfig.seed_mnist(), runner.BASE_DATA, seed_train)
    seed = runner.run("seed-recipe", args, runner.BASE_MODEL, runner.BASE_DATA, seed_train)
    paper_he = runner.run(
        "paper-pipeline-he",
        args,
        runner.BASE_MODEL,
        runner.paper_preset(runner.BASE_DATA),
        replace(runner.BASE_TRAIN, batch_size=128),
    )
    paper = runner.run(
        "paper-recipe",
        args,
        replace(runner.BASE_MODEL, init="paper"),
        replace(runner.BASE_DATA, preset="paper"),
        replace(runner.BASE_TRAIN, batch_size=128),
    )
    lines = [
        *runner.TABLE_HEAD,
        runner.errors_line("seed's network, seed recipe (batch 60, PyTorch init, whole image)", seed_net),
        runner.errors_line("two towers, seed recipe (batch 60, He init, whole image)", seed),
        runner.errors_line("paper pipeline at unit scale, He init, batch 128", paper_he),
        runner.errors_line("paper recipe (0-255 pixels, N(0, 0.01) init, batch 128)", paper),
        "",
        "| variant | centre crop top-1 | ten-crop top-1 | test images |",
        "|---|---|---|---|",
    ]
    for name, r in (("paper pipeline, He init", paper_he), ("paper recipe", paper)):
        crops = runner.ten_crop_error(r["dir"], args)
        lines.append(
            f"| {name} | {100 * crops['centre']['top1_err']:.1f}% | {100 * crops['ten-crop']['top1_err']:.1f}% "
            f"| {crops['centre']['images']} |"
        )
    lines.append("\nThe seed's pipeline resizes the whole image to 224 and has no crops, so no ten-crop figure.")
    figure = plot_curves(seed_net["dir"])
    runner.record(args, "Experiment 1: the seed's run", runner.command_line(), lines, figure)


if __name__ == "__main__":
    main()
