"""The machine row of `make gpu-check`: what torch and nvidia-smi see, as JSON in the file named
on the command line; prints the number of CUDA devices torch sees (0 on any failure) for the shell.

    python tools/gpu_check_machine.py OUT/machine.out
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

NEEDED = ("torch", "torchvision", "numpy", "tqdm", "pytest")


def nvidia_smi() -> str:
    """One line per GPU (name, memory, driver), or why there is none; never raises nor hangs."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "not found on PATH"
    query = [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        return f"failed: {error}"
    text = (done.stdout if done.returncode == 0 else done.stderr or done.stdout).strip()
    return " | ".join(text.splitlines()) or f"exit {done.returncode}, no output"


def probe() -> dict:
    report: dict = {"python": sys.version.split()[0], "nvidia_smi": nvidia_smi()}
    report["missing"] = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if "torch" in report["missing"]:
        return report
    import torch

    report.update(torch=torch.__version__, cuda_build=torch.version.cuda, gpus=[])
    if torch.cuda.is_available():
        report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        from alexnet2gpu.devices import why_no_cuda

        report["why"] = why_no_cuda()
    return report


def main() -> None:
    out = Path(sys.argv[1])
    try:
        report = probe()
    except Exception as error:  # noqa: BLE001 - the row says what broke; the script goes on
        report = {"missing": [], "gpus": [], "why": f"probe failed: {error!r}"}
    out.write_text(json.dumps(report) + "\n")
    print(len(report.get("gpus") or []))


if __name__ == "__main__":
    main()
