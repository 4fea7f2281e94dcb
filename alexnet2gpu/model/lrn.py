"""Local response normalisation (P 3.3) with a hand-written backward, faster than PyTorch's on CPU.

P 3.3 of Krizhevsky et al. (2012) normalises each activation by the energy of its `size` neighbouring
channels at the same pixel:

    b[c] = a[c] / d[c]^beta,    d[c] = k + alpha/size * S(a^2)[c],
    S(v)[c] = sum of v[c + s] for s in -(size//2) .. (size-1)//2   (zero outside channels 0 .. C-1)

which is `torch.nn.functional.local_response_norm` exactly, its window for even sizes included.
PyTorch builds it from generic ops (pad, avg_pool3d, pow, div) and autograd differentiates them one
by one, a large share of a CPU training step (docs/BENCHMARKS.md). The backward, written out:

    grad_a = g * d^-beta - 2 * beta * alpha/size * a * S^T(g * a * d^(-beta-1)),

where S^T, the adjoint of S, sums t[c - s] over the same offsets s (for odd sizes S^T = S).

Why this is fast on CPU: these tensors are tens of MB, and a fresh buffer that size costs about as
much as four or five elementwise passes over it (the kernel maps and zeroes every page on first
touch), while an in-place pass over memory already mapped is cheap. So the window sums are not built
in a padded buffer or with cumsum, but accumulated in place, one `addcmul_` per channel offset on
shifted channel slices: d starts as k + alpha/size * a^2 and each offset s adds alpha/size * a[c+s]^2
to the channels where c + s exists (which is F.local_response_norm's zero padding). The backward adds
each offset's share of S^T straight into the gradient, so S^T(...) is never stored. Forward and
backward allocate two tensors each. For the paper's beta = 0.75, d^-0.75 is sqrt(rsqrt(d))^3 (three
cheap passes) rather than the generic pow, which costs about three times as much.
Only a (which the ReLU before LRN keeps anyway) and d are saved; d^-beta is recomputed in the backward.

The other window-sum strategies tried, and their timings: docs/BENCHMARKS.md.

Float16 and bfloat16 inputs are computed in float32 (their squares overflow or lose too much) and the
result returned in the input's dtype; float64 stays float64. Pure torch ops, so CPU and CUDA alike,
any memory format (channels_last stays channels_last). Under torch.compile the in-place path is
swapped for a functional one of the same maths (pad, shifted slices, adds) that the compiler can fuse;
dynamo traces the autograd.Function without a graph break.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

__all__ = ["local_response_norm", "spatial_response_norm"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (no narrowing, no widening of float32)."""
    return torch.promote_types(dtype, torch.float32)


def _neg_pow(d: torch.Tensor, beta: float) -> torch.Tensor:
    """d^-beta in a new tensor. For the paper's beta = 0.75, (sqrt(rsqrt(d)))^3: three cheap passes
    (pow with exponent 3 is x*x*x) instead of one generic pow, which costs about three times as much on CPU."""
    if beta == 0.75:
        return torch.rsqrt(d).sqrt_().pow_(3)
    return torch.pow(d, -beta)


def _shifts(size: int, c: int) -> list[int]:
    """Channel offsets j - c of the window S (c - size//2 .. c + (size-1)//2), without 0 and without
    offsets that reach past all C channels (they only ever meet the zero padding)."""
    return [s for s in range(-(size // 2), (size - 1) // 2 + 1) if s != 0 and abs(s) < c]


def _denominator_eager(x: torch.Tensor, size: int, alpha: float, k: float) -> torch.Tensor:
    """d = k + alpha/size * S(x^2), accumulated in place: one new tensor, then one addcmul_ per offset.

    No padded buffer: an offset s adds x[c + s]^2 to the channels c for which c + s exists, which is
    the zero padding of F.local_response_norm. Each fresh CPU buffer of this size costs as much as
    several passes over it (page faults), so the number of new tensors is what is kept down.
    """
    c = x.shape[1]
    coef = alpha / size
    d = torch.addcmul(x.new_full((), k), x, x, value=coef)  # (N, C, H, W), laid out like x
    for s in _shifts(size, c):
        if s > 0:  # d[:, j] += coef * x[:, j + s]^2 for j < C - s
            d[:, : c - s].addcmul_(x[:, s:], x[:, s:], value=coef)
        else:  # d[:, j] += coef * x[:, j + s]^2 for j >= -s
            d[:, -s:].addcmul_(x[:, : c + s], x[:, : c + s], value=coef)
    return d


def _grad_eager(
    g: torch.Tensor, x: torch.Tensor, d: torch.Tensor, size: int, alpha: float, beta: float
) -> torch.Tensor:
    """g * d^-beta - 2 beta alpha/size * x * S^T(g x d^(-beta-1)), with two new tensors.

    S^T(t)[j] sums t[c] over the c whose window holds j, i.e. t[j - s] for every offset s of S; each
    offset is one addcmul_ straight into the result, so S^T(t) itself is never stored.
    """
    c = x.shape[1]
    coef = -2.0 * beta * alpha / size
    u = _neg_pow(d, beta).mul_(g)  # (N, C, H, W): g * d^-beta, becomes the result
    t = torch.mul(u, x).div_(d)  # (N, C, H, W): g * x * d^(-beta-1)
    u.addcmul_(x, t, value=coef)  # offset 0
    for s in _shifts(size, c):
        if s > 0:  # result[:, j] += coef * x[:, j] * t[:, j - s] for j >= s
            u[:, s:].addcmul_(x[:, s:], t[:, : c - s], value=coef)
        else:  # result[:, j] += coef * x[:, j] * t[:, j - s] for j < C + s
            u[:, : c + s].addcmul_(x[:, : c + s], t[:, -s:], value=coef)
    return u


def _shifted_sum_functional(v: torch.Tensor, size: int, before: int, after: int, fill: float) -> torch.Tensor:
    """The same window sum from out-of-place ops only (pad, slice, add), for torch.compile to fuse."""
    c = v.shape[1]
    p = torch.nn.functional.pad(v, (0, 0, 0, 0, before, after), value=fill)  # (N, C + size - 1, H, W)
    s = p[:, 0:c]
    for i in range(1, size):
        s = s + p[:, i : i + c]
    return s  # (N, C, H, W)


class _LocalResponseNorm(torch.autograd.Function):
    """b = a * d^-beta with d = k + alpha/size * S(a^2); backward by hand (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
        dtype = _compute_dtype(x.dtype)
        xc = x.to(dtype)  # no copy unless x is half/bfloat16
        if torch.compiler.is_compiling():
            # every term, padding included, carries k/size, so the window sums to d itself
            d = _shifted_sum_functional(xc * xc * (alpha / size) + k / size, size, size // 2, (size - 1) // 2, k / size)
            out = xc * d.pow(-beta)
        else:
            d = _denominator_eager(xc, size, alpha, k)
            out = _neg_pow(d, beta).mul_(xc)  # d^-beta is not saved: the backward recomputes it
        ctx.save_for_backward(x, d)
        ctx.size, ctx.alpha, ctx.beta = size, alpha, beta
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        x, d = ctx.saved_tensors
        size, alpha, beta = ctx.size, ctx.alpha, ctx.beta
        xc = x.to(d.dtype)
        if torch.compiler.is_compiling():
            u = g.to(d.dtype) * d.pow(-beta)  # g * d^-beta
            # S^T pads the mirror image of S: (size - 1)//2 channels before, size//2 after
            t = _shifted_sum_functional(u * xc / d, size, (size - 1) // 2, size // 2, 0.0)  # S^T(g a d^(-beta-1))
            grad = u + (-2.0 * beta * alpha / size) * xc * t
        else:
            grad = _grad_eager(g, xc, d, size, alpha, beta)
        return grad.to(x.dtype), None, None, None, None


def local_response_norm(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """P 3.3 local response normalisation across channels; same result as F.local_response_norm.

    x: (N, C, H, W), any float dtype and memory format, CPU or CUDA. Returns (N, C, H, W) in x's dtype:
    x / (k + alpha/size * sum of x^2 over channels c - size//2 .. c + (size-1)//2)^beta.
    Differentiable in x only, through a hand-written backward (the module docstring has the formula).
    """
    if x.dim() != 4:
        raise ValueError(f"local_response_norm expects a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"local_response_norm expects a floating-point tensor, got {x.dtype}")
    if size < 1:
        raise ValueError(f"local_response_norm needs size >= 1, got {size}")
    if x.numel() == 0:
        return x.clone()
    return _LocalResponseNorm.apply(x, int(size), float(alpha), float(beta), float(k))


# Within a map (K12's `cnorm2`, a `type=rnorm` layer after LRN2 in layers-145.cfg, scale 0.001, pow 0.75):
#
#     b = a * d^-beta,    d = 1 + alpha/size^2 * W(a^2),
#     W(v)[y, x] = sum of v over the size x size window centred on (y, x), zero past the map's edge
#
# (cuda-convnet divides its scale by size^2 and starts the denominator at 1). W is one avg_pool2d with
# count_include_pad (a fused kernel on the CPU and the GPU) times size^2, so alpha/size^2 * W = alpha *
# avg. For odd sizes W is its own adjoint, so the backward is
#
#     grad_a = g * d^-beta - 2 * beta * alpha * a * avg(g * a * d^(-beta-1)),
#
# one more avg_pool2d. Saved: a and d, as for the LRN across maps.


def _window_mean(v: torch.Tensor, size: int) -> torch.Tensor:
    """W(v) / size^2: the mean over the size x size window centred on each pixel, zeros past the edge."""
    return torch.nn.functional.avg_pool2d(v, size, stride=1, padding=size // 2, count_include_pad=True)


class _SpatialResponseNorm(torch.autograd.Function):
    """b = a * d^-beta with d = 1 + alpha * mean of a^2 over the window; backward by hand (see above)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, size: int, alpha: float, beta: float) -> torch.Tensor:
        xc = x.to(_compute_dtype(x.dtype))
        d = _window_mean(xc * xc, size) * alpha + 1.0  # (N, C, H, W)
        out = xc * d.pow(-beta) if torch.compiler.is_compiling() else _neg_pow(d, beta).mul_(xc)
        ctx.save_for_backward(x, d)
        ctx.size, ctx.alpha, ctx.beta = size, alpha, beta
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        x, d = ctx.saved_tensors
        xc = x.to(d.dtype)
        u = g.to(d.dtype) * d.pow(-ctx.beta)  # g * d^-beta
        grad = u - (2.0 * ctx.beta * ctx.alpha) * xc * _window_mean(u * xc / d, ctx.size)
        return grad.to(x.dtype), None, None, None


def spatial_response_norm(x: torch.Tensor, size: int, alpha: float, beta: float) -> torch.Tensor:
    """K12's normalisation within each map (`cnorm2`): x / (1 + alpha/size^2 * sum of x^2 over the
    size x size window around each pixel, clipped at the map's edge)^beta, every map on its own.

    x: (N, C, H, W), any float dtype (half and bfloat16 computed in float32), CPU or CUDA; size odd.
    """
    if x.dim() != 4:
        raise ValueError(f"spatial_response_norm expects a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"spatial_response_norm expects a floating-point tensor, got {x.dtype}")
    if size < 1 or size % 2 == 0:
        raise ValueError(f"spatial_response_norm needs an odd size >= 1 (a window centred on the pixel), got {size}")
    if x.numel() == 0:
        return x.clone()
    return _SpatialResponseNorm.apply(x, int(size), float(alpha), float(beta))
