"""Turn what a user asks for (`--devices cuda:0,cuda:1`) into two checked devices.

Used by the command line only: the model builds on whatever devices it is given, fake ones too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class DeviceError(ValueError):
    """A requested device does not exist on this machine."""


def available_devices() -> list[str]:
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["cpu", *cuda]


def default_devices() -> tuple[torch.device, torch.device]:
    """Both GPUs when there are two, both towers on cuda:0 with one, else on the CPU."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = ("cuda:0", "cuda:1") if count >= 2 else ("cuda:0", "cuda:0") if count == 1 else ("cpu", "cpu")
    return torch.device(names[0]), torch.device(names[1])


def resolve_devices(spec: str | Sequence[str] | None = None) -> tuple[torch.device, torch.device]:
    """Tower A's and tower B's devices from "cuda:0,cuda:1", "cuda:0" (both towers there) or None
    (the default for this machine). Raises DeviceError naming what exists and the fallback."""
    if spec is None or spec == "" or spec == "auto":
        return default_devices()
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    if len(names) == 1:
        names = names * 2
    if len(names) != 2:
        raise DeviceError(f"--devices takes one device or two (tower A, tower B), got {len(names)}: {spec!r}")
    devices = tuple(_check(name) for name in names)
    return devices[0], devices[1]


def _check(name: str) -> torch.device:
    available = available_devices()
    fallback = (
        "to put both towers on one device, use --devices cuda:0 (make train-1gpu)"
        if "cuda:0" in available
        else "this machine has no CUDA GPU: use --devices cpu (make train-1gpu runs on the CPU)"
    )
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"{name!r} is not a device name; available: {', '.join(available)}") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda" or str(device) not in available:
        raise DeviceError(f"device {name} does not exist here; available: {', '.join(available)}; {fallback}")
    return device
