"""The datasets behind one function, `build_dataset`: ImageNet folders, MNIST and Fashion-MNIST
IDX files, and a deterministic fake set for dry runs.

Every dataset yields uint8 images (C, H, W) at their stored size and an integer label; the
batched, on-device steps of `alexnet2gpu.data.transforms` do the rest. Sets small enough to hold in
memory (`InMemory`) are batched by indexing, with no per-image work at all.
"""

from __future__ import annotations

import errno
import gzip
import logging
import math
import os
import re
import signal
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from alexnet2gpu.config import DataConfig
from alexnet2gpu.data import staged
from alexnet2gpu.data.base import Categories, DatasetError, SkippingDataset, imagenet_words
from alexnet2gpu.data.images import IMAGE_EXTENSIONS, UnreadableImage, is_ignored, is_image_name, stage_image
from alexnet2gpu.data.prefetch import prefetch
from alexnet2gpu.files import open_regular

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
TORCHVISION_DIRS = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}
HOW_TO_GET = {
    "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist`, or put the four IDX files "
    "(train-images-idx3-ubyte[.gz], ...) in a folder and pass --data FOLDER",
    "mnist": "put the four IDX files (train-images-idx3-ubyte[.gz], ...) in a folder and pass --data FOLDER, "
    "or run once with network access so torchvision can download them",
}


WORKER_TIMEOUT_S = 600  # seconds without a batch from a worker: it is stuck, not slow
IDX_MAX_BYTES = 1 << 31  # the largest IDX file read: MNIST's largest holds 47 MB; a header beyond is refused


def read_idx(path: str | Path) -> torch.Tensor:
    """An IDX file of unsigned bytes (gzipped or not) as a uint8 tensor of its stored shape. Reads no
    more than its header declares (and at most IDX_MAX_BYTES), so a gzip bomb cannot fill memory."""
    path = Path(path)
    try:
        file = open_regular(path)
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror}; put the IDX file itself there") from None
    with file:
        gzipped = file.read(2) == b"\x1f\x8b"
        file.seek(0)
        stream = gzip.GzipFile(fileobj=file) if gzipped else file
        try:
            head = stream.read(4)
            if len(head) < 4 or head[:3] != b"\x00\x00\x08":
                raise DatasetError(
                    f"{path} is not an IDX file of unsigned bytes: magic number {head.hex() or 'missing'}, "
                    "expected 0000080N (N = number of dimensions)"
                )
            dims = stream.read(4 * head[3])
            if len(dims) < 4 * head[3]:
                raise DatasetError(f"{path}: its header is cut off ({len(dims) // 4} of {head[3]} sizes); fetch again")
            shape = struct.unpack(f">{head[3]}I", dims)
            if 0 in shape[1:]:  # N images of 0x0 pixels: statistics of nothing (a NaN mean)
                size = "x".join(map(str, shape[1:]))
                raise DatasetError(f"{path}: its header gives images of {size} pixels, which hold nothing; fetch again")
            count = math.prod(shape)
            if count > IDX_MAX_BYTES:
                raise DatasetError(
                    f"{path}: header says {shape} = {count:,} bytes, more than the {IDX_MAX_BYTES:,} an IDX file "
                    "read here may hold; is it an MNIST-like file?"
                )
            body = stream.read(count + 1)  # one byte past the header's size tells a longer file
        except (OSError, EOFError, zlib.error) as error:  # zlib.error: a damaged deflate stream inside the gzip
            raise DatasetError(f"{path}: corrupt gzip data ({error}); fetch the file again") from None
    if len(body) != count:
        holds = "more" if len(body) > count else str(len(body))
        raise DatasetError(f"{path}: header says {shape} = {count} bytes, file holds {holds}; truncated?")
    if not count:  # a valid file of no images; frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=torch.uint8)
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def find_idx(name: str, data: str | None) -> Path:
    """The folder holding `name`'s four IDX files.

    With `data` (the user's --data), that folder or its torchvision layout (DATA/MNIST/raw) and
    nothing else: a folder that is missing or lacks the files is an error, never a quiet fall-back
    to another copy. Without it, the usual places: Debian's package, ./data in torchvision's
    layout, and last a torchvision download into ./data (the one place a download goes).
    """
    if data:
        candidates = [Path(data), Path(data) / TORCHVISION_DIRS[name]]
    else:
        candidates = [Path(DEBIAN[name])] if name in DEBIAN else []
        candidates.append(Path("data") / TORCHVISION_DIRS[name])
    for folder in candidates:
        if not _missing_idx(folder):
            return folder
    if data:
        raise DatasetError(_not_in_data(name, Path(data)))
    target = Path("data") / TORCHVISION_DIRS[name]
    made = [folder for folder in (target, *target.parents[:-1]) if not folder.exists()]  # innermost first
    try:  # the network is often absent; then say where we looked
        from torchvision import datasets

        log.warning("%s not found in %s: downloading it into ./data", name, ", ".join(map(str, candidates)))
        getattr(datasets, {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name])("data", download=True)
        return target
    except Exception as error:  # noqa: BLE001 - any download failure means "not available"
        for folder in made:  # a failed download leaves no empty ./data/MNIST/raw behind
            try:
                folder.rmdir()  # only while empty: a partial file or anything else put there stays
            except OSError:
                break
        raise DatasetError(
            f"{name} not found: looked in {', '.join(map(str, candidates))}; download into ./data failed "
            f"({type(error).__name__}). To get it: {HOW_TO_GET[name]}"
        ) from None


def _missing_idx(folder: Path) -> list[str]:
    return [f"{stem}[.gz]" for stem in IDX_FILES["train"] + IDX_FILES["val"] if not _idx_path(folder, stem)]


def _not_in_data(name: str, data: Path) -> str:
    """Why --data does not hold `name`, and the two ways on: fix the path, or leave it out."""
    usual = [DEBIAN[name]] if name in DEBIAN else []
    usual.append(f"./data/{TORCHVISION_DIRS[name]} (downloaded there if absent)")
    instead = f"fix the path, or leave out --data to use {' or '.join(usual)}"
    if not data.is_dir():
        what = "is a file, not a folder" if data.exists() else "does not exist"
        return f"{name} not found: --data {data} {what}; {instead}"
    lacks = min((_missing_idx(folder) for folder in (data, data / TORCHVISION_DIRS[name])), key=len)
    what = "hold none of its four IDX files" if len(lacks) == 4 else f"lack {', '.join(lacks)}"
    return (
        f"{name} not found: looked in {data} and {data / TORCHVISION_DIRS[name]}, which {what}; "
        f"{instead}. To get it: {HOW_TO_GET[name]}"
    )


def _idx_path(folder: Path, stem: str) -> Path | None:
    """The file named `stem` (or `stem`.gz) in `folder`, whatever it is: a FIFO, device or folder of that
    name is then refused by `read_idx` as what it is, not reported missing."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if os.path.lexists(candidate):
            return candidate
    return None


# Fashion-MNIST's labels 0-9 (Xiao, Rasul and Vollgraf 2017, its README)
FASHION_MNIST = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class InMemory(Dataset):
    """A whole split as one uint8 tensor (N, C, H, W) and its labels; batched by indexing."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        name: str,
        categories: Categories | None = None,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(f"{name}: {images.shape[0]} images but {labels.shape[0]} labels")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise DatasetError(
                f"{name}: labels run from {labels.min().item()} to {labels.max().item()}, outside 0..{num_classes - 1}"
            )
        self.images, self.labels, self.num_classes, self.name = images, labels.long(), num_classes, name
        self.categories = categories or Categories.numbered(num_classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def subset(self, n: int) -> InMemory:
        return InMemory(self.images[:n], self.labels[:n], self.num_classes, self.name, self.categories)


def idx_dataset(name: str, split: str, data: str | None) -> InMemory:
    folder = find_idx(name, data)
    image_file, label_file = (_idx_path(folder, stem) for stem in IDX_FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.dim() != 3 or images.shape[1] != images.shape[2]:
        raise DatasetError(
            f"{image_file}: expected square images (N, H, H), got shape {tuple(images.shape)}; is it an MNIST-like "
            "file? fetch it again"
        )
    if labels.dim() != 1:
        raise DatasetError(
            f"{label_file}: expected one label per image (N,), got shape {tuple(labels.shape)}; is it an MNIST-like "
            "labels file? fetch it again"
        )
    categories = Categories(FASHION_MNIST, FASHION_MNIST) if name == "fashion-mnist" else Categories.numbered(10)
    return InMemory(images.unsqueeze(1), labels.long(), 10, f"{name} {split} ({folder})", categories)  # (N, 1, 28, 28)


# ---------------------------------------------------------------------------------------------
# Fake images: class templates plus noise, so that a dry run can learn something


def fake_dataset(split: str, *, size: int = 32, channels: int = 3, num_classes: int = 10) -> InMemory:
    n = {"train": 1024, "val": 256}[split]
    templates = torch.rand((num_classes, channels, size, size), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1 if split == "train" else 2)
    labels = torch.arange(n) % num_classes
    noise = torch.rand((n, channels, size, size), generator=g)
    images = (0.6 * templates[labels] + 0.4 * noise) * 255  # (N, C, size, size)
    ids = tuple(f"template {k}" for k in range(num_classes))
    return InMemory(images.round().to(torch.uint8), labels, num_classes, f"fake {split}", Categories(ids, ids))


# ---------------------------------------------------------------------------------------------
# ImageNet: the ImageFolder layout, decoded and staged to 256x256 in worker processes


def class_names(train: Path) -> list[str]:
    """The class folders of `train`, sorted; hidden folders and tool leftovers are no classes."""
    return sorted(d.name for d in _entries(train) if _is_dir(d))


def _entries(folder: Path) -> list[os.DirEntry]:
    """The entries of a dataset folder that are not tool leftovers, or one line on why it cannot be read."""
    try:
        with os.scandir(folder) as entries:
            return [entry for entry in entries if not is_ignored(entry.name)]
    except OSError as error:
        raise DatasetError(
            f"cannot list {folder}: {error.strerror}; fix it or move it out of the dataset folder"
        ) from None


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether an entry is a folder (following symbolic links), or one line naming an entry that cannot be
    followed: a symbolic link that loops (`ln -s loop loop`), or one through an unreadable folder."""
    try:
        return entry.is_dir()
    except OSError as error:
        what = (
            "is a symbolic link that loops" if error.errno == errno.ELOOP else f"cannot be followed: {error.strerror}"
        )
        raise DatasetError(f"{entry.path} {what}; remove it or move it out of the dataset folder") from None


def list_images(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(path, label) of every image in `root/<class>/`, classes in the given order, files sorted.
    Tool leftovers are ignored; any other file that is not an image, or a folder, is an error
    found here, before a run starts, rather than an image silently missing from the set."""
    samples = []
    for label, cls in enumerate(classes):
        folder = root / cls
        if not folder.is_dir():
            raise DatasetError(f"{root}: class folder {cls!r} (from train/) is missing; every split needs it")
        entries = sorted(_entries(folder), key=lambda e: e.name)
        for entry in entries:
            if _is_dir(entry):
                raise DatasetError(
                    f"{folder / entry.name} is a folder inside a class folder; the layout is <split>/<class>/<image>: "
                    "move it out of the dataset folder"
                )
            if not is_image_name(entry.name):
                raise DatasetError(
                    f"{folder / entry.name} is not an image (by its extension; PIL opens {len(IMAGE_EXTENSIONS)} "
                    "kinds, .jpg .png .tif .webp ...); move it out of the dataset folder"
                )
        if not entries:
            raise DatasetError(f"class folder {folder} is empty; remove it or add its images")
        samples += [(folder / entry.name, label) for entry in entries]
    return samples


class ImageFolderStaged(SkippingDataset):
    """`root/<class>/<image>` (torchvision's ImageFolder layout), each image rescaled so its short
    side is `stage_size` and centre-cropped to a square (P 2), as uint8 (3, S, S).

    Every mode PIL opens decodes to correct RGB (`alexnet2gpu.data.images.stage_image`); files that do
    not decode are skipped with their path and reason, or stop the run with `strict=True`.
    """

    def __init__(
        self, root: Path, classes: list[str], stage_size: int = 256, strict: bool = False, squash: bool = False
    ) -> None:
        super().__init__(strict)
        self.root, self.classes, self.stage_size, self.squash = root, classes, stage_size, squash
        self.num_classes, self.channels, self.name = len(classes), 3, f"imagenet ({root})"
        self.categories = Categories(tuple(classes), tuple(imagenet_words(root.parent, classes)))
        self.samples = list_images(root, classes)

    @property
    def labels(self) -> torch.Tensor:
        """Every image's label, without reading an image."""
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[index]
        try:
            return stage_image(path, self.stage_size, self.squash), label  # (3, 256, 256) uint8
        except UnreadableImage as error:
            self.skip(str(path), str(error))
            return None


def imagenet_dataset(
    split: str, data: str | None, stage_size: int, strict: bool, gpu_decode: bool = False, squash: bool = False
) -> SkippingDataset:
    """An ImageFolder tree, or a folder written by `python -m alexnet2gpu stage` (its manifest).
    `squash`: images resized whole to stage_size x stage_size (Caffe's), from an ImageFolder tree only."""
    if not data:
        raise DatasetError("imagenet needs --data DIR: a folder with train/ and val/, one subfolder per class")
    root = Path(data)
    staged.refuse_unfinished(root)
    if staged.is_staged(root) and squash:
        raise DatasetError(
            f"{root} is staged with the short side at 256 and the centre square kept (P 2); the caffe preset squashes "
            "whole images to 256x256: pass --data with the ImageFolder tree it was staged from"
        )
    if staged.is_staged(root):
        return staged.StagedImages(root, split, stage_size=stage_size, strict=strict, gpu_decode=gpu_decode)
    if gpu_decode:
        raise DatasetError(f"GPU decoding reads a staged folder; {root} is not one (python -m alexnet2gpu stage)")
    train, folder = root / "train", root / {"train": "train", "val": "val"}[split]
    if not train.is_dir() or not folder.is_dir():
        raise DatasetError(
            f"{root} lacks {'train/' if not train.is_dir() else 'val/'}: imagenet needs DIR/train/<class>/*.JPEG "
            "and DIR/val/<class>/*.JPEG (the ImageFolder layout; pytorch/examples' valprep.sh sorts val/)"
        )
    classes = class_names(train)
    if not classes:
        raise DatasetError(f"{train} has no class folders")
    extra = sorted(set(class_names(folder)) - set(classes))
    if extra:
        raise DatasetError(f"{folder} has classes that train/ lacks, so their labels are out of range: {extra[:5]}")
    return ImageFolderStaged(folder, classes, stage_size, strict, squash)


# ---------------------------------------------------------------------------------------------


def build_dataset(
    name: str,
    split: str,
    data: str | None = None,
    *,
    stage_size: int = 256,
    strict: bool = False,
    gpu_decode: bool = False,
    squash: bool = False,
) -> Dataset:
    """`split` is "train" or "val" (the test set for MNIST and Fashion-MNIST). `squash`: ImageNet's
    images resized whole to stage_size x stage_size (`DataConfig.squash`, Caffe's preset)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if gpu_decode and name != "imagenet":
        raise DatasetError(f"GPU decoding reads a staged ImageNet folder, not {name}")
    if name in ("mnist", "fashion-mnist"):
        return idx_dataset(name, split, data)
    if name == "fake":
        return fake_dataset(split)
    if name == "imagenet":
        return imagenet_dataset(split, data, stage_size, strict, gpu_decode, squash)
    raise DatasetError(f"unknown dataset {name!r}; choose imagenet, mnist, fashion-mnist or fake")


def datasets_for(config: DataConfig, split: str, data: str | None = None, *, host_decode: bool = False) -> Dataset:
    """A run's `split` as its DataConfig reads it (the one place its dataset arguments are spelled out):
    `data` replaces the run's folder; `host_decode` decodes on the CPU whatever the run chose (evaluation
    and figures run where the run's GPUs may not be)."""
    return build_dataset(
        config.dataset,
        split,
        data or config.data,
        stage_size=config.stage_size,
        strict=config.strict,
        gpu_decode=config.gpu_decode and not host_decode,
        squash=config.squash,
    )


def check_classes(dataset: Dataset, saved: Categories | None, num_classes: int, checkpoint: str | Path) -> None:
    """Refuse a dataset whose classes are not the checkpoint's (by id, in label order; by count for a
    checkpoint that holds no names): its labels would be out of range (a crash mid-step) or name other
    classes (numbers that mean nothing). The line lists the first differences."""
    name = getattr(dataset, "name", "the dataset")
    if dataset.num_classes != num_classes:
        raise DatasetError(
            f"{name} has {dataset.num_classes} classes, but {checkpoint} was trained on {num_classes}; "
            "use the dataset it was trained on (--data)"
        )
    ours = getattr(dataset, "categories", None)
    if saved is None or ours is None or ours.ids == saved.ids:
        return
    differ = [
        f"{i}: {a!r} here, {b!r} in training"
        for i, (a, b) in enumerate(zip(ours.ids, saved.ids, strict=False))
        if a != b
    ]
    raise DatasetError(
        f"{name} has other classes than {checkpoint} was trained on ({len(differ)} of {num_classes} differ; label "
        f"{'; '.join(differ[:3])}); use the dataset it was trained on (--data)"
    )


def check_image_size(dataset: Dataset, mean: torch.Tensor | None, checkpoint: str | Path) -> None:
    """Refuse images held in memory (MNIST-like sets) of another size than the run's mean image: the
    pipeline would stretch them to it and report numbers of other images than the run's. (Folders of
    photos are staged to the run's size whatever their files' sizes.)"""
    images = getattr(dataset, "images", None)
    if mean is None or not isinstance(images, torch.Tensor) or images.shape[-2:] == mean.shape[-2:]:
        return
    size, trained = "x".join(map(str, images.shape[-2:])), "x".join(map(str, mean.shape[-2:]))
    raise DatasetError(
        f"{getattr(dataset, 'name', 'the dataset')} holds {size} images, but {checkpoint} was trained on {trained} "
        "ones; use the dataset it was trained on (--data)"
    )


def describe(name: str, data: str | None) -> tuple[int, int]:
    """(classes, channels) of a dataset without reading its images; raises DatasetError where
    `build_dataset` would, so a run fails before it builds a model."""
    if name in ("mnist", "fashion-mnist"):
        find_idx(name, data)
        return 10, 1
    if name == "fake":
        return 10, 3
    if name == "imagenet":
        if data:
            staged.refuse_unfinished(Path(data))
        if data and staged.is_staged(Path(data)):
            return len(staged.read_manifest(Path(data))["classes"]), 3
        train = Path(data or "") / "train"
        if not data or not train.is_dir():
            imagenet_dataset("train", data, 256, False)  # raises the error that says what is missing
        return len(class_names(train)), 3
    raise DatasetError(f"unknown dataset {name!r}; choose imagenet, mnist, fashion-mnist or fake")


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The order of one epoch: a function of (seed, epoch) alone, so a resumed run sees the same."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def collate_skipping(items: list) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
    """Stacks the images that decoded (None marks a skipped one); encoded images (1-D bytes, for
    decoding on the GPU) stay a list."""
    items = [item for item in items if item is not None]
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    if not items:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), labels
    if items[0][0].dim() == 1:
        return [image for image, _ in items], labels
    # decoders hand over (C, H, W) views of (H, W, C) pixels: stacked in that order the copy is a plain
    # one (5x faster than gathering channel planes); the batch is (N, C, H, W), channels-last in memory
    return torch.stack([image.permute(1, 2, 0) for image, _ in items]).permute(0, 3, 1, 2), labels


def _one_line(error: DatasetError) -> DatasetError:
    """A worker's DatasetError reaches this process as "Caught DatasetError in DataLoader worker ...
    Original Traceback ..."; its own message is the traceback's last line."""
    last = str(error).strip().splitlines()[-1]
    return DatasetError(last.split("DatasetError: ", 1)[-1])


def batches(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
    workers: int = 0,
    drop_last: bool = False,
    shard: tuple[int, int] = (0, 1),
    keep_empty: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 image batches (N, C, H, W) with labels, from batch `start` of the epoch on.

    With `shard=(i, k)` (and `drop_last`, so that every batch splits evenly), only the i-th of k
    equal parts of each global batch is loaded: a data-parallel replica reads its own rows alone.
    Unreadable images are dropped from their batch. A batch of which every image was dropped is
    left out, or with `keep_empty` yielded empty, so that a caller counting batches (to resume at
    batch `start`) counts every batch of the epoch."""
    index, count = shard
    if count > 1 and (not drop_last or batch_size % count):
        raise ValueError(f"a batch of {batch_size} splits over {count} replicas only evenly, with drop_last")
    order = epoch_order(len(dataset), seed, epoch, shuffle)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    order = order[start * batch_size : stop]
    part = batch_size // count
    if count > 1:  # (batches, batch_size) -> this replica's columns
        order = order.view(-1, batch_size)[:, index * part : (index + 1) * part].reshape(-1)
    if isinstance(dataset, InMemory):
        for i in range(0, len(order), part):
            rows = order[i : i + part]
            yield dataset.images[rows], dataset.labels[rows]
        return
    loader = DataLoader(
        dataset,
        batch_size=part,
        sampler=order.tolist(),
        num_workers=workers,
        collate_fn=collate_skipping,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        worker_init_fn=_ignore_interrupts if workers else None,
        timeout=WORKER_TIMEOUT_S if workers else 0,  # no worker holds a run forever (a hung disk, a network mount)
    )
    source = dataset.dataset if isinstance(dataset, Subset) else dataset
    batches_in = stream = iter(loader)
    if getattr(source, "decode_device", None) is not None:  # encoded batches, decoded here (on the GPU)
        stream = prefetch(batches_in, partial(_decode, source.decode_batch), device=_resolved(source.decode_device))
    try:
        for images, labels in stream:
            if len(labels) or keep_empty:
                yield images, labels
    except DatasetError as error:
        raise (_one_line(error) if workers else error) from None
    except (ConnectionError, EOFError):  # the third report of a dead worker: it died handing over a batch
        dead = dead_worker(batches_in)
        if dead is None:
            raise
        raise dead from None
    except RuntimeError as error:
        if worker_killed(error):
            raise worker_killed(error) from None
        if "timed out" not in str(error):
            raise
        raise DatasetError(
            f"a data worker gave no batch for {WORKER_TIMEOUT_S} s (a file that never finishes reading: a hung "
            "disk or network mount?); fix the data folder, then resume from the run's last.pt"
        ) from None
    finally:
        if stream is not batches_in:  # a consumer that stopped early: the decode thread ends now, not at collection
            stream.close()
        # The workers end now, not when the iterator is collected: until then DataLoader's SIGCHLD handler
        # keeps their pids and, at any later child's exit (a subprocess), raises for a worker that died here.
        getattr(batches_in, "_shutdown_workers", lambda: None)()


def dead_worker(batches_in, wait_s: float = 2.0) -> DatasetError | None:
    """The one line for a worker of this loader that has died, once the kernel says so (a dropped
    connection can arrive a moment before the worker's exit is seen); None if all of them live."""
    workers = getattr(batches_in, "_workers", [])
    end = time.monotonic() + wait_s
    while workers:
        dead = [w for w in workers if not w.is_alive()]
        if dead:
            code = dead[0].exitcode or 0
            how = f"was killed ({signal.strsignal(-code)})" if code < 0 else "ended unexpectedly"
            return _worker_died(str(dead[0].pid), how)
        if time.monotonic() > end:
            return None
        time.sleep(0.05)
    return None


def _worker_died(worker: str, how: str) -> DatasetError:
    return DatasetError(
        f"data worker {worker} {how}: the kernel's out-of-memory killer, most likely; "
        "give it more memory or fewer workers (-j), then resume from the run's last.pt"
    )


def worker_killed(error: BaseException) -> DatasetError | None:
    """The one line for a data worker that died (raised where the main process happens to be when the
    worker dies, often mid-step), or None for another error. DataLoader says "worker (pid N) is killed
    by signal: S" when its SIGCHLD handler sees the death first, and "worker (pid(s) N) exited
    unexpectedly" when a read from the dead worker's queue fails first: the same death, either way (a
    third, a dropped connection mid-batch, is `dead_worker`'s)."""
    text = str(error).strip()
    killed = re.search(r"DataLoader worker \(pid (\d+)\) is killed by signal: (.+?)\.?$", text)
    if killed:
        worker, how = killed[1], f"was killed ({killed[2]})"
    else:
        exited = re.search(r"DataLoader worker \(pid\(s\) ([\d, ]+)\) exited unexpectedly", text)
        if not exited:
            return None
        worker, how = exited[1], "ended unexpectedly"
    return _worker_died(worker, how)


def _decode(decode: Callable, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = batch
    return decode(images, labels) if isinstance(images, list) else (images, labels)


def _resolved(device: torch.device) -> torch.device:
    """CUDA without an index is this thread's current device; the decode thread's would be device 0."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _ignore_interrupts(_: int) -> None:
    """Ctrl-C reaches the whole process group; the main process stops the run at a step boundary,
    and a worker killed by the same signal would end it with a traceback instead. SIGTERM keeps its
    default: the loader and multiprocessing end their workers with it (a worker that ignored it
    would keep the program from exiting); a SIGTERM to the whole group (a job scheduler's) ends the
    workers, and the training loop, which got it too, takes their end as its stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def num_batches(dataset: Dataset, batch_size: int, drop_last: bool = False) -> int:
    return len(dataset) // batch_size if drop_last else -(-len(dataset) // batch_size)
