"""What only a GPU would show, pinned on the CPU: where the initial weights are drawn, that a training
step never waits for the device, that the towers compile to one graph, that augmentation parameters
cross to the device in one asynchronous copy, the memory format, checkpoints that load anywhere, and
a rank that stops answering."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from alexnet2gpu import AlexNet2GPU, AlexNetConfig, AlexNetFused
from alexnet2gpu.config import DataConfig, TrainConfig
from alexnet2gpu.data.stats import DataStats
from alexnet2gpu.data.transforms import Pipeline, input_pipeline
from alexnet2gpu.model.layers import LocalResponseNorm, dropout_generator, init_weights
from alexnet2gpu.train import checkpoint as ckpt
from alexnet2gpu.train import loop

A, B = "cuda:0", "cuda:1"


class RandomDraws(TorchDispatchMode):
    """The device of every tensor a random op writes."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(kind in name for kind in ("normal", "uniform", "bernoulli", "random", "rand")):
            self.devices.append(str(args[0].device) if args and isinstance(args[0], torch.Tensor) else "?")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("init", ["k12", "paper", "caffe", "he", "torch"])
def test_initial_weights_are_drawn_on_the_cpu_whatever_the_towers_devices(init: str) -> None:
    """On two GPUs, each seeded alike by torch.manual_seed, a draw on each tower's device would give
    tower B a copy of tower A's weights: every draw of the initialisation is made on the CPU."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = AlexNet2GPU(AlexNetConfig(num_classes=10, init=init), devices=(A, B))
        with RandomDraws() as draws:
            init_weights(model, init)
    assert {str(p.device) for p in model.tower_b.parameters()} == {B}
    weights = [name for name, _ in model.named_parameters() if name.endswith("weight")]  # 15: fc8 on tower A
    assert len(weights) == 15 and len(draws.devices) >= len(weights) and set(draws.devices) == {"cpu"}, draws.devices


def test_initial_weights_depend_on_the_seed_alone(monkeypatch) -> None:
    """The layers' own construction-time init (on whichever device) does not shift the weights."""
    torch.manual_seed(4)
    plain = AlexNet2GPU(AlexNetConfig(num_classes=10), devices=("cpu", "cpu")).state_dict()
    real = nn.Linear.reset_parameters

    def draws_more(self) -> None:  # as if construction drew elsewhere, or more
        real(self)
        torch.rand(1000)

    monkeypatch.setattr(nn.Linear, "reset_parameters", draws_more)
    torch.manual_seed(4)
    shifted = AlexNet2GPU(AlexNetConfig(num_classes=10), devices=("cpu", "cpu")).state_dict()
    assert all(torch.equal(plain[k], shifted[k]) for k in plain)
    assert not torch.equal(plain["tower_a.conv1.weight"], plain["tower_b.conv1.weight"])
    torch.manual_seed(4)
    fused = AlexNetFused(AlexNetConfig(num_classes=10)).state_dict()
    torch.manual_seed(4)
    monkeypatch.setattr(nn.Linear, "reset_parameters", real)
    unshifted = AlexNetFused(AlexNetConfig(num_classes=10)).state_dict()
    assert all(torch.equal(v, unshifted[k]) for k, v in fused.items())


SYNCS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")


def test_a_training_step_never_waits_for_the_device(tmp_path: Path, monkeypatch) -> None:
    """Between logging steps nothing reads a tensor back to the host (each such read waits for the
    device on a GPU): no .item(), float(), bool(), .tolist(), .cpu() in a step."""
    calls: list[str] = []
    counting = [False]
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _real=real, **kwargs):
            if counting[0]:
                calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    real_step = loop.train_step

    def counted_step(*args, **kwargs):
        counting[0] = True
        try:
            return real_step(*args, **kwargs)
        finally:
            counting[0] = False

    monkeypatch.setattr(loop, "train_step", counted_step)
    model = AlexNetConfig(num_classes=10, in_channels=3)
    data = DataConfig(dataset="fake", preset="paper", fit_images=64, subset=16)
    config = TrainConfig(epochs=1, batch_size=4, max_steps=3, val_subset=4, seed=2, log_every=100)
    result = loop.train(model, data, config, ("cpu", "cpu"), tmp_path, progress=False, tensorboard=False)
    assert result["step"] == 3
    assert calls == []
    rows = (tmp_path / "train.csv").read_text().splitlines()
    assert len(rows) == 2 and math.isfinite(float(rows[1].split(",")[3]))  # the losses were read at the end


def test_the_towers_compile_to_one_graph() -> None:
    """Dropout masks drawn outside the model and passed in: no generator inside, no graph break."""
    config = AlexNetConfig(num_classes=10)
    model = AlexNet2GPU(config, devices=("cpu", "cpu")).train()
    rows, total = slice(0, 2), 2
    masks = tuple(
        tower.dropout_masks(dropout_generator(0, 0, i, torch.device("cpu")), rows, total)
        for i, tower in enumerate((model.tower_a, model.tower_b))
    )
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 224, 224), masks)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def paper_pipeline(device: str, channels_last: bool = False, train: bool = True) -> Pipeline:
    data = DataConfig(dataset="fake", preset="paper")
    stats = DataStats(torch.full((3, 32, 32), 120.0), torch.eye(3), torch.tensor([0.2, 0.02, 0.004]))
    return input_pipeline(data, stats, device, train=train, channels_last=channels_last)


def test_augmentation_parameters_cross_to_the_device_in_one_asynchronous_copy(monkeypatch) -> None:
    moves: list[tuple[str, str, bool]] = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.device != self.device:
            moves.append((str(self.device), str(out.device), bool(kwargs.get("non_blocking", False))))
        return out

    with FakeTensorMode(allow_non_fake_inputs=True):
        pipeline = paper_pipeline(A)
        images = torch.zeros(6, 3, 32, 32, dtype=torch.uint8)
        monkeypatch.setattr(torch.Tensor, "to", spy)
        x = pipeline(images, torch.Generator().manual_seed(0))
    assert str(x.device) == A and x.shape == (6, 3, 224, 224)
    assert moves == [("cpu", A, True), ("cpu", A, True)]  # the parameters, then the images


def test_inputs_are_nchw_unless_channels_last_and_the_grouped_lrn_keeps_channels_last() -> None:
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    for train in (True, False):
        plain = paper_pipeline("cpu", train=train)(images, torch.Generator().manual_seed(1))
        last = paper_pipeline("cpu", channels_last=True, train=train)(images, torch.Generator().manual_seed(1))
        assert plain.is_contiguous() and last.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(plain, last)
    lrn = LocalResponseNorm(5, 1e-4, 0.75, 2.0, groups=2)
    x = torch.randn(2, 96, 9, 9) * 60
    out = lrn(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, lrn(x), rtol=1e-6, atol=1e-6)


def test_checkpoints_hold_cpu_tensors_only(tmp_path: Path, monkeypatch) -> None:
    """Tensors of towers on cuda:0 and cuda:1 are written as CPU copies: the file loads on any machine."""
    written = []
    monkeypatch.setattr(ckpt.torch, "save", lambda obj, path: written.append(obj) or Path(path).write_bytes(b"x"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        state = {"model": {"a": torch.ones(3, device=A), "b": torch.ones(2, device=B)}, "rng": [torch.ones(1)]}
        ckpt.save({**state, "optimizer": {"state": {"a": {"velocity": torch.zeros(3, device=B)}}}}, tmp_path / "c.pt")
    devices = {str(t.device) for t in _tensors(written[0])}
    assert devices == {"cpu"} and len(_tensors(written[0])) == 4


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for v in values for t in _tensors(v)]


def test_resume_restores_only_the_cuda_states_of_devices_this_machine_has(monkeypatch) -> None:
    """Written with 8 GPUs visible, resumed with 1: set_rng_state_all would raise IndexError."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(device))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restores every saved device"))
    cpu = torch.get_rng_state()
    ckpt.set_rng_state({"cpu": cpu, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8})
    assert restored == [0] and torch.equal(torch.get_rng_state(), cpu)


SILENT_RANK = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from alexnet2gpu.train.tower_ranks import TowerRanks, mesh_for
from alexnet2gpu.train.launch import launch
from alexnet2gpu.train.errors import TrainingError
import torch

def worker(rank, world, out):
    placement = TowerRanks(mesh_for(world, "cpu"), torch.device("cpu"), timeout=0.05)
    if rank == 1:  # stops answering (as under kill -STOP), then leaves
        time.sleep(12)
        return
    try:
        placement.agree(1, False)
    except TrainingError as error:
        Path(out, "rank0.txt").write_text(str(error))

launch(worker, 2, {out!r}, timeout=0.05)
"""


def test_a_rank_that_stops_answering_is_named_within_the_timeout(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = SILENT_RANK.format(tests=str(Path(__file__).parent), out=str(tmp_path))
    subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    message = (tmp_path / "rank0.txt").read_text()
    assert message.startswith("rank 0: a collective timed out (0.05 min, --dist-timeout): rank 1 did not answer")
    assert "\n" not in message


SILENT_IN_A_STEP = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
import torch
from alexnet2gpu.model.tower_process import TowerProcess
from alexnet2gpu.train.launch import launch, train_tower_processes
from alexnet2gpu.config import AlexNetConfig, DataConfig, TrainConfig
from alexnet2gpu.train.errors import TrainingError

def worker(rank, world, out):
    if rank == 1:  # stops answering inside a step, between two of the towers' exchanges
        real, calls = TowerProcess.gather, []
        def stalls(self, x):
            calls.append(1)
            if len(calls) == 7:
                time.sleep(15)
                raise SystemExit(0)
            return real(self, x)
        TowerProcess.gather = stalls
    model = AlexNetConfig(num_classes=10, init="he", conv_channels=(16, 32, 48, 48, 32), fc_features=(64, 64))
    data = DataConfig(dataset="fake", preset="seed", subset=32, workers=0)
    config = TrainConfig(epochs=1, batch_size=4, max_steps=4, val_subset=4, seed=1, log_every=100)
    try:
        train_tower_processes(model, data, config, out, progress=False, tensorboard=False, timeout=0.05)
    except TrainingError as error:
        Path(out).parent.joinpath(f"rank{{rank}}.txt").write_text(str(error))  # the run folder is gone: no save

launch(worker, 2, {out!r}, timeout=0.05)
"""


def test_a_rank_silent_inside_a_step_is_named_too(tmp_path: Path) -> None:
    """Most often a stopped rank is caught in the towers' exchanges, not in a host collective."""
    import subprocess
    import sys

    script = SILENT_IN_A_STEP.format(tests=str(Path(__file__).parent), out=str(tmp_path / "run"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert (tmp_path / "rank0.txt").is_file(), result.stderr[-3000:]
    message = (tmp_path / "rank0.txt").read_text()
    assert message.startswith("rank 0: a collective timed out (0.05 min, --dist-timeout): rank 1 did not answer")
