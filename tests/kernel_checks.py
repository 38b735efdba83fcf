"""Shared by the kernel tests: shapes, float64 references, ulp distances and error bounds."""
from __future__ import annotations

import torch

ROWS = (1, 7, 61)
DIMS = (1, 7, 576, 4096 + 3)
EPS = 1e-5

_MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
_MIN_EXPONENT = {torch.float32: -126, torch.float16: -14, torch.bfloat16: -126}


def ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at each |t| (float64); subnormal spacing near zero."""
    t = t.double().abs()
    _, exponent = torch.frexp(t)  # t = m * 2**exponent, m in [0.5, 1)
    exponent = torch.where(t == 0, _MIN_EXPONENT[dtype], exponent - 1)
    exponent = exponent.clamp(min=_MIN_EXPONENT[dtype])
    return torch.ldexp(torch.ones_like(t), exponent - _MANTISSA_BITS[dtype])


def max_ulps(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest distance in units of `expected.dtype`'s last place; inf on any NaN."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if actual.numel() == 0:
        return 0.0
    if torch.isnan(actual).any() or torch.isnan(expected).any():
        return float("inf")
    diff = (actual.double() - expected.double()).abs()
    return (diff / ulp(expected, expected.dtype)).max().item()


def assert_error_bounded(actual: torch.Tensor, low_precision: torch.Tensor,
                         exact: torch.Tensor, torch_error: float | None = None) -> None:
    """The kernel's error against the float64 `exact` is at most twice that of the plain-torch
    computation in the same dtype (`low_precision`), plus one rounding of the largest value.
    torch_error: the plain-torch error measured over more elements than `actual` has (default:
    over `low_precision`)."""
    assert not torch.isnan(actual).any(), "kernel output has NaN"
    kernel_error = (actual.double() - exact).abs().max().item()
    if torch_error is None:
        torch_error = (low_precision.double() - exact).abs().max().item()
    slack = torch.finfo(actual.dtype).eps * exact.abs().max().item()
    assert kernel_error <= 2 * torch_error + slack, (kernel_error, torch_error, slack)


def rms_norm_exact(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)


def silu_mul_exact(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.double().chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


def strided(rows: int, width: int, dtype: torch.dtype, pad: int, fill: float | None = None,
            device: str = "cpu") -> torch.Tensor:
    """A [rows, width] view with row stride width + pad (random normal, or `fill`)."""
    base = torch.empty(rows, width + pad, dtype=torch.float32, device=device)
    base = base.normal_() if fill is None else base.fill_(fill)
    return base.to(dtype)[:, :width]


def random_weight(dim: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    return (1.0 + 0.25 * torch.randn(dim, device=device)).to(dtype)
