"""Experiment 3: ReLU against tanh, as the paper's Figure 1 (there CIFAR-10 and a four-layer net;
here the two-tower AlexNet on Fashion-MNIST): training error against images seen, and the first
point where each reaches 25% training error.

    python experiments/relu_vs_tanh.py --size cpu
"""

from __future__ import annotations

from dataclasses import replace

import runner


def first_below(curve: list[dict], level: float, batch: int) -> str:
    for row in curve:
        if row["top1_err"] <= level:  # the running mean of the epoch
            return f"reached after {int(row['step']) * batch:,} training images"
    return f"not reached in {int(curve[-1]['step']) * batch:,} training images" if curve else "no steps run"


def interval_errors(curve: list[dict], batch: int) -> tuple[list[float], list[float]]:
    """Training error within each logging interval, from train.csv's running means per epoch."""
    seen, errors, prev_images, prev_wrong = [], [], 0, 0.0
    for row in curve:
        images = int(row["step"]) * batch
        if images <= prev_images:  # a new epoch restarts the running mean
            prev_images, prev_wrong = 0, 0.0
        wrong = row["top1_err"] * images
        seen.append(images)
        errors.append(100 * (wrong - prev_wrong) / (images - prev_images))
        prev_images, prev_wrong = images, wrong
    return seen, errors


def plot(runs: dict, batch: int, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for act, style in (("relu", "-"), ("tanh", "--")):
        ax.plot(*interval_errors(runs[act]["curve"], batch), style, label=act)
    ax.axhline(25, color="grey", lw=0.8)
    ax.set(
        xlabel="training images seen",
        ylabel="training error in each logging interval (%)",
        ylim=(0, 100),
        title="ReLU against tanh (P Figure 1)",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    args = runner.parse(__doc__.splitlines()[0])
    runs = {
        act: runner.run(act, args, replace(runner.BASE_MODEL, activation=act), runner.BASE_DATA, runner.BASE_TRAIN)
        for act in ("relu", "tanh")
    }
    figure = plot(runs, runner.BASE_TRAIN.batch_size, runs["relu"]["dir"].parent / "relu_vs_tanh.png")
    batch = runner.BASE_TRAIN.batch_size
    lines = [
        *runner.TABLE_HEAD,
        *(runner.errors_line(act, runs[act]) for act in runs),
        "",
        *(f"- {act}: 25% training error {first_below(runs[act]['curve'], 0.25, batch)}" for act in runs),
    ]
    runner.record(args, "Experiment 3: ReLU against tanh", runner.command_line(), lines, figure)


if __name__ == "__main__":
    main()
