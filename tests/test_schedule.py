"""The "2012" schedule: run 145's recorded epochs (K12 layer-params-145.cfg's comments), per layer, scaled to
a run's epochs, with conv1 frozen and the colour noise switched off, written to lr.csv and kept by a resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CPU, FAKE, SMALL

import alexnet2gpu.data.transforms as transforms
from alexnet2gpu import AlexNet2GPU
from alexnet2gpu.config import TrainConfig
from alexnet2gpu.train import loop
from alexnet2gpu.train.logs import read_csv
from alexnet2gpu.train.optim import PaperSGD, Recorded, make_optimizer, make_scheduler


def schedule(epochs: int, **fields) -> tuple[Recorded, torch.optim.Optimizer]:
    config = TrainConfig(schedule="2012", epochs=epochs, **fields)
    optimizer = make_optimizer(AlexNet2GPU(SMALL, ("cpu", "cpu")), config)
    return make_scheduler(optimizer, config), optimizer


def lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


def test_run_145s_epochs_as_recorded() -> None:
    """91 epochs: 0.01 to epoch 24, 0.001 from 25, 0.0001 from 51, 0.00001 from 79 (epochs from 1);
    conv1 at 0.00001 from 67 and 0 from 72; biases at 0.02 throughout, but conv1's from 72."""
    recorded, optimizer = schedule(91)
    seen = {}
    for epoch in range(91):  # index from 0: epoch 25 is index 24
        seen[epoch + 1] = lrs(optimizer)
        assert recorded.colour_noise(epoch) == (epoch + 1 < 67)
        recorded.step(0.5)
    for epoch, conv3, conv1, conv1_bias in [
        (24, 0.01, 0.01, 0.02),
        (25, 0.001, 0.001, 0.02),
        (51, 1e-4, 1e-4, 0.02),
        (67, 1e-4, 1e-5, 0.02),
        (72, 1e-4, 0.0, 0.0),
        (79, 1e-5, 0.0, 0.0),
        (91, 1e-5, 0.0, 0.0),
    ]:
        got = seen[epoch]
        assert got["conv3.weight"] == pytest.approx(conv3) and got["fc8.weight"] == pytest.approx(conv3), epoch
        assert got["conv1.weight"] == pytest.approx(conv1) and got["conv1.bias"] == pytest.approx(conv1_bias), epoch
        assert got["fc6.bias"] == pytest.approx(0.02), epoch
    assert "scaled" not in recorded.describe() and "from epochs 25, 51, 79" in recorded.describe()


@pytest.mark.parametrize(("epochs", "drops"), [(90, (25, 51, 79)), (10, (4, 7, 10)), (1, (2, 2, 2))])
def test_a_shorter_run_takes_each_change_at_the_same_fraction(epochs: int, drops: tuple) -> None:
    recorded, _ = schedule(epochs)
    assert tuple(s + 1 for s in recorded.starts["weight_drops"]) == drops
    assert ("scaled from its 91 epochs" in recorded.describe()) == (epochs != 91)


def test_one_group_per_layer_and_kind_even_where_a_tower_lacks_the_layer() -> None:
    config = TrainConfig(schedule="2012")
    model = AlexNet2GPU(SMALL.__class__(**{**SMALL.to_dict(), "fc8_split": False}), ("cpu", "cpu"))
    groups = make_optimizer(model.tower_b, config).param_groups  # a tower process's own tower B: no fc8
    assert [g["name"] for g in groups][-2:] == ["fc8.weight", "fc8.bias"] and groups[-1]["params"] == []
    assert len(groups) == 16 and {g["weight_decay"] for g in groups if g["name"].endswith(".bias")} == {0.0}


def test_a_frozen_group_is_not_moved_by_its_velocity() -> None:
    """K12 src/weights.cu updates only layers whose rate is above 0: no drift on the old momentum."""
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = PaperSGD([dict(params=[w], lr=0.1)], lr=0.1)
    w.grad = torch.ones(3)
    optimizer.step()  # a velocity of -0.1 - decay
    moved = w.detach().clone()
    optimizer.param_groups[0]["lr"] = 0.0
    optimizer.step()
    assert torch.equal(w.detach(), moved)


def test_a_run_writes_every_layers_lr_each_epoch_drops_the_noise_and_resumes_alike(tmp_path: Path, monkeypatch):
    """4 epochs: weights 0.01, 0.01, 0.001, 0.0001 (conv1 0.00001 in the last); noise off in the last."""
    noised = []
    real = transforms.pca_noise
    monkeypatch.setattr(transforms, "pca_noise", lambda n, *a, **k: noised.append(n) or real(n, *a, **k))
    config = TrainConfig(schedule="2012", epochs=4, batch_size=8, val_subset=8, log_every=1)
    options = dict(progress=False, tensorboard=False)
    loop.train(SMALL, FAKE, config, CPU, tmp_path / "whole", **options)
    rows = read_csv(tmp_path / "whole" / "lr.csv")
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4] and [row["step"] for row in rows] == [0, 2, 4, 6]
    assert [row["lr_conv3.weight"] for row in rows] == pytest.approx([0.01, 0.01, 0.001, 0.0001])
    assert [row["lr_conv1.weight"] for row in rows] == pytest.approx([0.01, 0.01, 0.001, 0.00001])
    assert [row["lr_fc7.bias"] for row in rows] == pytest.approx([0.02] * 4)
    val = read_csv(tmp_path / "whole" / "val.csv")  # the weights' lr, not conv1's (the first group)
    assert [row["lr"] for row in val] == pytest.approx([0.01, 0.01, 0.001, 0.0001])
    assert noised == [8] * 6  # two steps in each of the first three epochs
    stopped = TrainConfig(**{**config.to_dict(), "max_steps": 3})
    loop.train(SMALL, FAKE, stopped, CPU, tmp_path / "resumed", **options)
    loop.train(SMALL, FAKE, config, CPU, tmp_path / "resumed", resume=tmp_path / "resumed" / "last.pt", **options)
    assert read_csv(tmp_path / "resumed" / "lr.csv") == rows
