"""On a real GPU: the towers across cuda:0 and the CPU, and both on cuda:0, agree with the fused
model. One GPU cannot host cuda:1, so the CPU stands in for the second device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import pixels, randomise, rel_diff

from alexnet2gpu import AlexNet2GPU, AlexNetConfig, AlexNetFused, towers_to_fused

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


@pytest.mark.parametrize("devices", [("cuda:0", "cpu"), ("cuda:0", "cuda:0"), ("cpu", "cuda:0")])
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
    assert rel_diff(out, ref) < 1e-4
    tower_grads = towers_to_fused({n: p.grad for n, p in towers.named_parameters()})
    for name, p in fused.named_parameters():
        assert rel_diff(tower_grads[name], p.grad) < 1e-4, name
