"""RMSNorm and fused residual-add + RMSNorm: one program per row, the whole row in registers.

Same roundings as the C kernels and `msd_engine.ops.TorchOps` (transformers' LlamaRMSNorm):
    h   = x32 * (1 / sqrt(mean(x32^2) + eps))     float32
    out = weight * h.to(dtype)                     product rounded to dtype
add_rms_norm first does `residual = (residual + x).to(dtype)` in place and normalises that.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._checks import as_rows, check_like, check_tensor, output, row_stride

MAX_DIM = 65536  # the row must fit one program's registers


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, dim, x_stride, residual_stride,
                     out_stride, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual_ptrs = residual_ptr + row * residual_stride + cols
        residual = tl.load(residual_ptrs, mask=mask, other=0.0)
        x = (residual.to(tl.float32) + x.to(tl.float32)).to(x.dtype)
        tl.store(residual_ptrs, x, mask=mask)
    x32 = x.to(tl.float32)
    # IEEE division and sqrt (plain `/` is div.full, 2 ulps), as the C kernels.
    mean_square = tl.div_rn(tl.sum(x32 * x32, axis=0), tl.cast(dim, tl.float32))
    inv_rms = tl.div_rn(1.0, tl.sqrt_rn(mean_square + eps))
    h = (x32 * inv_rms).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = (weight.to(tl.float32) * h.to(tl.float32)).to(x.dtype)
    tl.store(out_ptr + row * out_stride + cols, out, mask=mask)


def _num_warps(block: int) -> int:
    return 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32


def _launch(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
            out: Optional[torch.Tensor]) -> torch.Tensor:
    check_tensor(x, "x", _rms_norm_kernel)
    dim = x.shape[-1] if x.dim() > 0 else 0
    if dim > MAX_DIM:
        raise ValueError(f"x has last dim {dim}; this kernel handles at most {MAX_DIM}")
    x2 = as_rows(x, "x", dim)
    check_like(weight, "weight", x, "x")
    if weight.shape != (dim,) or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous with shape ({dim},), got shape "
                         f"{tuple(weight.shape)} strides {weight.stride()}")
    r2 = x2  # unused by the kernel unless HAS_RESIDUAL
    if residual is not None:
        check_like(residual, "residual", x, "x")
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}; x has {tuple(x.shape)}")
        r2 = as_rows(residual, "residual", dim)
    out = output(out, tuple(x.shape), x)
    out2 = as_rows(out, "out", dim)
    if x2.shape[0] == 0:
        return out
    block = triton.next_power_of_2(dim)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, out2, dim, row_stride(x2), row_stride(r2), row_stride(out2), float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm over the last dim of `x [..., dim]` into `out` (new if None; may be `x`)."""
    return _launch(x, None, weight, eps, out)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`residual += x` in place, then returns RMSNorm(residual) in `out` (new if None)."""
    return _launch(x, residual, weight, eps, out)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x); does not modify `residual`."""
    residual = residual + x
    return rms_norm_ref(residual, weight, eps), residual
