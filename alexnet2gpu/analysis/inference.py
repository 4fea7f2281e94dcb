"""A trained network, ready to look at: a checkpoint loaded for inference with its own preprocessing
and class names (`load_trained`), and its last hidden layer (`features`), which `predict`, Figure 4
and a user's own code share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alexnet2gpu.config import AlexNetConfig, DataConfig, TrainConfig
from alexnet2gpu.data.base import Categories
from alexnet2gpu.data.stats import DataStats
from alexnet2gpu.data.transforms import Pipeline, input_pipeline
from alexnet2gpu.devices import DeviceError, resolve_devices
from alexnet2gpu.model.alexnet import AlexNet2GPU, AlexNetFused, build_model
from alexnet2gpu.train import checkpoint as ckpt


@dataclass
class Trained:
    """A checkpoint's network in eval mode, with what it was trained with."""

    path: Path
    checkpoint: dict
    model: nn.Module
    pipeline: Pipeline  # the run's evaluation preprocessing: its mean image, input size and preset
    categories: Categories
    configs: tuple[AlexNetConfig, DataConfig, TrainConfig]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_trained(path: str | Path, devices: str | None = None) -> Trained:
    """The network of checkpoint `path` on `devices` (None: the run's own devices where this machine
    has them, else this machine's default), in eval mode."""
    path = Path(path)
    saved = ckpt.load(path)
    model_config, data, train = ckpt.read_configs(saved, path)
    if devices is None and train.devices:
        try:
            placed = resolve_devices(train.devices)
        except DeviceError:
            placed = resolve_devices(None)  # trained elsewhere: this machine's default
    else:
        placed = resolve_devices(devices)
    model = build_model(model_config, placed)
    ckpt.load_weights(model, saved["model"], path)
    stats = DataStats.from_dict(saved["stats"]) if saved.get("stats") else None
    pipeline = input_pipeline(data, stats, next(model.parameters()).device, train=False)
    categories = ckpt.categories(saved) or Categories.numbered(model_config.num_classes)
    return Trained(path, saved, model.eval(), pipeline, categories, (model_config, data, train))


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last hidden layer, fc7 after its ReLU, of both towers side by side (tower A's first):
    (N, 4096) for network inputs x (N, C, 224, 224), on tower A's device. P 6.1 compares images by
    the Euclidean distance of these vectors. The model is put in eval mode (no dropout)."""
    model.eval()
    if isinstance(model, AlexNet2GPU):
        a, b = model.hidden(x)
        return torch.cat([a, b.to(a.device)], dim=1)
    if isinstance(model, AlexNetFused):
        return model.hidden(x)
    raise TypeError(f"features() takes AlexNet2GPU or AlexNetFused, not {type(model).__name__}")
