"""Figures of a run, as PNG files in the run directory:

curves.png        training loss and error by step, validation loss and errors by epoch
conv1_kernels.png the conv1 kernels of each tower, 48 per tower (the paper's Figure 3)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from alexnet2gpu.files import atomic_write
from alexnet2gpu.model.alexnet import TOWERS
from alexnet2gpu.train.checkpoint import CheckpointError
from alexnet2gpu.train.logs import read_csv
from alexnet2gpu.train.panel import pyplot

CONV1_KEYS = ("tower_a.conv1.weight", "conv1.weight")  # two towers, one tower


def read_log(path: Path, columns: tuple[str, ...]) -> list[dict[str, float]]:
    """A run's CSV log ([] when absent), or one line naming the file and what it lacks."""
    if not path.exists():
        return []
    try:
        rows = read_csv(path)
    except ValueError as error:  # a cell that is not a number
        raise ValueError(f"{path} holds a cell that is not a number ({error}); repair or remove its row") from None
    except TypeError:  # csv gives None (or a list) for the cells of a row that is too short (or too long)
        raise ValueError(f"{path} holds a row with too few or too many cells; repair or remove it") from None
    missing = [column for column in columns if rows and column not in rows[0]]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}: is it a log that `train` wrote?")
    return rows


def plot_curves(run_dir: Path) -> Path:
    plt = pyplot()
    train = read_log(run_dir / "train.csv", ("step", "loss", "top1_err"))
    val = read_log(run_dir / "val.csv", ("step", "loss", "top1_err", "top5_err"))
    if not train and not val:
        raise FileNotFoundError(f"{run_dir} has no train.csv or val.csv: is it a run directory?")
    fig, (loss_ax, err_ax) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (running mean in epoch)")
        err_ax.plot([r["step"] for r in train], [100 * r["top1_err"] for r in train], label="train top-1")
    if val:
        steps = [r["step"] for r in val]
        loss_ax.plot(steps, [r["loss"] for r in val], "o-", label="validation")
        err_ax.plot(steps, [100 * r["top1_err"] for r in val], "o-", label="validation top-1")
        err_ax.plot(steps, [100 * r["top5_err"] for r in val], "s--", label="validation top-5")
    loss_ax.set(xlabel="step", ylabel="cross-entropy", title="loss")
    err_ax.set(xlabel="step", ylabel="error (%)", title="error", ylim=(0, 100))
    for ax in (loss_ax, err_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = run_dir / "curves.png"
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def kernel_grid(weight: torch.Tensor, columns: int = 8) -> torch.Tensor:
    """(K, C, h, w) kernels -> one image (rows * (h + 1), columns * (w + 1), C), each kernel
    scaled to [0, 1] on its own so that its pattern shows."""
    k, c, h, w = weight.shape
    rows = -(-k // columns)
    flat = weight.flatten(1)
    lo, hi = flat.min(1).values[:, None, None, None], flat.max(1).values[:, None, None, None]
    scaled = (weight - lo) / (hi - lo).clamp_min(1e-12)
    grid = torch.ones(rows * (h + 1), columns * (w + 1), c)
    for i in range(k):
        r, col = divmod(i, columns)
        grid[r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = scaled[i].permute(1, 2, 0)
    return grid


def plot_kernels(state: dict, path: Path, title: str = "") -> Path:
    """conv1 of tower A beside tower B (one-tower nets: its conv1 alone)."""
    plt = pyplot()
    if f"{TOWERS[0]}.conv1.weight" in state:
        panels = [
            ("tower A (device 0)", state[f"{TOWERS[0]}.conv1.weight"]),
            ("tower B (device 1)", state[f"{TOWERS[1]}.conv1.weight"]),
        ]
    else:
        panels = [("conv1", state["conv1.weight"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.8), squeeze=False)
    for ax, (name, weight) in zip(axes[0], panels, strict=True):
        grid = kernel_grid(weight.float().cpu()).numpy()
        ax.imshow(
            grid.squeeze(-1) if grid.shape[-1] == 1 else grid,
            cmap="gray" if grid.shape[-1] == 1 else None,
            interpolation="nearest",
        )
        ax.set_title(f"{name}: {weight.shape[0]} kernels {weight.shape[2]}x{weight.shape[3]}x{weight.shape[1]}")
        ax.axis("off")
    fig.suptitle(title or "conv1 kernels (P Figure 3)")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path) -> list[Path]:
    """The curves (from the CSV files) and the kernels (from last.pt), whichever the run has."""
    from alexnet2gpu.train import checkpoint as ckpt

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}")
    has_csv = (run_dir / "train.csv").exists() or (run_dir / "val.csv").exists()
    has_checkpoint = os.path.lexists(run_dir / "last.pt")  # a broken link is named by `load`, not skipped
    if not has_csv and not has_checkpoint:
        raise FileNotFoundError(f"{run_dir} has no train.csv, val.csv or last.pt: is it a run directory?")
    paths = [plot_curves(run_dir)] if has_csv else []
    if has_checkpoint:
        saved = ckpt.load(run_dir / "last.pt")
        if not any(key in saved["model"] for key in CONV1_KEYS):
            raise CheckpointError(f"{run_dir / 'last.pt'} holds no conv1 weights ({' or '.join(CONV1_KEYS)})")
        paths.append(
            plot_kernels(saved["model"], run_dir / "conv1_kernels.png", f"conv1 kernels, step {saved['step']}")
        )
    return paths
