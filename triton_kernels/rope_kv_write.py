"""Rotary embedding of q and k fused with the KV-cache write: one launch per attention layer.

    q_rot                        = rope(q)
    k_cache[:, start:start + T]  = rope(k)   (transposed: the cache is [Hkv, S, D])
    v_cache[:, start:start + T]  = v
rope(x) = x * cos + rotate_half(x) * sin with transformers' layout (cos/sin [T, D], halves
duplicated), so with h = D / 2 and x = (x1 | x2):
    out1 = x1 * cos[:h] - x2 * sin[:h]        out2 = x2 * cos[h:] + x1 * sin[h:]
Same roundings as `TorchOps.rope` (each op of `x * cos + rotated * sin` rounded to the dtype):
the products are exact in float32 for 16-bit inputs, each is rounded to the dtype, their sum is
rounded once more. Compiled without FMA contraction, so float32 matches torch bit for bit too.

Grid (head blocks, T): a program owns BLOCK_H heads of one token. The first ceil(Hq / BLOCK_H)
blocks rotate q heads into q_rot; the rest rotate k heads into the cache and copy the same v
heads, so a decode step (T = 1) still spreads over ~2 * H / BLOCK_H programs. The kernel is
bound by moving (Hq + 2 Hkv) * D elements per token in and out; nothing is read twice.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._checks import check_like, check_tensor

MAX_HEAD_DIM = 1024
BLOCK_ELEMENTS = 512  # BLOCK_H * D per program: 4 heads of 128


@triton.jit
def _rotate_heads(src_ptr, src_stride_h, dst_ptr, dst_stride_h, heads, c1, c2, s1, s2, cols,
                  col_ok, half, first_head, BLOCK_H: tl.constexpr):
    """BLOCK_H heads from `first_head` of one token: rope(src) -> dst (row pointers given)."""
    h = first_head + tl.arange(0, BLOCK_H)
    mask = (h < heads)[:, None] & col_ok[None, :]
    src = src_ptr + h.to(tl.int64)[:, None] * src_stride_h + cols[None, :]  # [BLOCK_H, half]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + half, mask=mask, other=0.0)
    dtype = x1.dtype
    a1 = (x1.to(tl.float32) * c1[None, :]).to(dtype).to(tl.float32)
    b1 = (x2.to(tl.float32) * s1[None, :]).to(dtype).to(tl.float32)
    a2 = (x2.to(tl.float32) * c2[None, :]).to(dtype).to(tl.float32)
    b2 = (x1.to(tl.float32) * s2[None, :]).to(dtype).to(tl.float32)
    dst = dst_ptr + h.to(tl.int64)[:, None] * dst_stride_h + cols[None, :]
    tl.store(dst, (a1 - b1).to(dtype), mask=mask)
    tl.store(dst + half, (a2 + b2).to(dtype), mask=mask)


@triton.jit
def _rope_kv_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr,
                          v_cache_ptr, start, q_heads, kv_heads, half, q_stride_t, q_stride_h,
                          k_stride_t, k_stride_h, v_stride_t, v_stride_h, cos_stride, sin_stride,
                          q_out_stride_t, q_out_stride_h, k_cache_stride_h, k_cache_stride_s,
                          v_cache_stride_h, v_cache_stride_s, BLOCK_H: tl.constexpr,
                          BLOCK_HALF: tl.constexpr):
    token = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_ok = cols < half
    cos_row = cos_ptr + token * cos_stride
    sin_row = sin_ptr + token * sin_stride
    c1 = tl.load(cos_row + cols, mask=col_ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + half + cols, mask=col_ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + cols, mask=col_ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + half + cols, mask=col_ok, other=0.0).to(tl.float32)
    q_blocks = tl.cdiv(q_heads, BLOCK_H)
    block = tl.program_id(0)
    if block < q_blocks:
        _rotate_heads(q_ptr + token * q_stride_t, q_stride_h, q_out_ptr + token * q_out_stride_t,
                      q_out_stride_h, q_heads, c1, c2, s1, s2, cols, col_ok, half,
                      block * BLOCK_H, BLOCK_H)
    else:
        first = (block - q_blocks) * BLOCK_H
        slot = start + token
        _rotate_heads(k_ptr + token * k_stride_t, k_stride_h,
                      k_cache_ptr + slot * k_cache_stride_s, k_cache_stride_h, kv_heads, c1, c2,
                      s1, s2, cols, col_ok, half, first, BLOCK_H)
        h = first + tl.arange(0, BLOCK_H)
        mask = (h < kv_heads)[:, None] & col_ok[None, :]
        src = v_ptr + token * v_stride_t + h.to(tl.int64)[:, None] * v_stride_h + cols[None, :]
        dst = (v_cache_ptr + slot * v_cache_stride_s + h.to(tl.int64)[:, None] * v_cache_stride_h
               + cols[None, :])
        tl.store(dst, tl.load(src, mask=mask), mask=mask)
        tl.store(dst + half, tl.load(src + half, mask=mask), mask=mask)


def _check_heads(t: torch.Tensor, name: str, rows: int, head_dim: int, ref: torch.Tensor) -> None:
    """`t` is [rows, heads, head_dim] like `ref` (q), contiguous in its last dim."""
    check_like(t, name, ref, "q")
    if t.dim() != 3 or t.shape[0] != rows or t.shape[2] != head_dim:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{rows}, heads, "
                         f"{head_dim}] (q is {tuple(ref.shape)})")
    if t.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def _check_table(t: torch.Tensor, name: str, rows: int, head_dim: int, ref: torch.Tensor) -> None:
    check_like(t, name, ref, "q")
    if tuple(t.shape) != (rows, head_dim):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{rows}, {head_dim}]")
    if t.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def _check_caches(k_cache, v_cache, kv_heads: int, head_dim: int, q: torch.Tensor) -> int:
    """Both caches [Hkv, S, D] with one S, contiguous in D; returns S."""
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_like(cache, name, q, "q")
        if cache.dim() != 3 or cache.shape[0] != kv_heads or cache.shape[2] != head_dim:
            raise ValueError(f"{name} has shape {tuple(cache.shape)}; expected [{kv_heads}, S, "
                             f"{head_dim}] (Hkv from k, D from q)")
        if cache.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides "
                             f"{cache.stride()}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache has shape {tuple(k_cache.shape)} but v_cache has "
                         f"{tuple(v_cache.shape)}")
    return k_cache.shape[1]


def _check_args(q, k, v, cos, sin, k_cache, v_cache, start) -> None:
    check_tensor(q, "q", _rope_kv_write_kernel)
    if q.dim() != 3:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected [T, Hq, D]")
    t, _, head_dim = q.shape
    if head_dim % 2 or not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q has head dim {head_dim}; expected an even size in 2..{MAX_HEAD_DIM}")
    _check_heads(q, "q", t, head_dim, q)
    _check_heads(k, "k", t, head_dim, q)
    _check_heads(v, "v", t, head_dim, q)
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
    _check_table(cos, "cos", t, head_dim, q)
    _check_table(sin, "sin", t, head_dim, q)
    slots = _check_caches(k_cache, v_cache, k.shape[1], head_dim, q)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    if start + t > slots:
        raise ValueError(f"start {start} + T {t} exceeds the cache's {slots} slots")


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """rope(k) and v into cache slots start..start+T; returns rope(q) (in `out`, new if None).

    q [T, Hq, D], k/v [T, Hkv, D] (any row and head strides: views of the fused qkv output
    are fine), cos/sin [T, D], k_cache/v_cache [Hkv, S, D] views of any strides (per-layer
    slices of the arena), all one dtype and contiguous in D; out [T, Hq, D].
    """
    _check_args(q, k, v, cos, sin, k_cache, v_cache, start)
    t, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    else:
        check_like(out, "out", q, "q")
        if out.shape != q.shape or out.stride(2) != 1:
            raise ValueError(f"out has shape {tuple(out.shape)} strides {out.stride()}; "
                             f"expected {tuple(q.shape)}, contiguous in its last dim")
    if t == 0:
        return out
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(BLOCK_ELEMENTS // (2 * block_half),
                         triton.next_power_of_2(max(q_heads, kv_heads, 1))))
    grid = (triton.cdiv(q_heads, block_h) + triton.cdiv(kv_heads, block_h), t)
    _rope_kv_write_kernel[grid](
        q, k, v, cos, sin, out, k_cache, v_cache, start, q_heads, kv_heads, half, q.stride(0),
        q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        sin.stride(0), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=4, enable_fp_fusion=False)  # no FMA: float32 rounds like torch's mul then add
    return out


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] -> rope(x), as `TorchOps.rope` (transformers' rotate_half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rope_kv_write_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      start: int) -> torch.Tensor:
    """Plain torch: writes the caches in place, returns rope(q)."""
    t = q.shape[0]
    k_cache[:, start:start + t] = rope_ref(k, cos, sin).transpose(0, 1)
    v_cache[:, start:start + t] = v.transpose(0, 1)
    return rope_ref(q, cos, sin)
