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
from alexnet2gpu.layers import dropout_generator

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
