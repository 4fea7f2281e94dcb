"""The benchmarks run and report what they claim (their numbers go to docs/BENCHMARKS.md, not here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alexnet2gpu.bench import bench_data, bench_imagenet, bench_models
from alexnet2gpu.config import AlexNetConfig
from alexnet2gpu.model.exchanges import exchanges, naive_exchanges, table


def test_model_bench_reports_every_model_and_the_ratios() -> None:
    result = bench_models(device="cpu", batches=(2,), repeats=1)
    json.dumps(result)  # --json prints it
    names = {"towers_one_device", "towers_nn_lrn", "towers_paper", "fused", "torchvision", "one_tower_mnist"}
    assert {(r["kind"], r["model"]) for r in result["rows"]} == {(k, n) for k in ("train", "infer") for n in names}
    flops = result["forward_gflop_per_image"]
    assert flops["towers_one_device"] == flops["fused"]  # one function, one cost
    assert flops["towers_one_device"] == pytest.approx(1.449, abs=0.001)
    assert flops["torchvision"] == pytest.approx(1.428, abs=0.001)
    assert result["train_ratio_vs_torchvision"] > 0 and result["train_ratio_towers_vs_fused"] > 0
    assert result["train_ratio_k12_vs_paper"] > 0
    assert all(r["median_ms"] > 0 and r["gflop_per_s"] > 0 for r in result["rows"])
    towers = result["memory"]["towers_one_device"]
    assert towers["params_mb"] == pytest.approx(60_965_224 * 4 / 2**20, abs=0.1)
    assert towers["saved_activations_mb_b64"] > 0


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="apt-get install dataset-fashion-mnist"
)
def test_data_bench_times_both_pipelines() -> None:
    result = bench_data(images=256, repeats=1)
    assert set(result["img_per_s"]) == {"paper_batched", "seed_per_sample"}
    assert all(v > 0 for v in result["img_per_s"].values()) and result["ratio_paper_vs_seed"] > 0


def test_imagenet_bench_times_the_live_and_the_staged_path() -> None:
    import torch

    result = bench_imagenet(images=12, repeats=1, workers=1)
    json.dumps(result)
    assert result["images"] == 12 and result["labels_equal"]
    assert {"raw_img_per_s_per_worker", "staged_img_per_s_per_worker", "ratio_staged_vs_raw"} <= result.keys()
    assert all(v > 0 for v in result["img_per_s"].values()) and result["ratio_staged_vs_raw"] > 0
    assert 60 < result["raw_kb_per_image"] < 130  # ImageNet-like file sizes
    assert 0 < result["staged_kb_per_image"] < result["raw_kb_per_image"]
    assert 0 < result["mean_abs_diff_staged_vs_live"] < 4
    assert (result["gpu_decode_img_per_s"] is None) == (not torch.cuda.is_available())
    cores = result["cores_for_img_per_s"]
    assert cores["img_per_s"] == 10_700 and 0 < cores["staged"] <= cores["raw"]


def test_paper_split_moves_a_quarter_of_a_naive_split() -> None:
    k12 = sum(row.step_bytes() for row in exchanges())
    paper = sum(row.step_bytes() for row in exchanges(AlexNetConfig(fc8_split=True)))
    naive = sum(row.step_bytes() for row in naive_exchanges())
    assert k12 == 468_992  # 2 x (2 x (21,632 + 4,608 + 2,048) + 2,048 one way into fc8) floats x 4 bytes
    assert paper == 489_376  # 2 x (2 x (21,632 + 4,608 + 2,048 + 2,048) + 500 logits) floats x 4 bytes
    assert naive > 4 * paper
    assert "conv3 input (pool2)" in table()


def test_profile_names_the_ops_of_one_step() -> None:
    from alexnet2gpu.bench import profile_step

    table = profile_step("towers_one_device", batch=2, rows=40)
    assert "aten::convolution_backward" in table and "_LocalResponseNormBackward" in table
    with pytest.raises(ValueError, match="--profile takes one of"):
        profile_step("resnet")
