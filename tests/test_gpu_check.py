"""`make gpu-check` on the CPU: its table has a row for every check with the right status, whatever the
checks left behind (nothing, an empty or garbled JSON, a timeout), and its shell part runs through with a
stub Python that plays a GPU machine. Seconds, no torch in the subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check_summary as summary  # noqa: E402

BENCH = {
    "rows": [{"kind": "train", "model": "towers_one_device", "batch": 64, "img_per_s": 4321.5}],
    "train_ratio_vs_torchvision": 0.812,
    "train_ratio_towers_vs_fused": 0.95,
    "matmul_gflop_per_s": 51234.0,
}
DATA = {"device": "cuda:0", "img_per_s": {"paper_batched": 90000, "seed_per_sample": 3000}, "ratio_paper_vs_seed": 30.0}
IMAGENET = {"ratio_staged_vs_raw": 3.1, "staged_img_per_s_all_workers": 12000, "gpu_decode_img_per_s": 8000}
MACHINE = {"missing": [], "torch": "2.11.0", "cuda_build": "13.0", "gpus": ["NVIDIA H100"], "nvidia_smi": "H100"}


def leave(out: Path, name: str, rc: int | None = 0, stdout: str = "", stderr: str = "", seconds: int = 3) -> None:
    """What tools/gpu_check.sh's check() leaves for one command."""
    (out / f"{name}.out").write_text(stdout)
    (out / f"{name}.log").write_text(stderr)
    if rc is not None:
        (out / f"{name}.rc").write_text(f"{rc} {seconds} 90\n")


def losses(out: Path, name: str, scale: float = 1.0) -> None:
    (out / name).mkdir()
    rows = "".join(f"{s},0,0.001,{(2.3 - 0.01 * s) * scale},0.9,100\n" for s in range(1, 21))
    (out / name / "train.csv").write_text("step,epoch,lr,loss,top1_err,img_per_s\n" + rows)


def table(out: Path, rel_tol: float = 2e-3) -> dict[str, tuple[str, str]]:
    return {name: (status, detail) for name, status, detail in summary.summarise(out, rel_tol)}


def test_every_row_is_there_with_what_each_check_left(tmp_path: Path) -> None:
    leave(tmp_path, "machine", stdout=json.dumps(MACHINE))
    leave(tmp_path, "gpu_tests", stdout="....\n4 passed, 1 deselected in 9.1s\n")
    (tmp_path / "gpu_tests_2gpu.skip").write_text("needs 2 GPUs; torch sees 1\n")
    leave(tmp_path, "bench_fp32", stdout="")  # exit 0, nothing printed
    leave(tmp_path, "bench_bf16", stdout='{"rows": [{"kind": "tr')  # cut off mid-line
    leave(tmp_path, "bench_channels_last", stdout="a warning first\n" + json.dumps(BENCH) + "\n")
    leave(tmp_path, "bench_data", stdout=json.dumps(DATA))
    leave(tmp_path, "bench_imagenet", rc=124, stderr="staging 400/1000\n")
    err = "Traceback (most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA out of memory.\n"
    leave(tmp_path, "bench_bf16_channels_last_compile", rc=1, stderr=err)
    # train_2epochs never ran: the script stopped before it
    for name in summary.AGREEMENT:
        (tmp_path / f"{name}.skip").write_text("needs 2 GPUs; torch sees 1")
    rows = table(tmp_path)
    assert list(rows)[: len(summary.KEYS)] == list(summary.KEYS)
    assert rows["machine"] == ("PASS", "1 x NVIDIA H100; torch 2.11.0 (CUDA 13.0); nvidia-smi: H100")
    assert rows["gpu_tests"] == ("PASS", "4 passed, 1 deselected in 9.1s")
    assert rows["gpu_tests_2gpu"] == rows["agree_2gpu"] == ("SKIP", "needs 2 GPUs; torch sees 1")
    assert rows["bench_fp32"] == ("FAIL", "no output in bench_fp32.out (empty or missing)")
    assert rows["bench_bf16"][0] == "FAIL" and rows["bench_bf16"][1].startswith("garbled JSON in bench_bf16.out")
    assert rows["bench_channels_last"][0] == "PASS" and "4,322 img/s" in rows["bench_channels_last"][1]
    assert rows["bench_data"] == ("PASS", "paper pipeline 90,000 img/s on cuda:0, 30.0x the seed's per-sample one")
    assert rows["bench_imagenet"] == ("FAIL", "timed out after 90 s; last line: staging 400/1000")
    compiled = rows["bench_bf16_channels_last_compile"]
    assert compiled == ("FAIL", "exit 1: torch.OutOfMemoryError: CUDA out of memory.")
    assert rows["train_2epochs"][0] == "FAIL" and rows["train_2epochs"][1].startswith("did not run")
    assert summary.main([str(tmp_path)]) == 1
    printed = (tmp_path / "summary.txt").read_text()
    assert all(name in printed for name in summary.KEYS) and "4 passed, 5 failed, 5 skipped" in printed


@pytest.mark.parametrize(
    "scale, status, detail",
    [
        (1.0, "PASS", "2gpu 0.0e+00, torchrun 0.0e+00 (tol 0.002)"),
        (1.0001, "PASS", "torchrun 1.0e-04 (tol 0.002)"),
        (1.01, "FAIL", "torchrun 1.0e-02 (tol 0.002)"),
    ],
)
def test_the_three_placements_losses_are_compared(tmp_path: Path, scale: float, status: str, detail: str) -> None:
    for name in summary.AGREEMENT:
        leave(tmp_path, name)
        losses(tmp_path, name, scale if name == "train_torchrun_20" else 1.0)
    status_, detail_ = table(tmp_path)["agree_2gpu"]
    assert status_ == status and detail_.endswith(detail) and "over 20 steps" in detail_


def test_a_failed_or_garbled_run_fails_the_comparison(tmp_path: Path) -> None:
    for name in summary.AGREEMENT:
        leave(tmp_path, name)
        losses(tmp_path, name)
    (tmp_path / "train_2gpu_20" / "train.csv").write_text("step,loss\n1,nan-ish\n")
    assert table(tmp_path)["train_2gpu_20"][0] == "FAIL"
    assert table(tmp_path)["agree_2gpu"] == ("FAIL", "needs train_2gpu_20 to pass first")


def test_an_empty_folder_fails_every_row_but_prints_them(tmp_path: Path) -> None:
    rows = table(tmp_path)
    assert set(rows) == set(summary.KEYS)
    assert {status for status, _ in rows.values()} == {"FAIL"}


# ---------------------------------------------------------------------------------------------
# the shell part, with a stub PY: a two-GPU machine whose checks pass, fail, print nothing or garble

STUB = r"""#!/usr/bin/env bash
# plays `python` for tools/gpu_check.sh; anything it does not know goes to the real Python
out_dir() { while [ $# -gt 0 ]; do [ "$1" = --out ] && { echo "$2"; return; }; shift; done; }
csv() {  # csv RUN_DIR SCALE: 20 steps of losses
  mkdir -p "$1"; echo "step,epoch,lr,loss,top1_err,img_per_s" > "$1/train.csv"
  for s in $(seq 1 20); do
    echo "$s,0,0.001,$(awk "BEGIN { print (2.3 - 0.01 * $s) * $2 }"),0.9,100" >> "$1/train.csv"
  done
}
case "$*" in
  *gpu_check_machine.py*) echo "$MACHINE_JSON" > "$2"; echo "$STUB_GPUS";;
  *"-m pytest"*"-k cuda1"*) echo "F"; echo "FAILED tests/test_gpu.py::test_x[cuda0+cuda1] - AssertionError: boom"
                       echo "1 failed in 2.0s"; exit 1;;
  *"-m pytest"*) echo "5 passed, 1 deselected in 3.0s";;
  *torch.distributed.run*) csv "$(out_dir "$@")" 1.0001; echo '{"step": 20}';;
  *"alexnet2gpu train"*) csv "$(out_dir "$@")" 1; echo '{"step": 20, "epoch": 0, "val": {"top1_err": 0.5}}';;
  *"bench"*"--compile"*) exit 124;;
  *"bench"*"--amp bf16"*) echo "{garbled";;
  *"bench --imagenet"*) ;;  # exit 0 and no JSON
  *bench*) echo "$BENCH_JSON";;
  *) exec "$REAL_PYTHON" "$@";;
esac
"""


def run_script(tmp_path: Path, gpus: int, fashion: bool) -> subprocess.CompletedProcess:
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    fashion_dir = tmp_path / "fashion"
    if fashion:
        fashion_dir.mkdir()
    env = {
        **os.environ,
        "PY": str(stub),
        "OUT": str(tmp_path / "out"),
        "REAL_PYTHON": sys.executable,
        "STUB_GPUS": str(gpus),
        "MACHINE_JSON": json.dumps({**MACHINE, "gpus": ["NVIDIA H100"] * gpus}),
        "BENCH_JSON": json.dumps(BENCH),
        "GPU_CHECK_FASHION_DIRS": str(fashion_dir),
    }
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=60
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def printed_rows(stdout: str) -> dict[str, tuple[str, str]]:
    table_lines = stdout.split("== summary", 1)[1].splitlines()
    rows = {}
    for line in table_lines:
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1] in ("PASS", "FAIL", "SKIP"):
            rows[parts[0]] = (parts[1], parts[2])
    return rows


def test_the_script_on_a_stub_two_gpu_machine(tmp_path: Path) -> None:
    done = run_script(tmp_path, gpus=2, fashion=False)
    assert done.returncode == 1
    rows = printed_rows(done.stdout)
    assert list(rows) == list(summary.KEYS)
    assert "data: the fake set (no Fashion-MNIST in:" in done.stdout
    expected = {
        "machine": "PASS",
        "gpu_tests": "PASS",
        "gpu_tests_2gpu": "FAIL",
        "bench_fp32": "PASS",
        "train_2epochs": "PASS",
        "train_1gpu_20": "PASS",
        "train_2gpu_20": "PASS",
        "train_torchrun_20": "PASS",
        "agree_2gpu": "PASS",
        "bench_bf16": "FAIL",
        "bench_channels_last": "PASS",
        "bench_data": "SKIP",
        "bench_imagenet": "FAIL",
        "bench_bf16_channels_last_compile": "FAIL",
    }
    assert {name: status for name, (status, _) in rows.items()} == expected
    assert rows["gpu_tests_2gpu"][1] == "exit 1: FAILED tests/test_gpu.py::test_x[cuda0+cuda1] - AssertionError: boom"
    assert rows["agree_2gpu"][1].endswith("2gpu 0.0e+00, torchrun 1.0e-04 (tol 0.002)")
    assert rows["bench_bf16_channels_last_compile"][1].startswith("timed out after")
    assert rows["bench_data"][1].startswith("the data bench needs Fashion-MNIST")
    # the 20-step runs got the same flags, each its own placement
    assert (tmp_path / "out" / "train_torchrun_20" / "train.csv").exists()


def test_the_script_on_a_machine_where_torch_sees_no_gpu(tmp_path: Path) -> None:
    done = run_script(tmp_path, gpus=0, fashion=True)
    assert done.returncode == 1
    rows = printed_rows(done.stdout)
    assert list(rows) == list(summary.KEYS)
    assert rows["machine"][0] == "FAIL" and "sees no CUDA device" in rows["machine"][1]
    assert {status for name, (status, _) in rows.items() if name != "machine"} == {"SKIP"}
    assert rows["train_2gpu_20"] == ("SKIP", "needs 2 GPUs; torch sees 0")
