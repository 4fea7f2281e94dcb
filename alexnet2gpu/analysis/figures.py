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
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from alexnet2gpu.analysis.inference import Trained, features, load_trained
from alexnet2gpu.data.base import Categories
from alexnet2gpu.data.datasets import InMemory, batches, check_classes, datasets_for
from alexnet2gpu.data.sampling import FIGURE_SEED, labels_of, load_images, spread, take
from alexnet2gpu.data.transforms import Pipeline
from alexnet2gpu.files import atomic_write, open_regular, shown
from alexnet2gpu.progress import progress_bar
from alexnet2gpu.train import checkpoint as ckpt
from alexnet2gpu.train.evaluate import top_classes
from alexnet2gpu.train.panel import CORRECT, draw_top5, pyplot

CLASSIFIED, QUERIES, NEIGHBOURS = 8, 5, 6  # P Figure 4
NEIGHBOURS_FROM = 100_000  # default training images searched (ImageNet's 1.28 million: hours, a 10 GB cache)


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
    with progress_bar(total=len(indices), desc="fc7 of the training images", unit="img", disable=not progress) as bar:
        for images, which in feature_batches(dataset, indices, batch_size, workers):
            if len(which):
                rows.append(feature_fn(model, pipeline(images)).half().cpu())  # (n, D)
                found.append(which.cpu())
            bar.update(len(images))
    if not rows:
        raise ValueError(f"no training image of {getattr(dataset, 'name', 'the dataset')} could be read")
    return torch.cat(rows), torch.cat(found)


def cache_key(
    checkpoint: Path, step: int, dataset: str, data: str | None, n: int | None, subset: int | None = None
) -> dict:
    """What the cached vectors depend on: the checkpoint file (its size and time) and step, the dataset,
    the run's training images (its --subset) and the sample of them."""
    stat = checkpoint.stat()
    return {
        "checkpoint": [stat.st_size, stat.st_mtime_ns, step],
        "dataset": dataset,
        "data": str(Path(data).resolve()) if data else None,
        "subset": subset,
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
    key = cache_key(trained.path, trained.checkpoint.get("step", 0), data.dataset, data.data, len(indices), data.subset)
    path = cache_path(trained.path, key)
    if path.exists():
        try:
            with open_regular(path) as file:  # a FIFO there would wait forever
                saved = torch.load(file, map_location="cpu", weights_only=True)
            if saved.get("key") == key and cache_holds(saved, indices, trained.configs[0].fc_features[1]):
                return saved["features"], saved["indices"]
        except Exception:  # noqa: BLE001 - a torn or foreign file: computed again below
            pass
        print(f"warning: {path} does not hold this figure's fc7 vectors whole: computing them again", file=sys.stderr)
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
    try:
        for old in trained.path.parent.glob(f"{trained.path.name}.fc7-*.pt"):
            old.unlink(missing_ok=True)  # vectors of an earlier checkpoint or sample: stale
        with atomic_write(path) as tmp:
            torch.save({"key": key, "features": found[0], "indices": found[1], "sha256": digest(*found)}, tmp)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        reason = getattr(error, "strerror", None) or type(error).__name__
        where = shown(trained.path.parent)
        print(f"warning: cannot cache the fc7 vectors in {where} ({reason}); computed again next time", file=sys.stderr)
    return found


def digest(features: torch.Tensor, indices: torch.Tensor) -> str:
    """The checksum of a cache's vectors and of the images they belong to (indices swapped in place would
    put each neighbour under another image)."""
    hashed = hashlib.sha256(features.contiguous().view(torch.uint8).numpy().tobytes())
    hashed.update(indices.to(torch.int64).contiguous().numpy().tobytes())
    return hashed.hexdigest()


def cache_holds(saved: dict, indices: torch.Tensor, width: int) -> bool:
    """Whether a cache file is the one written for these images: its indices among the sample's (less
    the unreadable ones), its vectors one finite float16 row of fc7's `width` per image, and the bytes of
    both those it was written with (a file overwritten in place at the same size would draw NaN neighbours,
    or neighbours under other images)."""
    features, found = saved.get("features"), saved.get("indices")
    return (
        isinstance(features, torch.Tensor)
        and isinstance(found, torch.Tensor)
        and found.dim() == 1
        and 0 < len(found) <= len(indices)
        and bool(torch.isin(found, indices).all())
        and features.dtype == torch.float16
        and tuple(features.shape) == (len(found), width)
        and bool(torch.isfinite(features).all())
        and found.dtype == torch.int64
        and saved.get("sha256") == digest(features, found)
    )


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


def draw_figure4(path: Path, classified: dict, queries: dict, categories: Categories, title: str) -> Path:
    """Write the figure: `classified` holds images, labels, probs, classes (top 5); `queries` holds
    images, labels, and per query the neighbours' images, labels and distances."""
    plt = pyplot()
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
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
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
    val = datasets_for(data_config, "val", data, host_decode=True)  # squashed for a caffe-preset run, as evaluate
    full_train = datasets_for(data_config, "train", data, host_decode=True)
    for dataset in (val, full_train):
        check_classes(dataset, ckpt.categories(trained.checkpoint), model_config.num_classes, trained.path)
    train = take(full_train, data_config.subset)  # the images the run trained on (its --subset), not all
    chosen = spread(labels_of(val), CLASSIFIED + QUERIES)
    picked = chosen[CLASSIFIED:] + chosen  # a validation set of fewer than 13 images lends queries from the left
    images, labels = load_images(val, chosen[:CLASSIFIED], workers)
    probs, classes = top_classes(trained.model, trained.pipeline, images)
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
    searched += f" (the run's --subset of {len(full_train):,})" if len(train) < len(full_train) else ""
    step = trained.checkpoint.get("step", 0)
    title = (
        f"{run_dir.name}, step {step}: {data_config.dataset} validation images; neighbours among {searched} training"
    )
    return draw_figure4(run_dir / "figure4.png", classified, queries, trained.categories, title)
