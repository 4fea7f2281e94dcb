"""Turn what a user asks for (`--devices cuda:0,cuda:1`) into two checked devices.

Used by the command line only: the model builds on whatever devices it is given, fake ones too.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

import torch

# torch's CUDA 12 build of the pinned version, for a driver too old for the default CUDA 13 wheel
CUDA12_PIN = "torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu126"


class DeviceError(ValueError):
    """A requested device does not exist on this machine."""


def _nvidia_smi(*args: str, timeout: float) -> str:
    """nvidia-smi's output, or "" when it is not on PATH, fails or hangs (a wedged driver can)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ""
    try:
        done = subprocess.run([smi, *args], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def why_no_cuda(timeout: float = 5.0) -> str | None:
    """One line when torch sees no CUDA device although nvidia-smi lists GPUs, else None.

    The usual cause: the pinned torch wheel is built for CUDA 13, and an older driver makes
    `torch.cuda.is_available()` False, so a run would quietly take the CPU. The line names torch's
    version and CUDA build, the driver, and the two fixes.
    """
    if torch.cuda.is_available():
        return None
    gpus = [line for line in _nvidia_smi("-L", timeout=timeout).splitlines() if line.startswith("GPU")]
    if not gpus:
        return None
    drivers = _nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader", timeout=timeout).split()
    driver = drivers[0] if drivers else "unknown"
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
    return (
        f"nvidia-smi lists {len(gpus)} GPU(s) (driver {driver}) but torch {torch.__version__}, built for {build}, "
        f"sees none (a driver older than torch's CUDA build does this): install torch's CUDA 12 build with "
        f'`make clean && make setup TORCH_PIN="{CUDA12_PIN}"`, or keep this machine\'s own torch with '
        f"`make clean && make setup TORCH_PIN=`"
    )


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
