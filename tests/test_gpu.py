"""On a real GPU: the towers across cuda:0 and the CPU, both on cuda:0, and (with two GPUs) across
cuda:0 and cuda:1 agree with the fused model on the CPU. On one GPU the CPU stands in for the second
device. Tolerance: 1e-4 of the largest entry (conftest.rel_diff), in float32 with TF32 off; the
placements differ by summation order alone (about 1e-6 on the CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import pixels, randomise, rel_diff

from alexnet2gpu import AlexNet2GPU, AlexNetConfig, AlexNetFused, towers_to_fused
from alexnet2gpu.model.layers import dropout_generator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by make gpu-check)"),
]


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 matmuls would round to 10 bits; the equivalence is a float32 claim."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


TOLERANCE = 1e-4
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (make gpu-check runs it there)")
PLACEMENTS = [
    pytest.param(("cuda:0", "cpu"), id="cuda0+cpu"),
    pytest.param(("cuda:0", "cuda:0"), id="cuda0+cuda0"),
    pytest.param(("cpu", "cuda:0"), id="cpu+cuda0"),
    pytest.param(("cuda:0", "cuda:1"), id="cuda0+cuda1", marks=two_gpus),  # make train-2gpu
]


@pytest.mark.parametrize("devices", PLACEMENTS)
def test_towers_on_gpu_agree_with_fused(devices: tuple[str, str]) -> None:
    config = AlexNetConfig(num_classes=10, dropout=0.0)
    towers = randomise(AlexNet2GPU(config, devices=devices))
    fused = AlexNetFused.from_towers(towers, device="cpu")
    x, labels = pixels(4, 3, 224, 224), torch.tensor([0, 1, 2, 9])
    out = towers(x)
    assert out.device == torch.device(devices[0])
    F.cross_entropy(out, labels.to(out.device)).backward()
    ref = fused(x)
    F.cross_entropy(ref, labels).backward()
    assert rel_diff(out, ref) < TOLERANCE
    tower_grads = towers_to_fused({n: p.grad for n, p in towers.named_parameters()})
    for name, p in fused.named_parameters():
        assert rel_diff(tower_grads[name], p.grad) < TOLERANCE, name


@two_gpus
def test_dropout_masks_are_the_same_on_cuda0_and_cuda1() -> None:
    """A tower's masks are a function of (seed, step, tower) on any CUDA device, so that a run with
    towers on cuda:0 and cuda:1 trains as one with both on cuda:0 (gpu_check.sh's agree_2gpu)."""
    masks = [
        torch.empty(64, 2048, device=d).bernoulli_(0.5, generator=dropout_generator(3, 7, 1, torch.device(d)))
        for d in ("cuda:0", "cuda:1")
    ]
    assert torch.equal(masks[0].cpu(), masks[1].cpu())


@pytest.mark.parametrize("devices", [pytest.param(("cuda:0", "cpu"), id="cuda0+cpu"), PLACEMENTS[-1]])
def test_initial_weights_are_the_seeds_on_every_device(devices: tuple[str, str]) -> None:
    """torch.manual_seed seeds every GPU alike: drawn there, tower B would copy tower A."""
    torch.manual_seed(5)
    here = AlexNet2GPU(AlexNetConfig(num_classes=10), devices=devices).state_dict()
    torch.manual_seed(5)
    cpu = AlexNet2GPU(AlexNetConfig(num_classes=10), devices=("cpu", "cpu")).state_dict()
    assert {str(here["tower_b.conv1.weight"].device)} == {devices[1]}
    assert all(torch.equal(here[k].cpu(), cpu[k]) for k in cpu)
    assert not torch.equal(here["tower_a.conv1.weight"].cpu(), here["tower_b.conv1.weight"].cpu())


@pytest.mark.parametrize("devices", [pytest.param(("cuda:0", "cuda:0"), id="cuda0+cuda0"), PLACEMENTS[-1]])
def test_a_training_step_never_synchronises(tmp_path, monkeypatch, devices: tuple[str, str]) -> None:
    """Every step after the first (cuDNN times its algorithms there) runs under
    torch.cuda.set_sync_debug_mode("error"): any wait of the host on the device raises."""
    from alexnet2gpu.config import DataConfig, TrainConfig
    from alexnet2gpu.train import loop

    real_step, checked = loop.train_step, []

    def strict_step(run, images, labels):
        if run.state.step == 0:
            return real_step(run, images, labels)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            real_step(run, images, labels)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked.append(run.state.step)

    monkeypatch.setattr(loop, "train_step", strict_step)
    model = AlexNetConfig(num_classes=10, in_channels=3)
    data = DataConfig(dataset="fake", preset="paper", fit_images=64, subset=32)
    config = TrainConfig(epochs=1, batch_size=8, max_steps=4, val_subset=8, seed=2, log_every=100)
    devs = tuple(torch.device(d) for d in devices)
    result = loop.train(model, data, config, devs, tmp_path, progress=False, tensorboard=False)
    assert result["step"] == 4 and checked == [2, 3, 4]
