"""Every layer's output has the spec's size, and the parameter count is the paper's."""

from __future__ import annotations

import pytest
import torch

from alexnet2gpu import AlexNet2GPU, AlexNetConfig, AlexNetFused

# ALEXNET-SPEC.md, per tower: (channels, height = width)
SPEC = {
    "conv1": (48, 55), "pool1": (48, 27), "conv2": (128, 27), "pool2": (128, 13),
    "conv3": (192, 13), "conv4": (192, 13), "conv5": (128, 13), "pool5": (128, 6),
}  # fmt: skip


def output_shapes(model: torch.nn.Module, prefix: str, x: torch.Tensor) -> dict[str, tuple]:
    shapes, hooks = {}, []

    def record(name: str):
        def hook(module, inputs, output) -> None:
            shapes[name] = output.shape

        return hook

    for name in SPEC:
        hooks.append(model.get_submodule(prefix + name).register_forward_hook(record(name)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return shapes


@pytest.mark.parametrize("input_size", [224, 227])
@pytest.mark.parametrize("tower", ["tower_a", "tower_b"])
def test_every_tower_layer_has_the_spec_shape(input_size: int, tower: str) -> None:
    model = AlexNet2GPU(AlexNetConfig(num_classes=10, input_size=input_size), devices=("cpu", "cpu")).eval()
    shapes = output_shapes(model, tower + ".", torch.randn(2, 3, input_size, input_size))
    assert {k: (v[1], v[2]) for k, v in shapes.items()} == SPEC
    assert all(v[0] == 2 and v[2] == v[3] for v in shapes.values())
    assert model(torch.randn(2, 3, input_size, input_size)).shape == (2, 10)


def test_fused_layers_are_both_towers_wide() -> None:
    model = AlexNetFused(AlexNetConfig(num_classes=10)).eval()
    shapes = output_shapes(model, "", torch.randn(2, 3, 224, 224))
    assert {k: (v[1], v[2]) for k, v in shapes.items()} == {k: (2 * c, s) for k, (c, s) in SPEC.items()}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_is_the_papers() -> None:
    with torch.device("meta"):  # counting needs no memory
        towers = AlexNet2GPU(devices=("meta", "meta"))
        fused = AlexNetFused()
    assert n_params(towers) == n_params(fused) == 60_965_224
    # K12's one fc8 on tower A: tower A holds it whole (4096 x 1000 + 1000), tower B none of it
    assert towers.tower_b.fc8 is None and towers.tower_a.fc8.out_features == 1000
    fc8 = 4096 * 1000 + 1000
    assert n_params(towers.tower_a) - fc8 == n_params(towers.tower_b) == (60_965_224 - fc8) // 2


def test_split_fc8_keeps_the_count_and_halves_it() -> None:
    with torch.device("meta"):
        towers = AlexNet2GPU(AlexNetConfig(fc8_split=True), devices=("meta", "meta"))
    assert towers.tower_b.fc8.out_features == towers.tower_a.fc8.out_features == 500
    assert n_params(towers) == 60_965_224
    assert n_params(towers.tower_a) == n_params(towers.tower_b) == 60_965_224 // 2


def test_one_gpu_comparison_net_is_more_than_half_the_size() -> None:
    # P 3.2, footnote 2: half the kernels in conv1-conv4, full conv5 and fc layers
    config = AlexNetConfig.one_gpu()
    with torch.device("meta"):
        one = AlexNetFused(config)
    assert (one.conv4.out_channels, one.conv5.out_channels, one.fc6.out_features) == (192, 256, 4096)
    assert 60_965_224 / 2 < n_params(one) < 60_965_224
    assert AlexNetFused(AlexNetConfig.one_gpu(num_classes=10)).eval()(torch.randn(1, 3, 224, 224)).shape == (1, 10)
    with pytest.raises(ValueError, match="towers=2"):
        AlexNet2GPU(config, devices=("cpu", "cpu"))


def test_seed_mnist_net_takes_one_channel() -> None:
    model = AlexNetFused(AlexNetConfig.seed_mnist()).eval()
    assert model(torch.randn(2, 1, 224, 224)).shape == (2, 10)
    assert isinstance(model.lrn1, torch.nn.Identity)


@pytest.mark.parametrize("pooling", ["overlapping", "non-overlapping"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_pooling_and_activation_variants_keep_the_shapes(pooling: str, activation: str) -> None:
    config = AlexNetConfig(num_classes=10, pooling=pooling, activation=activation, lrn=False)
    model = AlexNet2GPU(config, devices=("cpu", "cpu")).eval()
    assert model.tower_a.pool1.kernel_size == (3 if pooling == "overlapping" else 2)
    shapes = output_shapes(model, "tower_b.", torch.randn(1, 3, 224, 224))
    assert {k: (v[1], v[2]) for k, v in shapes.items()} == SPEC


@pytest.mark.parametrize(
    "shape, message",
    [((2, 1, 224, 224), r"expected \(N, 3, 224, 224\)"), ((2, 3, 227, 227), "224x224"), ((3, 224, 224), "shape")],
)
def test_wrong_input_says_what_was_expected(shape: tuple, message: str) -> None:
    model = AlexNet2GPU(AlexNetConfig(num_classes=10), devices=("cpu", "cpu"))
    with pytest.raises(ValueError, match=message):
        model(torch.randn(shape))


@pytest.mark.parametrize(
    "field, value",
    [("input_size", 225), ("towers", 3), ("pooling", "average"), ("activation", "gelu"), ("dropout", 1.0)],
)
def test_bad_config_is_rejected_by_name(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"AlexNetConfig.{field}"):
        AlexNetConfig(**{field: value})


def test_config_round_trips_through_a_dict() -> None:
    config = AlexNetConfig(num_classes=7, in_channels=1, pooling="non-overlapping")
    assert AlexNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown AlexNetConfig fields"):
        AlexNetConfig.from_dict({"classes": 7})
