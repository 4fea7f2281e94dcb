"""Asking for devices: what exists is accepted, what does not is refused with the fallback named."""

from __future__ import annotations

import pytest
import torch

from alexnet2gpu import DeviceError, resolve_devices


def test_cpu_puts_both_towers_on_the_cpu() -> None:
    assert resolve_devices("cpu") == (torch.device("cpu"), torch.device("cpu"))
    assert resolve_devices(["cpu", "cpu"]) == (torch.device("cpu"), torch.device("cpu"))


def test_default_is_a_device_this_machine_has() -> None:
    devices = resolve_devices(None)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    expected = {0: ["cpu", "cpu"], 1: ["cuda:0", "cuda:0"]}.get(count, ["cuda:0", "cuda:1"])
    assert [str(d) for d in devices] == expected


def test_missing_gpu_names_what_exists_and_the_fallback(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [str(d) for d in resolve_devices("cuda")] == ["cuda:0", "cuda:0"]
    with pytest.raises(DeviceError, match=r"cuda:1 does not exist.*cpu, cuda:0.*--devices cuda:0.*train-1gpu"):
        resolve_devices("cuda:0,cuda:1")


def test_cuda_without_cuda_points_at_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"available: cpu;.*no CUDA GPU.*--devices cpu"):
        resolve_devices("cuda:0")


@pytest.mark.parametrize("spec, message", [("cuda:0,cuda:1,cpu", "one device or two"), ("gpu0", "not a device")])
def test_malformed_device_lists(spec: str, message: str) -> None:
    with pytest.raises(DeviceError, match=message):
        resolve_devices(spec)
