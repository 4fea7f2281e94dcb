"""The two towers and the fused (grouped) model are one function: same logits, same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import pixels, randomise, rel_diff

from alexnet2gpu import AlexNet2GPU, AlexNetConfig, AlexNetFused, fused_to_towers, towers_to_fused

# float32 through eight layers, summed in different orders by grouped and split convolutions
TOL = 1e-5


def twins(config: AlexNetConfig, seed: int = 0) -> tuple[AlexNet2GPU, AlexNetFused]:
    towers = randomise(AlexNet2GPU(config, devices=("cpu", "cpu")), seed)
    return towers, AlexNetFused.from_towers(towers)


def logits_diff(towers: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return rel_diff(towers.eval()(x), fused.eval()(x))


def grads(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train().zero_grad()
    F.cross_entropy(model(x), labels).backward()
    return {name: p.grad for name, p in model.named_parameters()}


CONFIGS = {
    "paper": AlexNetConfig(),
    "227-tanh-nonoverlapping": AlexNetConfig(
        num_classes=7, input_size=227, activation="tanh", pooling="non-overlapping"
    ),
    "fc8-on-tower-a": AlexNetConfig(num_classes=10, fc8_split=False),
    "grayscale-odd-classes": AlexNetConfig(num_classes=11, in_channels=1),
    # Caffe's bvlc_alexnet: LRN over all channels, across the towers (a 2-channel halo each way)
    "caffe-lrn-across-towers": AlexNetConfig.caffe(num_classes=10),
    "lrn-across-even-window": AlexNetConfig(num_classes=10, lrn_scope="all", lrn_size=4, lrn_k=1.0),
    # K12 layers-145: LRN1 on conv1's linear output, a spatial norm before pool2, one fc8 on tower A
    "k12": AlexNetConfig(num_classes=10, lrn1_input="linear", spatial_norm=True, fc8_split=False, init="k12"),
    "k12-order-only": AlexNetConfig(num_classes=10, lrn1_input="linear"),
    "spatial-norm-only": AlexNetConfig(num_classes=10, spatial_norm=True, spatial_norm_size=3),
    "k12-lrn-across-towers": AlexNetConfig(num_classes=10, lrn_scope="all", lrn1_input="linear", spatial_norm=True),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_towers_and_fused_give_the_same_logits(name: str) -> None:
    config = CONFIGS[name]
    towers, fused = twins(config)
    x = pixels(3, config.in_channels, config.input_size, config.input_size)
    assert logits_diff(towers, fused, x) < TOL


@pytest.mark.parametrize(
    "name", ["paper", "fc8-on-tower-a", "caffe-lrn-across-towers", "k12", "k12-order-only", "k12-lrn-across-towers"]
)
def test_towers_and_fused_give_the_same_gradients(name: str, images: torch.Tensor) -> None:
    config = CONFIGS[name]
    towers, fused = twins(AlexNetConfig(**{**config.to_dict(), "dropout": 0.0}))
    labels = torch.tensor([0, 3, config.num_classes - 1])
    images = pixels(3, 3, config.input_size, config.input_size)
    tower_grads = towers_to_fused(grads(towers, images, labels))
    fused_grads = grads(fused, images, labels)
    assert tower_grads.keys() == fused_grads.keys() and len(fused_grads) == 16
    for key, g in fused_grads.items():
        assert g.abs().max() > 0, f"{key} got no gradient"
        assert rel_diff(tower_grads[key], g) < TOL, key


def test_gradients_agree_with_dropout_under_the_same_masks(images: torch.Tensor) -> None:
    """Dropout on: the towers' masks (A's 2048 features, then B's) laid side by side are the fused
    model's mask, so the same masks give the same gradients."""
    towers, fused = twins(AlexNetConfig(num_classes=10))
    masks = [
        torch.bernoulli(torch.full((3, 4096), 0.5), generator=torch.Generator().manual_seed(i)) * 2 for i in (6, 7)
    ]

    def fixed_mask_dropout(tower: int | None):
        calls = iter(masks) if tower is None else iter(m[:, tower * 2048 : (tower + 1) * 2048] for m in masks)
        return lambda module, inputs, output: output * next(calls)

    fused.drop.register_forward_hook(fixed_mask_dropout(None))
    towers.tower_a.drop.register_forward_hook(fixed_mask_dropout(0))
    towers.tower_b.drop.register_forward_hook(fixed_mask_dropout(1))
    for module in (towers.tower_a.drop, towers.tower_b.drop, fused.drop):
        module.p = 0.0  # the hooks apply the masks (already scaled by 1 / (1 - 0.5))
    labels = torch.tensor([1, 2, 9])
    tower_grads, fused_grads = towers_to_fused(grads(towers, images, labels)), grads(fused, images, labels)
    assert all(rel_diff(tower_grads[k], g) < TOL for k, g in fused_grads.items())


@pytest.mark.parametrize("scale", ["test", "train"])
def test_the_same_masks_give_the_same_logits_and_gradients_for_either_dropout_scale(scale: str, images) -> None:
    """The masks passed in, as training passes them: tower A's features are the fused model's first."""
    towers, fused = twins(AlexNetConfig(num_classes=10, dropout_scale=scale))
    g = torch.Generator().manual_seed(6)
    m6, m7 = (torch.bernoulli(torch.full((3, 4096), 0.5), generator=g) for _ in range(2))
    tower_masks = tuple((m6[:, k * 2048 : (k + 1) * 2048], m7[:, k * 2048 : (k + 1) * 2048]) for k in (0, 1))
    labels = torch.tensor([1, 2, 9])
    results = []
    for model, masks in ((towers, tower_masks), (fused, (m6, m7))):
        model.train().zero_grad()
        logits = model(images, masks)
        F.cross_entropy(logits, labels).backward()
        results.append((logits.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (tower_logits, tower_grads), (fused_logits, fused_grads) = results
    assert rel_diff(tower_logits, fused_logits) < TOL
    tower_grads = towers_to_fused(tower_grads)
    assert all(rel_diff(tower_grads[k], g) < TOL for k, g in fused_grads.items())


def test_conversion_round_trip_is_lossless() -> None:
    towers, fused = twins(AlexNetConfig(num_classes=10), seed=3)
    back = AlexNet2GPU.from_fused(fused, devices=("cpu", "cpu"))
    for (name, p), (name_back, q) in zip(towers.state_dict().items(), back.state_dict().items(), strict=True):
        assert name == name_back and torch.equal(p, q)
    state = fused.state_dict()
    again = towers_to_fused(fused_to_towers(state, fused.config))
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)


@pytest.mark.parametrize("split", [False, True], ids=["k12", "split-fc8"])
def test_fused_layout_puts_tower_a_first(split: bool) -> None:
    towers, fused = twins(AlexNetConfig(num_classes=10, fc8_split=split))
    assert torch.equal(fused.conv2.weight[:128], towers.tower_a.conv2.weight)
    assert torch.equal(fused.fc6.weight[2048:], towers.tower_b.fc6.weight)
    if split:
        assert torch.equal(fused.fc8.bias[5:], towers.tower_b.fc8.bias)
    else:  # K12's one fc8 is tower A's, whole
        assert torch.equal(fused.fc8.weight, towers.tower_a.fc8.weight) and towers.tower_b.fc8 is None


def test_lrn_across_both_towers_breaks_the_equivalence(images: torch.Tensor) -> None:
    """The check above can fail: an LRN whose window runs over all 96 (256) channels, as a naive
    fused model has it, differs from the towers where the two halves meet."""
    towers, fused = twins(AlexNetConfig(num_classes=10))
    assert logits_diff(towers, fused, images) < TOL
    for name in ("lrn1", "lrn2"):
        setattr(fused, name, torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0))
    wrong = logits_diff(towers, fused, images)
    assert wrong > 100 * TOL, wrong


def test_lrn_across_towers_is_one_lrn_over_all_channels(images: torch.Tensor) -> None:
    """lrn_scope="all": the fused model's LRN is PyTorch's over all 96 (256) channels, and the towers
    with their halo give its logits; the per-tower towers do not."""
    config = AlexNetConfig(num_classes=10, lrn_scope="all")
    towers, fused = twins(config)
    assert fused.lrn1.groups == fused.lrn2.groups == 1
    assert logits_diff(towers, fused, images) < TOL
    per_tower = AlexNet2GPU(AlexNetConfig(num_classes=10), devices=("cpu", "cpu"))
    per_tower.load_state_dict(towers.state_dict())
    assert logits_diff(per_tower, fused, images) > 100 * TOL
