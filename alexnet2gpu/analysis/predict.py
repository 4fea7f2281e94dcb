"""What a trained network sees in image files: each file's top 5 classes with their probabilities,
through the run's own preprocessing (`python -m alexnet2gpu predict`, or `predict()` from Python).

A file reaches the network as an image of its training set did:

    any file PIL opens -> 8-bit RGB (`images.stage_image`: palette, alpha on white, 16-bit, CMYK,
    EXIF turns) -> short side rescaled, centre square kept, at the size the set is stored at
    (ImageNet's 256, Fashion-MNIST's and MNIST's 28, the fake set's 32) -> 1-channel sets: grey
    -> the run's evaluation pipeline (its mean image, preset and input size): the centre crop,
       or the paper's ten patches with their softmax averaged (P 4.1)

Grey is PIL's "L" (ITU-R 601-2 luma), which gives back exactly the stored pixels of a 28x28 image
saved from the set itself. Nothing else is done to look like the set: Fashion-MNIST and MNIST hold
light objects on a black background, so a photo of a dark shoe on white paper is a different
picture to their networks (invert it first).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from alexnet2gpu.analysis.inference import Trained, load_trained
from alexnet2gpu.data.images import IMAGE_EXTENSIONS, UnreadableImage, is_ignored, is_image_name, stage_image
from alexnet2gpu.files import shown
from alexnet2gpu.train.errors import EvaluationError
from alexnet2gpu.train.evaluate import log_probabilities

TOP = 5
# the side at which datasets.py stores each set's images (idx_dataset, fake_dataset); ImageNet: the
# run's stage_size. A run of the paper's preset says it too: its mean image has that shape.
STORED_SIZE = {"mnist": 28, "fashion-mnist": 28, "fake": 32}


class InputError(ValueError):
    """IMAGE arguments that name nothing to classify; the message lists each of them."""


@dataclass(frozen=True)
class Guess:
    label: int
    id: str  # the class's id in the checkpoint (ImageNet's WordNet id)
    name: str  # its words for a person
    probability: float


@dataclass(frozen=True)
class Prediction:
    path: Path
    top: tuple[Guess, ...]  # most probable first

    def to_dict(self) -> dict:
        return {"path": str(self.path), "top5": [vars(guess) for guess in self.top]}

    def __str__(self) -> str:
        lines = [shown(self.path)]  # a name holding a newline cannot forge probability lines
        for guess in self.top:
            said = guess.name if guess.name == guess.id else f"{guess.name} ({guess.id})"
            lines.append(f"{guess.probability:7.1%}  {shown(said)}")  # class names come from users' files too
        return "\n".join(lines)


@dataclass(frozen=True)
class Unreadable:
    path: Path
    reason: str

    def to_dict(self) -> dict:
        return {"path": str(self.path), "error": self.reason}

    def __str__(self) -> str:
        return f"cannot read {shown(self.path)}: {self.reason}"


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """The files to classify, in the order given: a file as it is (whatever its name; PIL decides
    whether it is an image), a folder as the image files under it (by extension, walked recursively
    in sorted order; hidden files and tool leftovers skipped, as a dataset listing skips them).
    A path that does not exist, or a folder with no image in it, raises InputError naming them all."""
    found, problems = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            files = _walk(item)
            if not files:
                problems.append(f"{item} holds no image files (by extension: {' '.join(IMAGE_EXTENSIONS[:6])} ...)")
            found += files
        elif item.exists():
            found.append(item)
        else:
            problems.append(f"{item} does not exist")
    if problems:
        raise InputError("; ".join(problems))
    return found


def _walk(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):  # symbolic links to folders are not followed: no loops
        dirs[:] = sorted(d for d in dirs if not is_ignored(d))
        files += [Path(root, name) for name in sorted(names) if not is_ignored(name) and is_image_name(name)]
    return files


def stored_form(trained: Trained) -> tuple[int, int]:
    """(channels, side) of the images the run was trained on, as its dataset stores them."""
    model_config, data, _ = trained.configs
    mean = trained.pipeline.mean
    if mean is not None:  # the paper's preset: the mean image has the stored shape
        return mean.shape[0], mean.shape[-1]
    return model_config.in_channels, STORED_SIZE.get(data.dataset, data.stage_size)


def read_image(path: str | Path, channels: int, size: int, squash: bool = False) -> torch.Tensor:
    """uint8 (channels, size, size): the file as the training set stores its images (squashed whole to
    size x size for a caffe-preset run, as Caffe's convert_imageset did). Raises UnreadableImage with
    the reason when it cannot."""
    rgb = stage_image(path, size, squash)  # (3, size, size)
    if channels == 3:
        return rgb
    if channels != 1:
        raise ValueError(f"images of {channels} channels: expected 1 (grey) or 3 (RGB)")
    grey = Image.fromarray(rgb.permute(1, 2, 0).numpy()).convert("L")  # ITU-R 601-2 luma, PIL's rounding
    return torch.from_numpy(np.array(grey))[None]  # (1, size, size)


@torch.no_grad()
def probabilities(trained: Trained, images: torch.Tensor, *, ten_crop: bool = False) -> torch.Tensor:
    """The softmax (N, classes), on the CPU, of uint8 images (N, C, S, S) in the stored form: of the
    centre crop, or averaged over the ten patches (P 4.1), as `train.evaluate` scores them."""
    model = trained.model.eval()
    probs = log_probabilities(model, trained.pipeline, images, ten_crop=ten_crop).exp()  # (N, classes)
    probs = probs.cpu()
    if not torch.isfinite(probs).all():
        raise EvaluationError(
            f"the model's outputs are NaN or inf: {trained.path} holds NaN or inf weights, or its activations overflow"
        )
    return probs


def classify(
    trained: Trained,
    paths: Sequence[str | Path],
    *,
    batch_size: int = 64,
    ten_crop: bool = False,
    top: int = TOP,
) -> Iterator[Prediction | Unreadable]:
    """A Prediction (the `top` classes, fewer when the net has fewer) or an Unreadable (the reason)
    for each file, in order, computed `batch_size` network inputs at a time (ten per image with
    `ten_crop`, so that memory is the same either way)."""
    if batch_size < 1:
        raise ValueError(f"-b/--batch-size {batch_size}: expected a positive number of images")
    channels, size = stored_form(trained)
    squash = trained.configs[1].squash  # the caffe preset's images are squashed, not cropped square
    categories = trained.categories
    k = min(top, len(categories.ids))
    per_batch = max(1, batch_size // 10) if ten_crop else batch_size
    for start in range(0, len(paths), per_batch):
        chunk = [Path(path) for path in paths[start : start + per_batch]]
        read = [_read_or_reason(path, channels, size, squash) for path in chunk]  # uint8 (C, S, S) or Unreadable
        images = [image for image in read if isinstance(image, torch.Tensor)]
        if images:
            values, labels = probabilities(trained, torch.stack(images), ten_crop=ten_crop).topk(k, dim=1)
            tops = iter(zip(values.tolist(), labels.tolist(), strict=True))
        for path, image in zip(chunk, read, strict=True):
            if isinstance(image, Unreadable):
                yield image
                continue
            probs, classes = next(tops)
            guesses = (Guess(c, categories.ids[c], categories.names[c], p) for p, c in zip(probs, classes, strict=True))
            yield Prediction(path, tuple(guesses))


def _read_or_reason(path: Path, channels: int, size: int, squash: bool) -> torch.Tensor | Unreadable:
    try:
        return read_image(path, channels, size, squash)
    except UnreadableImage as error:
        return Unreadable(path, str(error))


def predict(
    checkpoint: str | Path,
    images: Iterable[str | Path],
    *,
    devices: str | None = None,
    batch_size: int = 64,
    ten_crop: bool = False,
    top: int = TOP,
) -> list[Prediction | Unreadable]:
    """Each image file's (or image folder's) top classes under checkpoint `checkpoint`, on the run's
    own devices unless `devices` names others: `predict("runs/demo/best.pt", ["shoe.png"])`."""
    paths = find_images(images)
    trained = load_trained(checkpoint, devices)
    return list(classify(trained, paths, batch_size=batch_size, ten_crop=ten_crop, top=top))
