"""The initialisations: the paper's (P 5), Caffe's bvlc_alexnet (CF) and He et al.'s, reproducible from a seed."""

from __future__ import annotations

import pytest
import torch

from alexnet2gpu import AlexNet2GPU, AlexNetConfig, AlexNetFused

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")  # P 5


def build(seed: int, init: str = "paper") -> AlexNet2GPU:
    torch.manual_seed(seed)
    # fc8 split, so that both towers hold every layer (K12's one fc8 on tower A: the test below)
    return AlexNet2GPU(AlexNetConfig(num_classes=10, init=init, fc8_split=True), devices=("cpu", "cpu"))


def check_layer(layer: torch.nn.Module, std: float, bias: float, name: str) -> None:
    w = layer.weight
    assert abs(w.mean().item()) < 3 * std / w.numel() ** 0.5 + 1e-4, name
    assert w.std().item() == pytest.approx(std, rel=0.05 if w.numel() > 10_000 else 0.3), name
    assert torch.all(layer.bias == bias), name


def test_weights_are_normal_with_std_001_and_biases_as_the_paper() -> None:
    model = build(0)
    for tower in (model.tower_a, model.tower_b):
        for name in LAYERS:
            check_layer(getattr(tower, name), 0.01, 1.0 if name in BIAS_ONE else 0.0, name)


def test_k12_init_is_the_2012_codes() -> None:
    model = build(0, "k12")  # K12 layers-145: initW 0.03 on conv3-conv5, 0.01 elsewhere; initB 1 as P's
    for tower in (model.tower_a, model.tower_b):
        for name in LAYERS:
            std = 0.03 if name in ("conv3", "conv4", "conv5") else 0.01
            check_layer(getattr(tower, name), std, 1.0 if name in BIAS_ONE else 0.0, name)


def test_the_default_one_fc8_on_tower_a_is_initialised_as_the_split_one() -> None:
    torch.manual_seed(0)
    model = AlexNet2GPU(AlexNetConfig(num_classes=1000), devices=("cpu", "cpu"))  # K12's defaults
    assert model.tower_b.fc8 is None and model.tower_a.fc8.weight.shape == (1000, 4096)
    check_layer(model.tower_a.fc8, 0.01, 0.0, "fc8")
    check_layer(model.tower_a.conv3, 0.03, 0.0, "conv3")


def test_caffe_init_is_bvlc_alexnets() -> None:
    model = build(0, "caffe")  # CF: N(0, 0.01), fc6 and fc7 N(0, 0.005); biases 0.1 where P has 1
    for tower in (model.tower_a, model.tower_b):
        for name in LAYERS:
            std = 0.005 if name in ("fc6", "fc7") else 0.01
            check_layer(getattr(tower, name), std, 0.1 if name in BIAS_ONE else 0.0, name)


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a, b, c = build(5).state_dict(), build(5).state_dict(), build(6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tower_a.conv1.weight"], c["tower_a.conv1.weight"])


def test_fused_model_has_the_same_init() -> None:
    torch.manual_seed(0)
    fused = AlexNetFused(AlexNetConfig(num_classes=10, init="paper"))
    assert fused.conv2.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(fused.conv4.bias == 1.0) and torch.all(fused.conv3.bias == 0.0)


def test_he_init_is_normal_with_std_sqrt_2_over_fan_in_and_zero_biases() -> None:
    model = build(0, "he")
    for tower in (model.tower_a, model.tower_b):
        for name in LAYERS:
            layer = getattr(tower, name)
            fan_in = layer.weight[0].numel()  # in_channels (of the tower's inputs) x kernel area
            check_layer(layer, (2 / fan_in) ** 0.5, 0.0, name)
