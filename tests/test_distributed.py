"""Towers as processes on gloo: 2 ranks (one pair) and 4 ranks (2 pairs x 2 towers) compute the
single-process model's logits and gradients; each known trap makes the comparison fail.

In float64, so that the comparison sees the function and not the summation order: in float32 the
4-rank run differs from the reference by up to 3e-6 on fc8's gradient (about 6 ulp of its
largest entry, 4.5), because DDP averages two per-replica means where the reference takes one mean.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alexnet2gpu import AlexNet2GPU, AlexNetConfig
from alexnet2gpu.distributed import (
    TowerProcess,
    dropout_generators,
    launch,
    mesh_for,
    reference_generators,
    replicated_loss,
    wrap,
)

CONFIG = AlexNetConfig(num_classes=10)  # the paper's init: logits and gradients of order 1 and below
SEED, STEP = 7, 3


def worker(rank: int, world: int, tmp: str, mistake: str) -> None:
    tmp = Path(tmp)
    setup = torch.load(tmp / "setup.pt", weights_only=True)
    mesh = mesh_for(world, "cpu")
    tower, replica, replicas = mesh.get_local_rank("tower"), mesh.get_local_rank("dp"), world // 2
    module = TowerProcess(CONFIG, tower, mesh.get_group("tower"), "cpu").double()
    module.load_from_towers(setup["state"])
    if mistake == "ddp-over-world":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(module)
    else:
        model = wrap(module, mesh)
    dropout_generators(module, SEED, STEP, 0 if mistake == "shared-dropout" else replica)
    if mistake == "shared-dropout":  # both towers draw from one generator, as a global seed would
        module.tower.drop.generators = [torch.Generator().manual_seed(SEED)]
    n = setup["x"].shape[0] // replicas
    rows = slice(replica * n, (replica + 1) * n)
    logits = model(setup["x"][rows])
    loss = F.cross_entropy(logits, setup["y"][rows]) if mistake == "loss-not-divided" else None
    (loss if loss is not None else replicated_loss(logits, setup["y"][rows])).backward()
    grads = {name: p.grad for name, p in module.tower.named_parameters()}
    torch.save(
        {"logits": logits.detach(), "grads": grads, "tower": tower, "rows": (rows.start, rows.stop)},
        tmp / f"rank{rank}.pt",
    )


def compare(tmp: Path, world: int, mistake: str = "none") -> float:
    """Largest absolute difference from a single-process AlexNet2GPU on the full batch."""
    torch.manual_seed(0)
    reference = AlexNet2GPU(CONFIG, devices=("cpu", "cpu")).double()
    x, y = (
        torch.randn(2 * (world // 2), 3, 224, 224, dtype=torch.float64) * 30,
        torch.tensor([1, 8, 3, 5, 0, 9, 2, 4][: 2 * (world // 2)]),
    )
    torch.save({"state": reference.state_dict(), "x": x, "y": y}, tmp / "setup.pt")
    launch(worker, world, str(tmp), mistake)
    reference_generators(reference, SEED, STEP, world // 2)
    logits = reference.train()(x)
    F.cross_entropy(logits, y).backward()
    worst = 0.0
    for rank in range(world):
        got = torch.load(tmp / f"rank{rank}.pt", weights_only=True)
        start, stop = got["rows"]
        worst = max(worst, (got["logits"] - logits[start:stop]).abs().max().item())
        tower = (reference.tower_a, reference.tower_b)[got["tower"]]
        for name, p in tower.named_parameters():
            worst = max(worst, (got["grads"][name] - p.grad).abs().max().item())
    return worst


@pytest.mark.parametrize("world", [2, 4])
def test_tower_processes_equal_the_single_process_model(tmp_path: Path, world: int) -> None:
    assert compare(tmp_path, world) <= 1e-6


@pytest.mark.parametrize("mistake", ["loss-not-divided", "ddp-over-world", "shared-dropout"])
def test_each_trap_breaks_the_equality(tmp_path: Path, mistake: str) -> None:
    assert compare(tmp_path, 2, mistake) > 1e-4


def train_worker(rank: int, world: int, out: str, max_steps: int, resume: str | None) -> None:
    from alexnet2gpu.config import DataConfig, TrainConfig
    from alexnet2gpu.distributed import train_tower_processes

    data = DataConfig(dataset="fake", preset="seed", subset=16)
    # tower processes keep one rule for every parameter (bias_rule "paper") until they use make_optimizer
    config = TrainConfig(
        epochs=5, batch_size=8, max_steps=max_steps, val_subset=8, seed=1, log_every=1, bias_rule="paper"
    )
    train_tower_processes(AlexNetConfig(num_classes=10, init="he"), data, config, out, resume=resume, progress=False)


def test_tower_process_checkpoints_load_both_ways(tmp_path: Path) -> None:
    from alexnet2gpu import checkpoint as ckpt
    from alexnet2gpu.config import DataConfig, TrainConfig
    from alexnet2gpu.engine import train

    launch(train_worker, 2, str(tmp_path / "dist"), 3, None)  # 2 ranks: crosses an epoch end, stops mid-epoch
    saved = ckpt.load(tmp_path / "dist" / "last.pt")
    assert (saved["step"], saved["epoch"], saved["batch"]) == (3, 1, 1)
    model = AlexNet2GPU(AlexNetConfig(num_classes=10, init="he"), devices=("cpu", "cpu"))
    model.load_state_dict(saved["model"])  # the single-process layout, strict
    assert len(saved["optimizer"]["state"]) == len(list(model.parameters()))

    # a single-process run resumes it, and its checkpoint goes back to tower processes
    data = DataConfig(dataset="fake", preset="seed", subset=16)
    config = TrainConfig(epochs=5, batch_size=8, max_steps=4, val_subset=8, seed=1, bias_rule="paper")
    train(
        AlexNetConfig(num_classes=10, init="he"),
        data,
        config,
        ("cpu", "cpu"),
        tmp_path / "dist",
        resume=tmp_path / "dist" / "last.pt",
        progress=False,
        tensorboard=False,
    )
    launch(train_worker, 2, str(tmp_path / "dist"), 5, str(tmp_path / "dist" / "last.pt"))
    again = ckpt.load(tmp_path / "dist" / "last.pt")
    assert again["step"] == 5
    assert not torch.equal(again["model"]["tower_b.fc6.weight"], saved["model"]["tower_b.fc6.weight"])
