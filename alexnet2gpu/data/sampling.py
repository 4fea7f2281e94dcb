"""Which images a run reads: --subset / --val-subset samples, a replica's share, the fixed images of a figure."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

from alexnet2gpu.data.datasets import InMemory, batches

SAMPLE_SEED = 0  # --subset and --val-subset: the same sample in every run, resume, placement and evaluate


def take(dataset, n: int | None, *, stratified: bool = False):
    """`n` images of a dataset (all when None). Sets stored in random order (MNIST, Fashion-MNIST,
    the fake set) give their first `n`; the others (ImageNet, stored class by class) a fixed, seeded
    sample over all classes, with `stratified` as even over the classes as `n` allows; in file order."""
    if n is None or n >= len(dataset):
        return dataset
    if isinstance(dataset, InMemory):
        return part(dataset, 0, n)
    labels, generator = dataset.labels, torch.Generator().manual_seed(SAMPLE_SEED)
    order = torch.randperm(len(labels), generator=generator)
    if stratified:  # round robin over the classes, each in its shuffled order
        shuffled = labels[order]
        by_class = torch.sort(shuffled, stable=True).indices  # positions in `order`, class by class
        counts = torch.bincount(shuffled, minlength=dataset.num_classes)
        starts = counts.cumsum(0) - counts
        rank = torch.empty_like(by_class)
        rank[by_class] = torch.arange(len(order)) - starts[shuffled[by_class]]  # place within its class
        order = order[torch.argsort(rank * len(order) + torch.arange(len(order)))]
    subset = torch.utils.data.Subset(dataset, order[:n].sort().values.tolist())
    subset.num_classes, subset.channels, subset.categories = (
        dataset.num_classes,
        dataset.channels,
        getattr(dataset, "categories", None),
    )
    subset.name = f"{getattr(dataset, 'name', 'the dataset')}, sample of {n:,}"
    return subset


def sample_note(flag: str, n: int | None, full, taken) -> str | None:
    """One line on what --subset / --val-subset N took, for the run's output (None when not asked)."""
    if n is None:
        return None
    if taken is full:
        return f"{flag} {n:,}: all {len(full):,} images (the set holds no more)"
    if isinstance(full, InMemory):
        return f"{flag}: the first {len(taken):,} of {len(full):,} images (stored in random order)"
    classes = len(set(full.labels[taken.indices].tolist()))
    return (
        f"{flag}: a fixed sample (seed {SAMPLE_SEED}) of {len(taken):,} of {len(full):,} images, "
        f"{classes} of {full.num_classes} classes"
    )


def part(dataset, start: int, stop: int):
    """Images `start` to `stop` of a dataset, keeping its class and channel counts."""
    if isinstance(dataset, InMemory):
        return InMemory(
            dataset.images[start:stop],
            dataset.labels[start:stop],
            dataset.num_classes,
            dataset.name,
            dataset.categories,
        )
    subset = torch.utils.data.Subset(dataset, range(start, stop))
    subset.num_classes, subset.channels, subset.categories = (
        dataset.num_classes,
        dataset.channels,
        getattr(dataset, "categories", None),
    )
    return subset


FIGURE_SEED = 0  # the images a figure shows: the same on every call, for every checkpoint of a run


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
