"""K12's normalisation within each map (`cnorm2`, `model.lrn.spatial_response_norm`) against the formula
written out pixel by pixel, its hand-written backward against gradcheck, and its place in the network."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_diff

from alexnet2gpu.model.layers import Dropout
from alexnet2gpu.model.lrn import spatial_response_norm

K12 = dict(alpha=1e-3, beta=0.75)  # layer-params-145.cfg, cnorm2a: scale=0.001 pow=0.75


def direct(x: torch.Tensor, size: int, alpha: float, beta: float) -> torch.Tensor:
    """b = a / (1 + alpha/size^2 * sum of a^2 over the size x size window, clipped at the edge)^beta."""
    r, (_, _, h, w) = size // 2, x.shape
    out = torch.empty_like(x)
    for i in range(h):
        for j in range(w):
            window = x[:, :, max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1]
            out[:, :, i, j] = x[:, :, i, j] / (1 + alpha / size**2 * (window**2).sum((2, 3))) ** beta
    return out


def maps(*shape: int, scale: float = 50.0, seed: int = 0) -> torch.Tensor:
    """Post-LRN2 maps of the paper's scale, where alpha * mean(a^2) is of order 1 and shapes the result."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("size", [1, 3, 5, 7])
def test_forward_matches_the_formula(size: int) -> None:
    x = maps(2, 3, 9, 11).double()
    assert rel_diff(spatial_response_norm(x, size, **K12), direct(x, size, **K12)) < 1e-12


def test_the_edge_windows_are_clipped_not_padded_with_the_map() -> None:
    """A corner pixel's window holds 3x3 of the 5x5 pixels: one bright pixel far away does not reach it."""
    x = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    x[0, 0, 0, 0], x[0, 0, 8, 8] = 10.0, 1000.0
    out = spatial_response_norm(x, 5, **K12)
    assert out[0, 0, 0, 0].item() == pytest.approx(10.0 / (1 + 1e-3 / 25 * 100.0) ** 0.75, rel=1e-12)


@pytest.mark.parametrize(("size", "alpha", "beta"), [(5, 1e-3, 0.75), (3, 0.5, 0.6), (1, 2.0, 1.0)])
def test_gradcheck_float64(size: int, alpha: float, beta: float) -> None:
    x = maps(2, 2, 6, 7, scale=20.0).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: spatial_response_norm(t, size, alpha, beta), (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_computed_in_float32(dtype: torch.dtype) -> None:
    x = maps(2, 4, 8, 8)
    out = spatial_response_norm(x.to(dtype), 5, **K12)
    assert out.dtype == dtype and rel_diff(out.float(), direct(x.to(dtype).float(), 5, **K12)) < 2.0**-7


def test_channels_last_and_no_grad_and_an_empty_batch() -> None:
    x = maps(2, 6, 7, 7)
    ref = spatial_response_norm(x, 5, **K12)
    with torch.no_grad():
        assert rel_diff(spatial_response_norm(x.to(memory_format=torch.channels_last), 5, **K12), ref) < 1e-6
    assert spatial_response_norm(torch.empty(0, 6, 7, 7), 5, **K12).shape == (0, 6, 7, 7)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="4-D"):
        spatial_response_norm(torch.ones(2, 6, 5), 5, **K12)
    with pytest.raises(ValueError, match="odd size"):
        spatial_response_norm(torch.ones(2, 6, 5, 5), 4, **K12)
    with pytest.raises(TypeError, match="floating-point"):
        spatial_response_norm(torch.ones(2, 6, 5, 5, dtype=torch.int64), 5, **K12)


def test_the_network_applies_it_after_lrn2_and_before_pool2() -> None:
    """With the spatial norm on, pool2 sees exactly LRN2's output normalised within each map."""
    from alexnet2gpu import AlexNetFused
    from alexnet2gpu.config import AlexNetConfig

    net = AlexNetFused(AlexNetConfig(num_classes=10, spatial_norm=True)).eval()
    seen = {}
    net.lrn2.register_forward_hook(lambda m, i, o: seen.__setitem__("lrn2", o.detach().clone()))
    net.pool2.register_forward_pre_hook(lambda m, i: seen.__setitem__("pool2", i[0].detach().clone()))
    with torch.no_grad():
        net(maps(2, 3, 224, 224))
    assert rel_diff(seen["pool2"], spatial_response_norm(seen["lrn2"], 5, **K12)) < 1e-6
    assert rel_diff(seen["pool2"], seen["lrn2"]) > 1e-3  # it changed something


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by make gpu-check)")
def test_cuda_matches_the_formula() -> None:
    x = maps(2, 8, 13, 13)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    xc = x.cuda().requires_grad_()
    spatial_response_norm(xc, 5, **K12).backward(g.cuda())
    xr = x.double().requires_grad_()
    direct(xr, 5, **K12).backward(g.double())
    assert rel_diff(xc.grad, xr.grad) < 1e-5


@pytest.mark.parametrize(("scale", "train_factor", "test_factor"), [("test", 1.0, 0.5), ("train", 2.0, 1.0)])
def test_dropout_puts_its_factor_where_its_scale_says(scale: str, train_factor: float, test_factor: float) -> None:
    """K12 (and P 4.2): a bare 0/1 mask in training, every output times 0.5 at test; inverted: x2, then x1."""
    drop, x = Dropout(0.5, scale), torch.rand(4, 8) + 1.0
    mask = (torch.arange(32).reshape(4, 8) % 3 > 0).float()
    assert torch.equal(drop.train()(x, mask), x * mask * train_factor)
    assert torch.equal(drop.eval()(x), x * test_factor)
    kept = drop.train()(x)  # its own mask: each survivor carries the training factor
    assert set((kept[kept != 0] / x[kept != 0]).unique().tolist()) == {train_factor}
