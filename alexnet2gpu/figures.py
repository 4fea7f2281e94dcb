"""What the network sees (P 6.1, Figure 4), for a checkpoint on its validation set:

figure4.png  left: eight validation images, each with its five most probable classes (the correct
             one's bar in red); right: five validation images, each beside the six training images
             whose fc7 vectors (`inference.features`) lie nearest in Euclidean distance.

The training set's fc7 vectors take one pass over it; they are cached beside the checkpoint
(float16, `last.pt.fc7-<key>.pt`), reused while the checkpoint, the dataset and the sample stay the
same. The same top-5 panel goes to TensorBoard at every epoch end of a run (`top5_figure`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from alexnet2gpu import checkpoint as ckpt
from alexnet2gpu.datasets import Categories, InMemory, batches, build_dataset, check_classes
from alexnet2gpu.inference import Trained, features, load_trained
from alexnet2gpu.plot import _pyplot
from alexnet2gpu.transforms import Pipeline

FIGURE_SEED = 0  # the images a figure shows: the same on every call, for every checkpoint of a run
CLASSIFIED, QUERIES, NEIGHBOURS = 8, 5, 6  # P Figure 4
NEIGHBOURS_FROM = 100_000  # default training images searched (ImageNet's 1.28 million: hours, a 10 GB cache)
CORRECT, OTHER = "tab:red", "tab:blue"


# ---------------------------------------------------------------------------------------------
# which images


def labels_of(dataset: Dataset) -> torch.Tensor:
    """Every image's label without reading an image (a Subset's, of the images it takes)."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    return dataset.labels


def spread(labels: torch.Tensor, n: int, seed: int = FIGURE_SEED) -> list[int]:
    """`n` image indices, a fixed seeded choice spread over the classes: the classes in a seeded
    order, one random image of each (round after round when `n` exceeds the classes)."""
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    classes = classes[torch.randperm(len(classes), generator=g)]
    members = {int(c): torch.nonzero(labels == c).flatten() for c in classes}
    members = {c: m[torch.randperm(len(m), generator=g)].tolist() for c, m in members.items()}
    chosen: list[int] = []
    for round_ in range(max(len(m) for m in members.values()) if members else 0):
        for c in classes.tolist():
            if round_ < len(members[c]):
                chosen.append(members[c][round_])
                if len(chosen) == n:
                    return chosen
    return chosen


def load_images(dataset: Dataset, indices: list[int], workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored uint8 images (N, C, H, W) and labels of `indices`, in that order (an unreadable
    image is left out)."""
    if isinstance(dataset, Subset):  # one level of Subset, so that `batches` sees a staged set's decoder
        indices, dataset = [dataset.indices[i] for i in indices], dataset.dataset
    if isinstance(dataset, InMemory):
        rows = torch.as_tensor(indices, dtype=torch.long)
        return dataset.images[rows], dataset.labels[rows]
    parts = list(batches(Subset(dataset, indices), max(len(indices), 1), shuffle=False, workers=workers))
    images = torch.cat([images.cpu() for images, _ in parts]) if parts else torch.empty(0, dtype=torch.uint8)
    return images, torch.cat([labels for _, labels in parts]) if parts else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def top5(model: nn.Module, pipeline: Pipeline, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, classes), each (N, 5) on the CPU, most probable first: the softmax of the
    centre crop, as evaluate scores it."""
    model.eval()
    probs = F.softmax(model(pipeline(images)).float(), dim=1)  # (N, classes)
    top = probs.topk(min(5, probs.shape[1]), dim=1)
    return top.values.cpu(), top.indices.cpu()


# ---------------------------------------------------------------------------------------------
# the training set's fc7 vectors, cached beside the checkpoint


class _Numbered(Dataset):
    """A dataset whose label is the image's index, so that a batch says which images survived decoding."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return None if item is None else (item[0], index)


def sample(n_images: int, n: int | None, seed: int = FIGURE_SEED) -> torch.Tensor:
    """The indices searched for neighbours: all, or a fixed seeded sample of `n`, in file order."""
    if n is None or n >= n_images:
        return torch.arange(n_images)
    return torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def feature_batches(dataset: Dataset, indices: torch.Tensor, batch_size: int, workers: int):
    """(uint8 images, their dataset indices) over `indices`, in order."""
    if isinstance(dataset, InMemory):
        for rows in indices.split(batch_size):
            yield dataset.images[rows], rows
        return
    yield from batches(Subset(_Numbered(dataset), indices.tolist()), batch_size, shuffle=False, workers=workers)


def compute_features(
    model: nn.Module,
    pipeline: Pipeline,
    dataset: Dataset,
    indices: torch.Tensor,
    *,
    batch_size: int = 128,
    workers: int = 0,
    feature_fn: Callable = features,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fc7 of the images `indices` of `dataset`: (M, D) float16 on the CPU and the (M,) indices they
    belong to (M < len(indices) where images did not decode)."""
    rows, found = [], []
    with tqdm(total=len(indices), desc="fc7 of the training images", unit="img", disable=not progress) as bar:
        for images, which in feature_batches(dataset, indices, batch_size, workers):
            if len(which):
                rows.append(feature_fn(model, pipeline(images)).half().cpu())  # (n, D)
                found.append(which.cpu())
            bar.update(len(images))
    if not rows:
        raise ValueError(f"no training image of {getattr(dataset, 'name', 'the dataset')} could be read")
    return torch.cat(rows), torch.cat(found)


def cache_key(checkpoint: Path, step: int, dataset: str, data: str | None, n: int | None) -> dict:
    """What the cached vectors depend on: the checkpoint file (its size and time) and step, the dataset, the sample."""
    stat = checkpoint.stat()
    return {
        "checkpoint": [stat.st_size, stat.st_mtime_ns, step],
        "dataset": dataset,
        "data": str(Path(data).resolve()) if data else None,
        "images": n,
    }


def cache_path(checkpoint: Path, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return checkpoint.with_name(f"{checkpoint.name}.fc7-{digest}.pt")


def train_features(
    trained: Trained,
    dataset: Dataset,
    n: int | None = None,
    *,
    batch_size: int = 128,
    workers: int = 0,
    feature_fn: Callable = features,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fc7 vectors of the training set (or a fixed sample of `n` of it) and their image indices,
    from the cache beside the checkpoint when it was made for this checkpoint, dataset and sample;
    else computed and cached (written atomically, older caches of the checkpoint removed)."""
    _, data, _ = trained.configs
    indices = sample(len(dataset), n)
    key = cache_key(trained.path, trained.checkpoint.get("step", 0), data.dataset, data.data, len(indices))
    path = cache_path(trained.path, key)
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                return saved["features"], saved["indices"]
        except Exception:  # noqa: BLE001 - a torn or foreign file: computed again below
            pass
    found = compute_features(
        trained.model,
        trained.pipeline,
        dataset,
        indices,
        batch_size=batch_size,
        workers=workers,
        feature_fn=feature_fn,
        progress=progress,
    )
    for old in trained.path.parent.glob(f"{trained.path.name}.fc7-*.pt"):
        old.unlink(missing_ok=True)  # vectors of an earlier checkpoint or sample: stale
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save({"key": key, "features": found[0], "indices": found[1]}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return found


def nearest(queries: torch.Tensor, bank: torch.Tensor, k: int = NEIGHBOURS, chunk: int = 65_536):
    """(distances, rows), each (Q, k): the `k` rows of `bank` (M, D) nearest each query (Q, D) in
    Euclidean distance, nearest first. The bank is read in float32 chunks (it may be float16 and large)."""
    queries = queries.float().cpu()
    best_d = torch.full((len(queries), 0), float("inf"))
    best_i = torch.empty((len(queries), 0), dtype=torch.long)
    for start in range(0, len(bank), chunk):
        d = torch.cdist(queries, bank[start : start + chunk].float())  # (Q, chunk)
        d, i = torch.cat([best_d, d], 1), torch.cat([best_i, torch.arange(start, start + d.shape[1]).expand_as(d)], 1)
        keep = d.topk(min(k, d.shape[1]), dim=1, largest=False)  # sorted, nearest first
        best_d, best_i = keep.values, i.gather(1, keep.indices)
    return best_d, best_i


# ---------------------------------------------------------------------------------------------
# drawing


def _show(ax, image: torch.Tensor) -> None:
    """A stored uint8 image (C, H, W): grayscale for one channel."""
    pixels = image.permute(1, 2, 0).numpy()
    if pixels.shape[-1] == 1:
        ax.imshow(pixels[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(pixels)
    ax.set_xticks([])
    ax.set_yticks([])


def _strip(images: list[torch.Tensor], gap_after_first: int) -> tuple[torch.Tensor, list[float]]:
    """Stored uint8 images (C, H, W) of one size side by side on white, (H, W', 3), and each one's centre x."""
    c, h, w = images[0].shape
    gap = max(1, w // 16)
    strip = torch.full((h, len(images) * (w + gap) + gap_after_first, 3), 255, dtype=torch.uint8)
    centres, x = [], 0
    for i, image in enumerate(images):
        strip[:, x : x + w] = image.permute(1, 2, 0).expand(h, w, 3)  # grayscale: the one channel thrice
        centres.append(x + (w - 1) / 2)
        x += w + gap + (gap_after_first if i == 0 else 0)
    return strip[:, : x - gap], centres


def _bars(ax, probs: torch.Tensor, classes: torch.Tensor, label: int, categories: Categories) -> None:
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
        _show(image_ax, image)
        image_ax.set_title(categories.short(label), fontsize=8)
        _bars(bars_ax, p, c, label, categories)
        if label not in c.tolist():
            bars_ax.set_xlabel(f"{categories.short(label)}: not in the top {len(c)}", fontsize=7, color=CORRECT)


def top5_figure(images, labels, probs, classes, categories: Categories, title: str = ""):
    """A row of images with their top-5 bars (TensorBoard's panel at each epoch end)."""
    plt = _pyplot()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.3 * n, 4.2), squeeze=False, gridspec_kw={"height_ratios": [1.2, 1]})
    draw_top5(list(zip(axes[0], axes[1], strict=True)), images, labels, probs, classes, categories)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def draw_figure4(path: Path, classified: dict, queries: dict, categories: Categories, title: str) -> Path:
    """Write the figure: `classified` holds images, labels, probs, classes (top 5); `queries` holds
    images, labels, and per query the neighbours' images, labels and distances."""
    plt = _pyplot()
    fig = plt.figure(figsize=(20, 9.5))
    left, right = fig.add_gridspec(1, 2, width_ratios=[1, 1.05], wspace=0.12, left=0.06, right=0.99, top=0.9)
    columns = CLASSIFIED // 2
    grid = left.subgridspec(4, columns, height_ratios=[1.3, 0.9, 1.3, 0.9], hspace=0.3, wspace=0.55)
    pairs = [
        (
            fig.add_subplot(grid[2 * (i // columns), i % columns]),
            fig.add_subplot(grid[2 * (i // columns) + 1, i % columns]),
        )
        for i in range(len(classified["images"]))
    ]
    draw_top5(pairs, *(classified[k] for k in ("images", "labels", "probs", "classes")), categories)
    rows = right.subgridspec(QUERIES, 1, hspace=0.3)
    for r, (image, label, hood) in enumerate(
        zip(queries["images"], queries["labels"], queries["neighbours"], strict=True)
    ):
        ax = fig.add_subplot(rows[r, 0])  # one axes a row: a strip of images (an axes each would take seconds)
        strip, centres = _strip([image, *hood[0]], gap_after_first=image.shape[-1] // 3)
        ax.imshow(strip.numpy(), interpolation="nearest" if image.shape[-1] < 64 else "antialiased")
        ax.set_axis_off()
        captions = [(f"query: {categories.short(int(label))}", CORRECT)] + [
            (f"{categories.short(int(n))[:18]}\nd={float(d):.3g}", "black" if int(n) == int(label) else "dimgray")
            for n, d in zip(hood[1], hood[2], strict=True)
        ]
        for x, (caption, colour) in zip(centres, captions, strict=True):
            ax.text(x, -2, caption, ha="center", va="bottom", fontsize=7.5, color=colour, clip_on=False)
    fig.text(0.25, 0.95, "top-5 predictions (correct class in red)", ha="center", fontsize=11)
    fig.text(
        0.74, 0.95, f"query, then the {NEIGHBOURS} training images nearest in fc7 (Euclidean)", ha="center", fontsize=11
    )
    fig.suptitle(title, fontsize=12, y=0.995)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def figure4(
    run_dir: str | Path,
    *,
    neighbours_from: int | None = NEIGHBOURS_FROM,
    data: str | None = None,
    devices: str | None = None,
    batch_size: int = 128,
    workers: int = 0,
    feature_fn: Callable = features,
    progress: bool = True,
) -> Path:
    """RUN_DIR/figure4.png for RUN_DIR/last.pt on its validation set (P Figure 4): the network's
    top 5 for eight images, and the training images nearest five others in fc7. `data` replaces
    the dataset folder the run was trained on; `neighbours_from` caps the training images searched
    (a fixed sample; None: all)."""
    run_dir = Path(run_dir)
    trained = load_trained(run_dir / "last.pt", devices)
    model_config, data_config, _ = trained.configs
    folder = data or data_config.data
    sets = dict(stage_size=data_config.stage_size, strict=data_config.strict)
    val = build_dataset(data_config.dataset, "val", folder, **sets)
    train = build_dataset(data_config.dataset, "train", folder, **sets)
    for dataset in (val, train):
        check_classes(dataset, ckpt.categories(trained.checkpoint), model_config.num_classes, trained.path)
    chosen = spread(labels_of(val), CLASSIFIED + QUERIES)
    picked = chosen[CLASSIFIED:] + chosen  # a validation set of fewer than 13 images lends queries from the left
    images, labels = load_images(val, chosen[:CLASSIFIED], workers)
    probs, classes = top5(trained.model, trained.pipeline, images)
    classified = dict(images=images, labels=labels, probs=probs, classes=classes)

    bank, bank_indices = train_features(
        trained,
        train,
        neighbours_from,
        batch_size=batch_size,
        workers=workers,
        feature_fn=feature_fn,
        progress=progress,
    )
    q_images, q_labels = load_images(val, picked[:QUERIES], workers)
    distances, rows = nearest(feature_fn(trained.model, trained.pipeline(q_images)), bank)
    neighbours = []
    for d, r in zip(distances, rows, strict=True):
        n_images, n_labels = load_images(train, bank_indices[r].tolist(), workers)
        neighbours.append((n_images, n_labels, d[: len(n_images)]))
    queries = dict(images=q_images, labels=q_labels, neighbours=neighbours)
    searched = f"{len(bank):,} of {len(train):,}" if len(bank) < len(train) else f"all {len(bank):,}"
    step = trained.checkpoint.get("step", 0)
    title = (
        f"{run_dir.name}, step {step}: {data_config.dataset} validation images; neighbours among {searched} training"
    )
    return draw_figure4(run_dir / "figure4.png", classified, queries, trained.categories, title)
