"""The training set's statistics the paper's pipeline needs: the per-pixel mean image (P 2) and
the eigenvectors / eigenvalues of the RGB covariance for PCA colour noise (P 4.1).

Fitted once on the training images and cached with their provenance (dataset, folder, size,
images used, date), under a key that covers the images' content. The mean image is kept at the
images' stored size: resizing is linear, so subtracting it before the resize to 256 equals
subtracting the mean of the resized images.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from alexnet2gpu.data.datasets import batches, num_batches
from alexnet2gpu.files import atomic_write, shown
from alexnet2gpu.progress import progress_bar

# ALEXNET-SPEC.md: ImageNet's RGB covariance of [0, 1] pixels, as fb.resnet.torch uses it
IMAGENET_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


@dataclass
class DataStats:
    mean: torch.Tensor  # (C, H, W) per-pixel mean on the 0-255 scale
    eigvec: torch.Tensor  # (C, C), eigenvectors as columns, largest eigenvalue first
    eigval: torch.Tensor  # (C,), eigenvalues of the covariance of [0, 1] pixel values
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "eigvec": self.eigvec, "eigval": self.eigval, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, d: dict) -> DataStats:
        return cls(d["mean"], d["eigvec"], d["eigval"], dict(d.get("provenance", {})))

    @staticmethod
    def problem(d: object, channels: int | None = None) -> str | None:
        """What makes `d` (a cache's or a checkpoint's saved statistics) unusable, or None: a mean image
        (C, S, S) of pixels in 0..255, C = `channels` where given; an orthonormal (C, C) eigenvector
        matrix and C eigenvalues that can be variances of [0, 1] pixels, all finite floating point."""
        if not isinstance(d, dict) or not all(isinstance(d.get(k), torch.Tensor) for k in ("mean", "eigvec", "eigval")):
            return "its data statistics lack the mean image or the PCA"
        mean, eigvec, eigval = d["mean"], d["eigvec"], d["eigval"]
        c = (channels or mean.shape[0]) if mean.dim() else 0
        if mean.dim() != 3 or mean.shape[0] != c or mean.shape[1] != mean.shape[2] or not c:
            return f"its mean image has shape {tuple(mean.shape)}, not ({channels or 'C'}, side, side)"
        if tuple(eigvec.shape) != (c, c) or tuple(eigval.shape) != (c,):
            return f"its PCA has shapes {tuple(eigvec.shape)} and {tuple(eigval.shape)}, not ({c}, {c}) and ({c},)"
        for name, tensor in (("mean image", mean), ("PCA", eigvec), ("PCA", eigval)):
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                return f"its {name} is not finite floating point"
        if (eigval < 0).any() or eigval.sum() > c / 4 * 1.001:  # variances of values in [0, 1]: at most 1/4 each
            return f"its PCA's eigenvalues {eigval.tolist()} are not variances of pixels in [0, 1]"
        if not torch.allclose(eigvec.double().T @ eigvec.double(), torch.eye(c, dtype=torch.float64), atol=1e-3):
            return "its PCA's eigenvectors are not orthonormal"
        if mean.min() < 0 or mean.max() > 255:
            return f"its mean image runs from {mean.min().item():g} to {mean.max().item():g}, outside 0..255"
        return None


@torch.no_grad()
def fit_stats(dataset: Dataset, *, limit: int | None = None, batch_size: int = 256, workers: int = 0) -> DataStats:
    """Mean image and RGB covariance eigen-decomposition over the first `limit` images of a fixed
    shuffle (all of them when None), accumulated in float64 on the images' device (CUDA when they
    were decoded there, --gpu-decode) and returned on the CPU, where they are cached."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    total = pixels = 0
    sum_image = sum_c = sum_cc = None
    stream = batches(dataset, batch_size, shuffle=limit is not None and n < len(dataset), seed=0, workers=workers)
    steps = -(-n // batch_size)
    for images, _ in progress_bar(
        stream, total=min(steps, num_batches(dataset, batch_size)), desc="fitting stats", leave=False
    ):
        images = images[: n - total].double()  # (B, C, H, W) on 0-255
        if sum_image is None:
            c, where = images.shape[1], dict(dtype=torch.float64, device=images.device)
            sum_image, sum_c, sum_cc = torch.zeros(images.shape[1:], **where), torch.zeros(c, **where), 0
        sum_image += images.sum(0)
        flat = images.transpose(0, 1).reshape(images.shape[1], -1) / 255  # (C, B*H*W) in [0, 1]
        sum_c = sum_c + flat.sum(1)
        sum_cc = sum_cc + flat @ flat.T  # (C, C)
        pixels += flat.shape[1]
        total += images.shape[0]
        if total >= n:
            break
    if not total:
        raise ValueError("cannot fit statistics on an empty dataset")
    sum_image, sum_c, sum_cc = sum_image.cpu(), sum_c.cpu(), sum_cc.cpu()
    mu = sum_c / pixels
    cov = sum_cc / pixels - torch.outer(mu, mu)
    eigval, eigvec = torch.linalg.eigh(cov)  # ascending
    order = eigval.argsort(descending=True)
    provenance = {"images": total, "date": datetime.date.today().isoformat(), "source": "fitted"}
    return DataStats(
        (sum_image / total).float(), eigvec[:, order].float(), eigval[order].clamp_min(0).float(), provenance
    )


def fingerprint(dataset: Dataset) -> str:
    """What changes when the training set's content does, for the cache key: a staged folder's index
    checksum (the manifest's, verified when the folder was opened), each file's path, size and
    modification time for an image folder, the bytes of a set held in memory; a subset adds its rows."""
    if isinstance(dataset, Subset):
        rows = torch.as_tensor(dataset.indices, dtype=torch.int64).numpy().tobytes()
        return hashlib.sha1(f"{fingerprint(dataset.dataset)}|".encode() + rows).hexdigest()
    digest = hashlib.sha1(f"{type(dataset).__name__}|{len(dataset)}|".encode())
    if getattr(dataset, "index_sha256", None):
        digest.update(dataset.index_sha256.encode())
    elif hasattr(dataset, "samples"):
        for path, label in dataset.samples:
            stat = os.stat(path)
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{label}\n".encode(errors="surrogateescape"))
    elif isinstance(getattr(dataset, "images", None), torch.Tensor):
        digest.update(dataset.images.contiguous().numpy().tobytes())
        digest.update(dataset.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_path(
    cache_dir: str | Path, dataset: str, data: str | None, stage_size: int, limit: int | None, content: str
) -> Path:
    """One file per (dataset, folder, stage size, images fitted, content: `fingerprint`), so that a
    dataset replaced in place (re-extracted, staged again) is fitted again."""
    where = os.path.abspath(data) if data else "default"
    key = hashlib.sha1(
        f"{dataset}|{where}|{stage_size}|{limit}|{content}".encode(errors="surrogateescape")
    ).hexdigest()[:10]
    return Path(cache_dir) / f"stats-{dataset}-{stage_size}-{key}.pt"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alexnet2gpu"


def load_or_fit(
    dataset: Dataset,
    *,
    name: str,
    data: str | None,
    stage_size: int,
    limit: int | None,
    cache_dir: str | Path | None = None,
    workers: int = 0,
) -> DataStats:
    """The cached statistics of this training set, fitted (and cached) on first use. A cache folder
    that cannot be written (read-only, or under a file) does not stop the run: the statistics are
    fitted without it, saying so once."""
    path = cache_path(cache_dir or default_cache_dir(), name, data, stage_size, limit, fingerprint(dataset))
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a torn or foreign file: refitted below
            saved = None
        if DataStats.problem(saved) is None:
            return DataStats.from_dict(saved)
        print(f"warning: {shown(path)} does not hold usable statistics: fitting them again", file=sys.stderr)
        with contextlib.suppress(OSError):  # a read-only cache: refitted, and not cached (below)
            path.unlink()
    stats = fit_stats(dataset, limit=limit, workers=workers)
    stats.provenance.update(dataset=name, data=os.path.abspath(data) if data else None, stage_size=stage_size)
    _cache(stats, path)
    return stats


def _cache(stats: DataStats, path: Path) -> None:
    """Write the statistics to `path` atomically, or warn (once, naming the folder) that they are not cached."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            torch.save(stats.to_dict(), tmp)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        reason = getattr(error, "strerror", None) or type(error).__name__
        print(
            f"warning: cannot cache the data statistics in {path.parent} ({reason}); going on without a cache "
            "(they are fitted again next time): set XDG_CACHE_HOME to a writable folder",
            file=sys.stderr,
        )
