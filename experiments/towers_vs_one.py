"""Experiment 2: two towers against the paper's one-GPU comparison net (P 3.2, footnote 2: half the
kernels in conv1-conv4, the full conv5 and fc layers), same data, steps and recipe.

    python experiments/towers_vs_one.py --size cpu
"""

from __future__ import annotations

import runner

from alexnet2gpu.config import AlexNetConfig


def main() -> None:
    args = runner.parse(__doc__.splitlines()[0])
    two = runner.run("two-towers", args, runner.BASE_MODEL, runner.BASE_DATA, runner.BASE_TRAIN)
    one_config = AlexNetConfig.one_gpu(num_classes=10, in_channels=1, init="he")
    one = runner.run("one-gpu-net", args, one_config, runner.BASE_DATA, runner.BASE_TRAIN)
    lines = [
        *runner.TABLE_HEAD,
        runner.errors_line("two towers (P's net)", two),
        runner.errors_line("one-GPU comparison net", one),
        "",
        "P reports the two-tower net 1.7% (top-1) and 1.2% (top-5) better on ImageNet.",
    ]
    runner.record(args, "Experiment 2: two towers against one", runner.command_line(), lines)


if __name__ == "__main__":
    main()
