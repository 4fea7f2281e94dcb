"""The seed's network (`AlexNetConfig.seed_mnist`) is the seed's module layer for layer, with
PyTorch's default init, and `--preset seed` is its input pipeline."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from conftest import pixels, randomise, rel_diff
from torch import nn

from alexnet2gpu import AlexNet2GPU, AlexNetConfig, AlexNetFused
from alexnet2gpu.cli import add_model_args, model_config
from alexnet2gpu.config import DataConfig
from alexnet2gpu.data.transforms import input_pipeline
from alexnet2gpu.model.layers import init_weights


def seed_module() -> nn.Sequential:
    """The seed's network as the issue lists it, written out in plain PyTorch."""
    return nn.Sequential(
        nn.Conv2d(1, 96, 11, 4, 0), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 384, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(384, 384, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Flatten(),
        nn.Linear(6400, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, 1000), nn.ReLU(),
        nn.Linear(1000, 10),
    )  # fmt: skip


# the preset's layer names, in the order of the Sequential's conv and linear layers
NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc_hidden", "fc8")


def seed_state(model: AlexNetFused) -> dict[str, torch.Tensor]:
    """The preset's weights under the Sequential's keys (`0.weight`, `3.weight`, ...)."""
    layers = [i for i, m in enumerate(seed_module()) if isinstance(m, (nn.Conv2d, nn.Linear))]
    state = model.state_dict()
    return {f"{i}.{p}": state[f"{name}.{p}"] for i, name in zip(layers, NAMES, strict=True) for p in ("weight", "bias")}


def test_seed_preset_has_the_seeds_map_sizes_and_parameter_count() -> None:
    model = AlexNetFused(AlexNetConfig.seed_mnist()).eval()
    sizes = {}
    for name in ("conv1", "pool1", "pool2", "pool5"):
        model.get_submodule(name).register_forward_hook(lambda m, i, out, name=name: sizes.update({name: out.shape}))
    with torch.no_grad():
        assert model(torch.randn(2, 1, 224, 224)).shape == (2, 10)
    assert {k: v[-1] for k, v in sizes.items()} == {"conv1": 54, "pool1": 26, "pool2": 12, "pool5": 5}
    assert sizes["pool5"][1:] == (256, 5, 5) and model.fc6.in_features == 6400
    assert isinstance(model.lrn1, nn.Identity) and model.conv2.groups == model.conv4.groups == 1
    assert sum(p.numel() for p in model.parameters()) == 50_830_786
    assert sum(p.numel() for p in seed_module().parameters()) == 50_830_786  # the count, checked


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_seed_preset_computes_what_the_seeds_module_computes(mode: str) -> None:
    model = randomise(AlexNetFused(AlexNetConfig.seed_mnist()))
    reference = seed_module()
    reference.load_state_dict(seed_state(model))
    x = pixels(3, 1, 224, 224) / 60.0
    model.train(mode == "train"), reference.train(mode == "train")
    torch.manual_seed(7)  # the same dropout masks: both draw them in the same order and shapes
    ours = model(x)
    torch.manual_seed(7)
    theirs = reference(x)
    assert torch.equal(ours, theirs)
    torch.manual_seed(8)
    assert mode == "eval" or not torch.equal(model(x), theirs)  # dropout acts in training


def test_torch_init_draws_pytorchs_defaults_in_the_seeds_order() -> None:
    model = AlexNetFused(AlexNetConfig.seed_mnist())
    assert model.config.init == "torch"
    for name in NAMES:
        layer = model.get_submodule(name)
        bound = 1 / math.sqrt(layer.weight[0].numel())  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), ..)
        for p in (layer.weight, layer.bias):
            assert p.abs().max().item() <= bound * (1 + 1e-6), name  # float32 rounding of the bound
        assert layer.weight.abs().max().item() > 0.99 * bound, name  # uniform, filling its range
        assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name
    torch.manual_seed(3)
    init_weights(model, "torch")
    torch.manual_seed(3)
    reference = seed_module().state_dict()  # drawn at construction, layer by layer
    ours = seed_state(model)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in reference)


def test_torch_init_differs_from_the_papers() -> None:
    torch.manual_seed(0)
    towers = AlexNet2GPU(AlexNetConfig(num_classes=10, init="torch"), devices=("cpu", "cpu"))
    conv2 = towers.tower_b.conv2  # fan_in 48 * 25 per tower, as in the fused grouped conv
    assert conv2.bias.abs().max().item() <= 1 / math.sqrt(48 * 25) and not torch.all(conv2.bias == 1.0)


def test_unpadded_conv1_keeps_towers_and_fused_one_function() -> None:
    config = AlexNetConfig(num_classes=10, conv1_padding="none")
    towers = randomise(AlexNet2GPU(config, devices=("cpu", "cpu")))
    fused = AlexNetFused.from_towers(towers)
    assert towers.tower_a.fc6.in_features == fused.fc6.in_features == 256 * 5 * 5
    x = pixels(2, 3, 224, 224)
    with torch.no_grad():
        assert rel_diff(towers.eval()(x), fused.eval()(x)) < 1e-5


@pytest.mark.parametrize(
    "fields", [dict(fc_hidden=1000), dict(towers=1, fc_hidden=0), dict(conv1_padding="227"), dict(init="caffe2")]
)
def test_seed_fields_are_checked(fields: dict) -> None:
    with pytest.raises(ValueError, match=f"AlexNetConfig.{next(iter(fields.keys() - {'towers'}))}"):
        AlexNetConfig(**fields)


def test_seed_config_round_trips_and_old_configs_keep_their_network() -> None:
    config = AlexNetConfig.seed_mnist()
    assert AlexNetConfig.from_dict(config.to_dict()) == config
    old = {k: v for k, v in AlexNetConfig().to_dict().items() if k not in ("conv1_padding", "fc_hidden")}
    assert AlexNetConfig.from_dict(old).map_sizes == (55, 27, 13, 6)  # checkpoints written before the fields


def test_cli_net_seed_builds_the_seeds_network() -> None:
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    assert model_config(parser.parse_args(["--net", "seed"]), 10, 1) == AlexNetConfig.seed_mnist()
    assert model_config(parser.parse_args(["--net", "seed", "--init", "he"]), 10, 1).init == "he"
    parser.add_argument("--preset", default="k12")
    paper = parser.parse_args(["--net", "seed", "--preset", "paper", "--init", "he"])  # the preset leaves it alone
    assert model_config(paper, 10, 1) == AlexNetConfig.seed_mnist(init="he")
    assert model_config(parser.parse_args([]), 1000, 3) == AlexNetConfig()  # K12's, its own init
    assert model_config(parser.parse_args(["--preset", "paper"]), 1000, 3) == AlexNetConfig(
        lrn1_input="relu", spatial_norm=False, fc8_split=True, init="paper"
    )


@pytest.mark.parametrize("train", [True, False])
def test_seed_pipeline_is_torchvisions_normalize_then_resize(train: bool) -> None:
    transforms = pytest.importorskip("torchvision.transforms")
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    ours = input_pipeline(DataConfig(dataset="fashion-mnist", preset="seed"), None, "cpu", train=train)(images)
    seed = transforms.Compose([transforms.Normalize((0.1307,), (0.3081,)), transforms.Resize((224, 224))])
    assert torch.equal(ours, seed(images.float() / 255))
