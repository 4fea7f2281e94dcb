"""The paper's initialisation (P 5), reproducible from a seed."""

from __future__ import annotations

import pytest
import torch

from alexnet2gpu import AlexNet2GPU, AlexNetConfig, AlexNetFused


def build(seed: int) -> AlexNet2GPU:
    torch.manual_seed(seed)
    return AlexNet2GPU(AlexNetConfig(num_classes=10), devices=("cpu", "cpu"))


def test_weights_are_normal_with_std_001_and_biases_as_the_paper() -> None:
    model = build(0)
    for tower in (model.tower_a, model.tower_b):
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
            layer = getattr(tower, name)
            w = layer.weight
            assert abs(w.mean().item()) < 3 * 0.01 / w.numel() ** 0.5 + 1e-4, name
            assert w.std().item() == pytest.approx(0.01, rel=0.05 if w.numel() > 10_000 else 0.3), name
            bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
            assert torch.all(layer.bias == bias), name


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a, b, c = build(5).state_dict(), build(5).state_dict(), build(6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tower_a.conv1.weight"], c["tower_a.conv1.weight"])


def test_fused_model_has_the_same_init() -> None:
    torch.manual_seed(0)
    fused = AlexNetFused(AlexNetConfig(num_classes=10))
    assert fused.conv2.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(fused.conv4.bias == 1.0) and torch.all(fused.conv3.bias == 0.0)


def test_he_init_keeps_unit_scale_and_zero_biases() -> None:
    torch.manual_seed(0)
    model = AlexNet2GPU(AlexNetConfig(num_classes=10, init="he"), devices=("cpu", "cpu"))
    fc6 = model.tower_a.fc6
    assert fc6.weight.std().item() == pytest.approx((2 / fc6.in_features) ** 0.5, rel=0.02)
    assert all(torch.all(p == 0) for name, p in model.named_parameters() if name.endswith("bias"))
