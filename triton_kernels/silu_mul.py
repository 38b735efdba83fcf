"""SwiGLU activation: `gate_up [..., 2F]` (gate | up) -> silu(gate) * up, `[..., F]`.

Same two roundings as `F.silu(gate) * up` in dtype (and the C kernels):
    s   = (g / (1 + exp(-g))).to(dtype)       g = gate in float32
    out = (s * up).to(dtype)                   product in float32
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._checks import as_rows, check_tensor, output, row_stride

BLOCK = 1024  # columns per program


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, inter, gate_up_stride, out_stride,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate_ptrs = gate_up_ptr + row * gate_up_stride + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0)
    up = tl.load(gate_ptrs + inter, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # tl.exp is ex2.approx(x * log2(e)): relative error ~|x| * 2^-24 (from rounding the product),
    # invisible after rounding to 16 bits, a few float32 ulps for |g| ~ 10.
    silu = tl.div_rn(g, 1.0 + tl.exp(-g)).to(gate.dtype)
    out = (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    tl.store(out_ptr + row * out_stride + cols, out, mask=mask)


def silu_mul(gate_up: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`gate_up [..., 2F]` -> silu(gate) * up `[..., F]` (in `out` if given; must not overlap)."""
    check_tensor(gate_up, "gate_up", _silu_mul_kernel)
    width = gate_up.shape[-1] if gate_up.dim() > 0 else 0
    if width % 2:
        raise ValueError(f"gate_up has odd last dim {width}; expected [..., 2 * inter]")
    inter = width // 2
    g2 = as_rows(gate_up, "gate_up", width)
    out = output(out, tuple(gate_up.shape[:-1]) + (inter,), gate_up)
    out2 = as_rows(out, "out", inter)
    if g2.shape[0] == 0:
        return out
    grid = (g2.shape[0], triton.cdiv(inter, BLOCK))
    _silu_mul_kernel[grid](g2, out2, inter, row_stride(g2), row_stride(out2), BLOCK=BLOCK)
    return out


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
