"""The paper's preprocessing and augmentation (P 2, 4.1), batched on the training device.

uint8 images (N, C, h, w) as stored -> float network inputs (N, C, 224, 224):

    subtract the mean image -> resize to 256 (when stored smaller) -> random 224 crop + flip
    -> PCA colour noise (train);  centre crop or ten crops (evaluation)

With `mean_crop="centre"` (K12) the mean is subtracted after cropping instead: the centre 224x224 of
the mean image, from every crop and view; with `pca_rescale` the noised crop is divided by 1.1; with
`crop_chunk=32` each run of 32 images shares one offset and one flip.

Random draws (offsets, flips, alphas) are small and come from a CPU generator seeded per step,
so the same seed gives the same augmentation on any device and after a resume; they reach the
device in one pinned, non-blocking copy, so the host never waits for the device here. Inputs leave
in NCHW memory, or channels-last with `channels_last` (the model's format: no conversion per conv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alexnet2gpu.config import DataConfig
from alexnet2gpu.data.stats import DataStats


def resize(x: torch.Tensor, size: int, antialias: bool | None = None) -> torch.Tensor:
    """Bilinear resize of a square batch (N, C, h, h) -> (N, C, size, size); a no-op at that size.
    `antialias=None` filters only when shrinking; True is torchvision's tensor `Resize`, which when
    enlarging differs from plain bilinear by float rounding alone (about 5e-7)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    antialias = x.shape[-1] > size if antialias is None else antialias
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


def crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int, flip: torch.Tensor | None = None):
    """Per-image crops (N, C, size, size) at (top[i], left[i]), mirrored where flip[i], in one gather."""
    n = x.shape[0]
    steps = torch.arange(size, device=x.device)
    rows = top[:, None] + steps  # (N, size); top, left and flip on x's device
    cols = left[:, None] + steps  # (N, size)
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = x[batch, :, rows[:, :, None], cols[:, None, :]]  # (N, size, size, C)
    return out.permute(0, 3, 1, 2)  # (N, C, size, size), channels-last in memory


def resize_matrix(src: int, dst: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(dst, src): the bilinear resize `resize` does along one axis, as a matrix (from the
    identity, so the weights are F.interpolate's own)."""
    eye = torch.eye(src, device=device)[None, None]  # (1, 1, src, src)
    return F.interpolate(eye, size=(src, dst), mode="bilinear", align_corners=False)[0, 0].T


def resized_crop(
    x: torch.Tensor, stage: int, top: torch.Tensor, left: torch.Tensor, size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """`crop(resize(x, stage), top, left, size, flip)` for images stored smaller than `stage`,
    without making the 256x256 image: the crop of a resize is two small matrix products per image,
    rows (size, h) @ x (h, w) @ cols (w, size)."""
    h, w = x.shape[-2:]
    steps = torch.arange(size, device=x.device)
    rows = resize_matrix(h, stage, x.device)[top[:, None] + steps]  # (N, size, h)
    col_index = left[:, None] + steps  # (N, size)
    if flip is not None:
        col_index = torch.where(flip[:, None], col_index.flip(1), col_index)
    cols = resize_matrix(w, stage, x.device)[col_index]  # (N, size, w)
    return rows[:, None] @ x @ cols[:, None].transpose(-1, -2)  # (N, C, size, size)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top = (x.shape[-2] - size) // 2
    left = (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


def ten_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """P 4.1 test time: four corners and the centre, then their mirrors: (N, C, S, S) -> (N, 10, C, s, s)."""
    h, w = x.shape[-2:]
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), ((h - size) // 2, (w - size) // 2)]
    patches = [x[..., top : top + size, left : left + size] for top, left in corners]
    patches += [p.flip(-1) for p in patches]
    return torch.stack(patches, dim=1)


def pca_noise(
    n: int, stats: DataStats, alpha_std: float, scale: str, pixel_scale: float, generator: torch.Generator
) -> torch.Tensor:
    """P 4.1: per image, eigvec @ (alpha * lambda) with alpha ~ N(0, alpha_std), added to every pixel.

    (N, C) on the 0-255 scale. `scale="stdev"` uses sqrt(lambda), as Krizhevsky's code did.
    """
    alpha = torch.randn((n, stats.eigval.numel()), generator=generator, dtype=stats.eigval.dtype) * alpha_std  # (N, C)
    weights = stats.eigval if scale == "eigenvalue" else stats.eigval.sqrt()
    return (alpha * weights) @ stats.eigvec.T * pixel_scale  # (N, C)


class Pipeline:
    """Stored uint8 batches -> network inputs, on `device`, for the paper's and Caffe's recipes
    (P 2, 4.1); `train` picks augmentation. `input_pipeline()` picks this class or `SeedPipeline`."""

    def __init__(
        self,
        config: DataConfig,
        stats: DataStats | None,
        device: torch.device | str,
        train: bool,
        *,
        channels_last: bool = False,
    ) -> None:
        if stats is None:
            raise ValueError(f"the {config.preset} preset needs the training set's statistics (mean image, PCA)")
        self.config, self.stats, self.device, self.train = config, stats, torch.device(device), train
        self.mean = stats.mean.to(self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.bgr = config.preset == "caffe"  # CF's networks take B, G, R (OpenCV's order)
        self.colour_noise = True  # the loop turns it off where the schedule says (run 145's from epoch 67)
        self.centre_mean = None  # (C, 224, 224): K12's one mean crop, scaled and in the channels' order
        if config.mean_crop == "centre":
            mean = resize(self.mean[None].to(torch.get_default_dtype()), config.stage_size)  # as `stage` resizes
            mean = center_crop(mean, config.crop_size)[0] * (config.pixel_scale / 255.0)
            self.centre_mean = mean.flip(0) if self.bgr else mean

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A small host tensor on the device without waiting: pinned, then copied asynchronously (the
        caching host allocator keeps the pinned buffer until the copy is done)."""
        if self.device.type == "cuda" and torch.cuda.is_available():
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True)

    def as_float(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) uint8 -> float on the device (float32 unless a test sets float64)."""
        return images.to(self.device, non_blocking=True).to(torch.get_default_dtype())

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) uint8 -> float at the stored size: mean image subtracted (P 2), unless it is
        subtracted from the crops (`mean_crop="centre"`); in BGR order for the caffe preset (the mean
        is kept in RGB, as the stored images)."""
        x = self.as_float(images)
        x = (x if self.centre_mean is not None else x - self.mean) * (self.config.pixel_scale / 255.0)
        return x.flip(1) if self.bgr else x  # (N, 3, h, w), RGB -> BGR for Caffe's weights

    def minus_centre_mean(self, x: torch.Tensor) -> torch.Tensor:
        """K12's mean: the centre crop of the mean image off every crop or view (..., C, 224, 224)."""
        return x if self.centre_mean is None else x - self.centre_mean

    def stage(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) uint8 -> (N, C, 256, 256) float, mean subtracted and resized (P 2)."""
        return resize(self.normalise(images), self.config.stage_size)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Network inputs (N, C, 224, 224): a random crop, flip and PCA noise when training (P 4.1),
        the centre crop otherwise.

        `rows=(start, total)`: `images` are rows `start` onwards of a global batch of `total`; the
        draws are made for the whole batch and this part takes its own, so a process feeding part of
        the batch augments its rows exactly as one process feeding all of it would."""
        config, size = self.config, self.config.crop_size
        if not self.train:
            x = self.minus_centre_mean(center_crop(self.stage(images), size))
            return x.contiguous(memory_format=self.memory_format)
        start, total = rows or (0, images.shape[0])
        n, span = images.shape[0], config.stage_size - size + 1
        total, mine = max(total, start + n), slice(start, start + n)
        generator = generator or torch.Generator().manual_seed(0)
        chunk = min(config.crop_chunk, total)  # a chunk past the batch is the batch: one draw for all of it
        chunks = -(-total // chunk)  # one offset and flip per run of crop_chunk images (K12: 32)
        params = [
            torch.randint(span, (chunks,), generator=generator),
            torch.randint(span, (chunks,), generator=generator),
        ]
        params.append(torch.rand(chunks, generator=generator) < 0.5 if config.flips else torch.zeros(chunks))
        params = [p.float().repeat_interleave(chunk)[:total, None] for p in params]  # exact in float32
        noised = config.pca_noise and self.colour_noise
        if noised:
            noise = pca_noise(total, self.stats, config.pca_alpha_std, config.pca_scale, config.pixel_scale, generator)
            params.append(noise.flip(1) if self.bgr else noise)  # (N, C) in the channels' order
        params = self.to_device(torch.cat(params, 1)[mine])  # (N, 3 + C): top, left, flip, PCA noise
        top, left, flip = params[:, 0].long(), params[:, 1].long(), params[:, 2].bool() if config.flips else None
        x = self.normalise(images)
        if x.shape[-1] == config.stage_size and x.shape[-2] == config.stage_size:
            x = crop(x, top, left, size, flip)
        else:
            x = resized_crop(x, config.stage_size, top, left, size, flip)
        x = self.minus_centre_mean(x).contiguous(memory_format=self.memory_format)
        if noised:
            x.add_(params[:, 3:, None, None])  # (N, C, 1, 1), in place: x is this call's own tensor
            if config.pca_rescale:  # K12: the noised crop shrunk by 1 + the noise's coefficient
                x.div_(1.0 + config.pca_alpha_std)
        return x

    def ten_crops(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) uint8 -> (N, 10, C, 224, 224): the paper's test-time patches."""
        return self.minus_centre_mean(ten_crop(self.stage(images), self.config.crop_size))  # flattened by the caller


class SeedPipeline(Pipeline):
    """The seed's recipe: Normalize, then Resize((224, 224)) of the whole image, as the seed writes
    it (torchvision's filter, so the values are torchvision's to the bit); no crops, flips or noise."""

    def __init__(
        self, config: DataConfig, stats: None, device: torch.device | str, train: bool, *, channels_last: bool = False
    ) -> None:
        self.config, self.stats, self.device, self.train = config, None, torch.device(device), train
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.bgr = False
        self.mean = self.centre_mean = None  # no mean image: the seed normalises by two numbers

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (self.as_float(images) / 255.0 - self.config.seed_mean) / self.config.seed_std

    def stage(self, images: torch.Tensor) -> torch.Tensor:
        return resize(self.normalise(images), self.config.crop_size, antialias=True)

    def __call__(self, images: torch.Tensor, generator=None, rows=None) -> torch.Tensor:
        return self.stage(images).contiguous(memory_format=self.memory_format)

    def ten_crops(self, images: torch.Tensor) -> torch.Tensor:
        raise ValueError("ten-crop needs crops (--preset k12, the default, or paper): the seed's pipeline has none")


def input_pipeline(
    config: DataConfig, stats: DataStats | None, device: torch.device | str, train: bool, *, channels_last: bool = False
) -> Pipeline:
    """The input pipeline of `config.preset`: the seed's, or the paper's (and Caffe's, its BGR twin)."""
    recipe = SeedPipeline if config.preset == "seed" else Pipeline
    return recipe(config, stats, device, train, channels_last=channels_last)
