"""Helpers shared by the tests: the CPU placement and the small network and fake data most training
tests run, random weights that make every layer matter, and comparisons. The file builders (Caffe's
files, image trees, ImageNet's archives) are in tests/builders/."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from alexnet2gpu.config import AlexNetConfig, DataConfig

CPU = (torch.device("cpu"), torch.device("cpu"))  # both towers on the CPU
# the paper's layout, narrower: a training step takes tens of milliseconds on the CPU
SMALL = AlexNetConfig(num_classes=10, init="he", conv_channels=(16, 32, 48, 48, 32), fc_features=(64, 64))
# a generated set, its statistics fitted on 64 images, decoded in this process
FAKE = DataConfig(dataset="fake", preset="paper", subset=16, fit_images=64, pixel_scale=1.0, workers=0)


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """He-scaled random weights and biases, drawn on the CPU so every device gets the same values.

    The paper's N(0, 0.01) init shrinks activations layer by layer; these keep them O(1) to O(10)
    through all eight layers, so LRN, pooling and every exchange visibly shape the logits.
    """
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        fan_in = p[0].numel() if p.dim() > 1 else 1
        values = torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5 * (1.0 if p.dim() > 1 else 0.5)
        p.copy_(values)
    return model


def rel_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x - y| / max |y|: float32 rounding through AlexNet stays near 1e-6."""
    x, y = x.detach().float().cpu(), y.detach().float().cpu()
    return ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()


def pixels(*shape: int, seed: int = 1) -> torch.Tensor:
    """Inputs on the paper's scale: mean-subtracted 0-255 pixels (std about 60), where LRN's
    alpha * sum(a^2) is comparable to k and so changes the result."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 60.0


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch) -> None:
    """Fitted data statistics go to a cache of the test session's own, not ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def images() -> torch.Tensor:
    return pixels(3, 3, 224, 224)


@pytest.fixture
def immutable():
    """Makes a folder immutable (chattr +i: no file made, renamed or removed in it, root included, which
    file modes do not stop), and mutable again after the test."""
    made: list[Path] = []

    def make(folder: Path) -> Path:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not allowed here (needs CAP_LINUX_IMMUTABLE)")
        made.append(folder)
        return folder

    yield make
    for folder in made:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
