"""alexnet2gpu.model.lrn.local_response_norm against torch.nn.LocalResponseNorm, the reference (P 3.3).

Forward and hand-written backward in float32 and float64, odd and even window sizes, the paper's
activation scale and far larger activations, low-precision inputs, channels_last and torch.compile.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_diff
from torch import nn

from alexnet2gpu.model.lrn import local_response_norm

PAPER = {"alpha": 1e-4, "beta": 0.75, "k": 2.0}  # P 3.3: k = 2, n = 5, alpha = 1e-4, beta = 0.75


def activations(*shape: int, scale: float = 60.0, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Post-ReLU activations: half zeros, the rest |N(0, scale)|. At the paper's pixel scale (60)
    alpha/n * sum(a^2) is comparable to k; at 3000 it dominates k by ~100x."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).relu().to(dtype)


def reference(x: torch.Tensor, size: int, g: torch.Tensor | None = None, **params: float):
    """nn.LocalResponseNorm's output and, given an upstream gradient g, autograd's input gradient."""
    x = x.detach().clone().requires_grad_(g is not None)
    out = nn.LocalResponseNorm(size, **(params or PAPER))(x)
    if g is None:
        return out.detach()
    out.backward(g)
    return out.detach(), x.grad


def ours(x: torch.Tensor, size: int, g: torch.Tensor | None = None, **params: float):
    x = x.detach().clone().requires_grad_(g is not None)
    out = local_response_norm(x, size, **(params or PAPER))
    if g is None:
        return out.detach()
    out.backward(g)
    return out.detach(), x.grad


def elementwise_rel(x: torch.Tensor, ref: torch.Tensor, floor: float = 1e-3) -> float:
    """max |x - ref| / |ref| over the elements with |ref| above floor * max |ref|."""
    x, ref = x.double(), ref.double()
    keep = ref.abs() > floor * ref.abs().max()
    return ((x - ref).abs()[keep] / ref.abs()[keep]).max().item()


def rel64(x: torch.Tensor, ref: torch.Tensor) -> float:
    """conftest.rel_diff without its rounding to float32."""
    return ((x - ref).abs().max() / ref.abs().max()).item()


CASES = {
    # (N, C, H, W), size, activation scale
    "paper-pixels": ((4, 48, 13, 13), 5, 60.0),
    "large-1e4": ((4, 48, 13, 13), 5, 3000.0),  # values up to ~1.5e4: d is dominated by the alpha term
    "size3": ((4, 48, 13, 13), 3, 60.0),
    "128-channels": ((2, 128, 9, 9), 5, 300.0),
    "odd-channels": ((3, 13, 7, 5), 5, 300.0),
    "size-over-channels": ((2, 3, 5, 5), 7, 300.0),
    "size1": ((2, 8, 5, 5), 1, 300.0),
    "even-size2": ((2, 16, 6, 6), 2, 300.0),
    "even-size4": ((2, 16, 6, 6), 4, 300.0),
    "even-size6": ((2, 16, 6, 6), 6, 300.0),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference_float32(case: str) -> None:
    shape, size, scale = CASES[case]
    x = activations(*shape, scale=scale)
    out, ref = ours(x, size), reference(x, size)
    assert out.dtype == torch.float32 and out.shape == x.shape
    # measured: max-normalised <= 4e-7, elementwise <= 4.4e-7 (a few float32 roundings either side)
    assert rel_diff(out, ref) < 1e-6
    assert elementwise_rel(out, ref) < 1e-6


@pytest.mark.parametrize("case", CASES)
def test_backward_matches_autograd_float32(case: str) -> None:
    shape, size, scale = CASES[case]
    x = activations(*shape, scale=scale)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    (out, grad), (ref, ref_grad) = ours(x, size, g), reference(x, size, g)
    assert rel_diff(out, ref) < 1e-6
    # measured <= 3e-7; the cross-channel term is a difference of float32 products, so 1e-5
    assert rel_diff(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("case", ["paper-pixels", "large-1e4", "even-size4", "size-over-channels"])
def test_float64_matches_reference(case: str) -> None:
    shape, size, scale = CASES[case]
    x = activations(*shape, scale=scale, dtype=torch.float64)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out, grad), (ref, ref_grad) = ours(x, size, g), reference(x, size, g)
    assert out.dtype == grad.dtype == torch.float64
    # in float64 (conftest's rel_diff rounds to float32 first); measured <= 7e-16
    assert rel64(out, ref) < 1e-13 and rel64(grad, ref_grad) < 1e-12


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("params", [PAPER, {"alpha": 0.5, "beta": 0.6, "k": 1.0}])
def test_gradcheck_float64(size: int, params: dict[str, float]) -> None:
    # scale 60 with the paper's alpha, and 2 with alpha = 0.5: either way the cross-channel term of
    # the gradient is of the same order as the diagonal one, so a wrong S^T would show
    scale = 60.0 if params is PAPER else 2.0
    x = (torch.randn(2, 6, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(size)) * scale).abs()
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: local_response_norm(t, size, **params), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [
        # Everything is computed in float32, so the only error is rounding the result to the dtype:
        # at most 2^-8 relative for bfloat16 (8-bit significand), 2^-11 for float16 (11 bits),
        # elementwise, for output and gradient alike. The tolerances give that a factor of 2.
        # Measured: 3.9e-3 and 4.9e-4 elementwise (exactly the rounding bound), gradients 3.4e-3 and 2.4e-4.
        (torch.bfloat16, 2.0**-7),
        (torch.float16, 2.0**-10),
    ],
)
@pytest.mark.parametrize("scale", [60.0, 3000.0])
def test_low_precision_within_rounding_of_float32(dtype: torch.dtype, tol: float, scale: float) -> None:
    # inputs already representable in dtype, so float32 on the same values is the exact-arithmetic stand-in;
    # at scale 3000 squares reach ~1e8, far past float16's 65504: only float32 accumulation survives that
    x = activations(4, 48, 9, 9, scale=scale).to(dtype)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, grad = ours(x, 5, g)
    ref, ref_grad = ours(x.float(), 5, g.float())
    assert out.dtype == grad.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert elementwise_rel(out, ref) < tol
    assert rel_diff(grad, ref_grad) < tol


@pytest.mark.parametrize("size", [5, 4])
def test_channels_last_gives_the_same_result(size: int) -> None:
    x = activations(4, 48, 11, 11, scale=300.0)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    out, grad = ours(x, size, g)
    x_cl, g_cl = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    out_cl, grad_cl = ours(x_cl, size, g_cl)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert rel_diff(out_cl, out) < 1e-7 and rel_diff(grad_cl, grad) < 1e-7


def test_non_contiguous_gradient_and_input() -> None:
    # a transposed input and an expanded (stride-0) upstream gradient, as from out.sum().backward()
    x = activations(2, 16, 6, 7, scale=300.0).transpose(2, 3)
    (out, grad), (ref, ref_grad) = ours(x, 5, torch.ones(1).expand(x.shape)), reference(x, 5, torch.ones(x.shape))
    assert rel_diff(out, ref) < 1e-6 and rel_diff(grad, ref_grad) < 1e-5


def test_saves_only_the_input_and_the_denominator() -> None:
    x = activations(2, 16, 5, 5).requires_grad_()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        local_response_norm(x, 5, **PAPER)
    assert len(saved) == 2
    assert saved[0].data_ptr() == x.data_ptr()  # the input itself, no copy
    assert saved[1].shape == x.shape


def test_torch_compile_traces_without_graph_breaks() -> None:
    # aot_eager runs dynamo and AOT autograd (the part that meets the autograd.Function) without the
    # minutes of C++ compilation inductor would add; fullgraph=True turns any graph break into an error
    x = activations(2, 16, 6, 6, scale=300.0)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(lambda t: local_response_norm(t, 5, **PAPER), backend="aot_eager", fullgraph=True)
    xc = x.clone().requires_grad_()
    out = compiled(xc)
    out.backward(g)
    ref, ref_grad = reference(x, 5, g)
    assert rel_diff(out, ref) < 1e-6 and rel_diff(xc.grad, ref_grad) < 1e-5


def test_without_grad_and_empty_batch() -> None:
    x = activations(2, 16, 5, 5)
    with torch.no_grad():
        assert rel_diff(local_response_norm(x, 5, **PAPER), reference(x, 5)) < 1e-6
    assert local_response_norm(torch.empty(0, 16, 5, 5), 5, **PAPER).shape == (0, 16, 5, 5)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="4-D"):
        local_response_norm(torch.ones(2, 16, 5), 5, **PAPER)
    with pytest.raises(ValueError, match="size"):
        local_response_norm(torch.ones(2, 16, 5, 5), 0, **PAPER)
    with pytest.raises(TypeError, match="floating-point"):
        local_response_norm(torch.ones(2, 16, 5, 5, dtype=torch.int64), 5, **PAPER)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by make gpu-check)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_reference(dtype: torch.dtype) -> None:
    x = activations(4, 48, 13, 13, scale=300.0)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    out, grad = ours(x.to("cuda", dtype), 5, g.to("cuda", dtype))
    ref, ref_grad = reference(x.to(dtype).float(), 5, g.to(dtype).float())
    tol = 1e-6 if dtype == torch.float32 else 2.0**-8
    assert out.device.type == "cuda" and out.dtype == dtype
    assert rel_diff(out, ref) < tol and rel_diff(grad, ref_grad) < 10 * tol


def test_module_switch_to_the_reference_gives_the_same_function() -> None:
    from alexnet2gpu.model.layers import LocalResponseNorm

    x = torch.rand(2, 96, 9, 9) * 300
    module = LocalResponseNorm(5, 1e-4, 0.75, 2.0, groups=2)
    fast = module(x)
    module.reference = True
    assert (fast - module(x)).abs().max() / module(x).abs().max() < 1e-6
