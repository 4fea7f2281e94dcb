"""alexnet2gpu: the 2012 AlexNet as it was trained, split into two towers on two devices."""

from alexnet2gpu.config import AlexNetConfig
from alexnet2gpu.devices import DeviceError, resolve_devices
from alexnet2gpu.model.alexnet import AlexNet2GPU, AlexNetFused, fused_to_towers, towers_to_fused

__all__ = [
    "AlexNet2GPU",
    "AlexNetConfig",
    "AlexNetFused",
    "DeviceError",
    "fused_to_towers",
    "resolve_devices",
    "towers_to_fused",
]
