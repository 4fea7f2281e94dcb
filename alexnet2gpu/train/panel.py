"""TensorBoard's top-5 panel: fixed validation images and the network's five best guesses, drawn at
each epoch end (the left half of P Figure 4). The drawing is shared with `analysis.figures`."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from alexnet2gpu.data.base import Categories
from alexnet2gpu.data.sampling import labels_of, load_images, spread
from alexnet2gpu.train.evaluate import top_classes

if TYPE_CHECKING:
    from alexnet2gpu.train.loop import Run

PANEL_IMAGES = 4  # validation images whose top 5 TensorBoard shows at each epoch end
CORRECT, OTHER = "tab:red", "tab:blue"  # the true class's bar and caption, the other guesses'


def panel_images(val_set, writer: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fixed validation images (spread over the classes) of TensorBoard's top-5 panel, on every
    process (the towers may live in two); None, with a warning from the writer, if they cannot be read."""
    try:
        return load_images(val_set, spread(labels_of(val_set), PANEL_IMAGES))
    except Exception as error:  # noqa: BLE001 - a figure never stops a run
        if writer:
            tqdm.write(f"warning: no top-5 panel in TensorBoard: {type(error).__name__}: {error}", file=sys.stderr)
        return None


def log_predictions(run: Run) -> None:
    """TensorBoard's top-5 panel of the fixed validation images (Figure 4's left half), so that a user
    watches the predictions change epoch by epoch. Every process runs the network; the writer draws.
    An error is a warning, never the end of the run."""
    images, labels = run.panel
    try:
        probs, classes = top_classes(run.runner, run.val_pipe, images)
        if run.log is not None and run.log.writer is not None:
            categories = run.categories or Categories.numbered(run.configs["model"].num_classes)
            title = f"epoch {run.state.epoch + 1}, step {run.state.step}"
            fig = top5_figure(images.cpu(), labels, probs, classes, categories, title)
            run.log.writer.add_figure("val/top5", fig, run.state.step)  # closes the figure
    except Exception as error:  # noqa: BLE001 - a figure never stops a run
        if run.placement.writer:
            tqdm.write(f"warning: the top-5 panel was not drawn: {type(error).__name__}: {error}", file=sys.stderr)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files and TensorBoard only, never a window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def show_image(ax, image: torch.Tensor) -> None:
    """A stored uint8 image (C, H, W): grayscale for one channel."""
    pixels = image.permute(1, 2, 0).numpy()
    if pixels.shape[-1] == 1:
        ax.imshow(pixels[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(pixels)
    ax.set_xticks([])
    ax.set_yticks([])


def bars(ax, probs: torch.Tensor, classes: torch.Tensor, label: int, categories: Categories) -> None:
    """One image's top-5 as horizontal bars, most probable on top; the correct class's bar red."""
    k = len(classes)
    colours = [CORRECT if int(c) == label else OTHER for c in classes]
    ax.barh(range(k), probs.tolist(), color=colours, height=0.75)
    ax.set_yticks(range(k), [categories.short(int(c)) for c in classes], fontsize=7)
    for tick, colour in zip(ax.get_yticklabels(), colours, strict=True):
        tick.set_color(colour)
    ax.set_xlim(0, 1)
    ax.set_ylim(k - 0.5, -0.5)
    ax.tick_params(axis="x", labelsize=6)
    ax.spines[["top", "right"]].set_visible(False)


def draw_top5(axes_pairs, images, labels, probs, classes, categories: Categories) -> None:
    """Each image above its top-5 bars: the correct class under the image, and a note when it is not in the top 5."""
    for (image_ax, bars_ax), image, label, p, c in zip(axes_pairs, images, labels, probs, classes, strict=True):
        label = int(label)
        show_image(image_ax, image)
        image_ax.set_title(categories.short(label), fontsize=8)
        bars(bars_ax, p, c, label, categories)
        if label not in c.tolist():
            bars_ax.set_xlabel(f"{categories.short(label)}: not in the top {len(c)}", fontsize=7, color=CORRECT)


def top5_figure(images, labels, probs, classes, categories: Categories, title: str = ""):
    """A row of images with their top-5 bars (TensorBoard's panel at each epoch end)."""
    plt = pyplot()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.3 * n, 4.2), squeeze=False, gridspec_kw={"height_ratios": [1.2, 1]})
    draw_top5(list(zip(axes[0], axes[1], strict=True)), images, labels, probs, classes, categories)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
