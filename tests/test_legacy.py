"""A checkpoint written before the K12 fields existed (tests/data/checkpoint-2026-12, saved by the code of
2026-12-03: two towers of 8 channels, 2 steps on fake data) rebuilds the network it was trained as."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import rel_diff

from alexnet2gpu.analysis.inference import load_trained
from alexnet2gpu.config import AlexNetConfig, DataConfig, TrainConfig
from alexnet2gpu.train import checkpoint as ckpt

OLD = Path(__file__).parent / "data" / "checkpoint-2026-12"


def test_the_old_checkpoint_lacks_the_new_fields_and_gets_the_values_it_was_trained_with() -> None:
    saved = torch.load(OLD / "last.pt", weights_only=False)["config"]
    for name, config in (("model", AlexNetConfig), ("data", DataConfig), ("train", TrainConfig)):
        assert config.LEGACY and not set(config.LEGACY) & set(saved[name]) - {"bias_rule"}, name
    model, data, train = ckpt.read_configs(ckpt.load(OLD / "last.pt"), OLD / "last.pt")
    assert (model.lrn1_input, model.spatial_norm, model.dropout_scale) == ("relu", False, "train")
    assert (data.mean_crop, data.pca_rescale, data.crop_chunk) == ("own", False, 1)
    assert train.schedule == "plateau" and train.bias_rule == saved["train"]["bias_rule"]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_old_checkpoint_computes_the_logits_it_computed_when_saved(mode: str) -> None:
    expected = json.loads((OLD / "logits.json").read_text())
    model = load_trained(OLD / "last.pt", "cpu").model
    x = torch.randn((2, 3, 224, 224), generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(8)
    masks = tuple(tuple(torch.bernoulli(torch.full((2, 4), 0.5), generator=g) for _ in range(2)) for _ in range(2))
    with torch.no_grad():
        logits = model.eval()(x) if mode == "eval" else model.train()(x, masks)
    assert rel_diff(logits, torch.tensor(expected[mode])) < 1e-5


def test_caffes_recipe_keeps_caffes_function_whatever_the_defaults() -> None:
    """Nothing of K12 reaches `--preset caffe` or an imported checkpoint: its choices are named, not defaulted."""
    from alexnet2gpu.config import recipe

    net = AlexNetConfig.caffe()
    assert (net.lrn1_input, net.spatial_norm, net.fc8_split, net.dropout_scale, net.init) == (
        "relu",
        False,
        True,
        "train",
        "caffe",
    )
    data = DataConfig(dataset="imagenet", preset="caffe", **recipe("caffe", "data"))
    assert (data.mean_crop, data.pca_rescale, data.crop_chunk) == ("own", False, 1)
    assert TrainConfig(**recipe("caffe", "train")).schedule == "plateau"
