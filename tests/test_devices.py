"""Asking for devices: what exists is accepted, what does not is refused with the fallback named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from alexnet2gpu import DeviceError, resolve_devices
from alexnet2gpu.devices import why_no_cuda


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


# --- a GPU that torch cannot see: a driver older than the wheel's CUDA build


def fake_nvidia_smi(folder: Path, body: str) -> None:
    """An executable `nvidia-smi` in `folder`, a shell script running `body`."""
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)


OLD_DRIVER = """case "$1" in
  -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"; echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)";;
  --query-gpu=driver_version) echo 535.104.05; echo 535.104.05;;
  *) exit 2;;
esac"""


def test_gpus_torch_cannot_see_are_explained(tmp_path: Path, monkeypatch) -> None:
    fake_nvidia_smi(tmp_path, OLD_DRIVER)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    line = why_no_cuda()
    assert "\n" not in line
    assert "lists 2 GPU(s) (driver 535.104.05)" in line
    assert f"torch {torch.__version__}, built for CUDA 13.0, sees none" in line
    assert "--index-url https://download.pytorch.org/whl/cu126" in line and "make setup TORCH_PIN=`" in line


def test_no_nvidia_smi_or_a_broken_one_says_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    assert why_no_cuda() is None
    fake_nvidia_smi(tmp_path, "echo 'NVIDIA-SMI has failed: no driver'; exit 9")
    assert why_no_cuda() is None
    fake_nvidia_smi(tmp_path, "exec sleep 5")
    assert why_no_cuda(timeout=0.2) is None  # a hung driver does not hang the caller


def test_a_cpu_only_torch_is_named_as_such(tmp_path: Path, monkeypatch) -> None:
    fake_nvidia_smi(tmp_path, OLD_DRIVER.replace("echo 535.104.05; echo 535.104.05", "exit 3"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "(driver unknown)" in why_no_cuda() and "built for no CUDA (a CPU-only build)" in why_no_cuda()


def test_a_gpu_torch_sees_needs_no_explanation(tmp_path: Path, monkeypatch) -> None:
    fake_nvidia_smi(tmp_path, OLD_DRIVER)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert why_no_cuda() is None
