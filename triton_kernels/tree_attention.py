"""Tree-masked attention over the KV cache: verification, draft-tree steps and decode (T = 1).

Semantics are those of `msd_engine.ops.torch_ops.TorchOps.cached_attention`: q [T, Hq, D] attends
to cache slots [0, prefix_len + region) of k_cache / v_cache [Hkv, S, D]. Slots < prefix_len are
visible to every query; slot prefix_len + j is visible to query i iff bit j % 32 of
mask_bits[i, j // 32] is set (`pack_mask` builds the bits from a bool [T, region] mask); no mask
means every region slot is visible. Query head h reads kv head h // (Hq // Hkv) (GQA).
A row that sees no key at all gets zeros (torch's SDPA would give NaN).

Why split the keys (flash-decoding). A verification step has T ~ 60 queries over a prefix of up
to a few thousand slots. One program per (head, query block) gives 32 programs for LLaVA-7B
(32 heads, one block of 60 queries): a quarter of an H100's 132 SMs, each walking all keys.
Instead the key range [0, prefix_len + region) is cut into `num_splits` contiguous chunks
(whole BLOCK_N blocks) and the grid is (Hkv, num_splits, query-row blocks):
  - the query tile of a program is G*T rows (row r = g * T + i is query i of head g of this KV
    group), so each K/V block is loaded once and used for all T queries of all G heads of the
    group (tiled in blocks of BLOCK_M = 64 rows over the third grid dim when G*T > 64);
  - online softmax in float32 (exp2, scores pre-scaled by log2 e) gives each program a partial
    output (normalised) and its log-sum-exp, written to a float32 scratch [splits, Hkv, G*T, D];
  - a second, small kernel combines the splits of each row with weights exp2(lse_s - max lse).
With one split the first kernel writes the final output itself and the reduce is skipped.
`choose_num_splits` takes enough splits to fill about two waves of SMs, but never fewer than
MIN_KEYS_PER_SPLIT keys per split, so short contexts (decode at small P) use one split.
Only blocks that reach past prefix_len load mask words; prefix blocks test the bound alone.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._checks import check_like, check_tensor

MAX_HEAD_DIM = 256
BLOCK_M = 64              # query rows (of G*T) per program
BLOCK_N = 64              # keys per inner step
MIN_KEYS_PER_SPLIT = 256  # below this a split's partial write + reduce costs more than it saves
TARGET_PROGRAMS = 264     # about two waves of an H100's 132 SMs
MAX_SPLITS = 64
_LOG2E = 1.4426950408889634


@triton.jit
def _tree_attention_split_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_out_ptr, part_lse_ptr,
        num_queries, group, prefix_len, num_keys, split_len, head_dim,
        q_stride_t, q_stride_h, k_stride_h, k_stride_s, v_stride_h, v_stride_s, mask_stride,
        out_stride_t, out_stride_h, qk_scale,
        HAS_MASK: tl.constexpr, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    num_rows = group * num_queries
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # r = g * T + i
    row_ok = rows < num_rows
    query = rows % num_queries
    head = (kv_head * group + rows // num_queries).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < head_dim
    q = tl.load(q_ptr + query.to(tl.int64)[:, None] * q_stride_t + head[:, None] * q_stride_h
                + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # [M, D]
    k_base = k_ptr + kv_head.to(tl.int64) * k_stride_h
    v_base = v_ptr + kv_head.to(tl.int64) * v_stride_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, num_keys)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        kv_mask = key_ok[:, None] & col_ok[None, :]
        k = tl.load(k_base + keys.to(tl.int64)[:, None] * k_stride_s + cols[None, :],
                    mask=kv_mask, other=0.0)  # [N, D]; slots >= hi never read
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [M, N]
        visible = tl.broadcast_to(key_ok[None, :], (BLOCK_M, BLOCK_N))
        if HAS_MASK:
            if start + BLOCK_N > prefix_len:  # the block reaches the tree region
                j = tl.maximum(keys - prefix_len, 0)
                in_tree = (keys >= prefix_len) & key_ok
                words = tl.load(mask_ptr + query[:, None] * mask_stride + (j // 32)[None, :],
                                mask=row_ok[:, None] & in_tree[None, :], other=0)
                bit = (words >> (j % 32)[None, :]) & 1
                visible = visible & ((bit != 0) | (keys < prefix_len)[None, :])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf: subtract 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + keys.to(tl.int64)[:, None] * v_stride_s + cols[None, :],
                    mask=kv_mask, other=0.0)  # masked: 0 * NaN would poison the sum
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if DIRECT:
        tl.store(out_ptr + query.to(tl.int64)[:, None] * out_stride_t + head[:, None] * out_stride_h
                 + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])
    else:
        part_row = (split * tl.num_programs(0) + kv_head).to(tl.int64) * num_rows + rows
        tl.store(part_out_ptr + part_row[:, None] * head_dim + cols[None, :], out,
                 mask=row_ok[:, None] & col_ok[None, :])
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part_row, lse, mask=row_ok)


@triton.jit
def _tree_attention_reduce_kernel(
        part_out_ptr, part_lse_ptr, out_ptr, num_queries, group, num_splits, head_dim,
        out_stride_t, out_stride_h, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    kv_head = tl.program_id(0)
    row = tl.program_id(1)  # g * T + i
    num_rows = group * num_queries
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < num_splits
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < head_dim
    part_row = (splits * tl.num_programs(0) + kv_head).to(tl.int64) * num_rows + row  # [S]
    lse = tl.load(part_lse_ptr + part_row, mask=split_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty splits weigh 0
    o = tl.load(part_out_ptr + part_row[:, None] * head_dim + cols[None, :],
                mask=split_ok[:, None] & col_ok[None, :], other=0.0)  # [S, D]
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0.0, total, 1.0)
    query = (row % num_queries).to(tl.int64)
    head = (kv_head * group + row // num_queries).to(tl.int64)
    tl.store(out_ptr + query * out_stride_t + head * out_stride_h + cols,
             out.to(out_ptr.dtype.element_ty), mask=col_ok)


def choose_num_splits(num_keys: int, programs_per_split: int) -> int:
    """Splits of the key range: enough programs for ~2 waves, >= MIN_KEYS_PER_SPLIT keys each."""
    by_length = triton.cdiv(num_keys, MIN_KEYS_PER_SPLIT)
    by_occupancy = triton.cdiv(TARGET_PROGRAMS, max(programs_per_split, 1))
    return max(1, min(by_length, by_occupancy, MAX_SPLITS))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [T, R] -> int32 [T, ceil(R / 32)]: bit j % 32 of word j // 32 is mask[:, j]."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a 2-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    t, r = mask.shape
    words = triton.cdiv(r, 32)
    padded = torch.zeros(t, words * 32, dtype=torch.int64, device=mask.device)
    padded[:, :r] = mask
    weights = torch.ones(32, dtype=torch.int64, device=mask.device) << torch.arange(
        32, device=mask.device)
    packed = (padded.view(t, words, 32) * weights).sum(-1)  # [T, W] in [0, 2^32)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def unpack_mask(bits: torch.Tensor, region: int) -> torch.Tensor:
    """int32 [T, W] -> bool [T, region]; the inverse of `pack_mask`."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    unpacked = (bits[:, :, None] >> shifts) & 1  # arithmetic shift; & 1 keeps the right bit
    return unpacked.bool().reshape(bits.shape[0], -1)[:, :region]


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _check_args(q, k_cache, v_cache, prefix_len, mask_bits, region, num_splits, out):
    check_tensor(q, "q", _tree_attention_split_kernel)
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        check_like(t, name, q, "q")
    if q.dim() != 3:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected [T, Hq, D]")
    t, num_heads, head_dim = q.shape
    if k_cache.dim() != 3 or k_cache.shape[2] != head_dim:
        raise ValueError(f"k_cache has shape {tuple(k_cache.shape)}; expected [Hkv, S, {head_dim}]")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)}; k_cache has "
                         f"{tuple(k_cache.shape)}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q has head dim {head_dim}; this kernel handles at most {MAX_HEAD_DIM}")
    if num_heads % k_cache.shape[0]:
        raise ValueError(f"q has {num_heads} heads, not a multiple of k_cache's "
                         f"{k_cache.shape[0]} kv heads")
    for tensor, name in ((q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache"), (out, "out")):
        if tensor is not None and tensor.stride(-1) != 1 and head_dim > 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides "
                             f"{tensor.stride()}")
    _check_int(prefix_len, "prefix_len", 0)
    _check_int(region, "region", t)
    if prefix_len + region > k_cache.shape[1]:
        raise ValueError(f"prefix_len {prefix_len} + region {region} exceeds the cache's "
                         f"{k_cache.shape[1]} slots")
    if mask_bits is not None:
        words = triton.cdiv(region, 32)
        if not isinstance(mask_bits, torch.Tensor) or mask_bits.dtype != torch.int32:
            raise TypeError(f"mask_bits must be an int32 tensor (see pack_mask), got "
                            f"{getattr(mask_bits, 'dtype', type(mask_bits).__name__)}")
        if mask_bits.device != q.device:
            raise ValueError(f"mask_bits is on {mask_bits.device} but q is on {q.device}")
        if tuple(mask_bits.shape) != (t, words) or (mask_bits.stride(-1) != 1 and words > 1):
            raise ValueError(f"mask_bits has shape {tuple(mask_bits.shape)} strides "
                             f"{mask_bits.stride()}; expected [{t}, {words}] (region {region}), "
                             "contiguous in its last dim")
    if num_splits is not None:
        _check_int(num_splits, "num_splits", 1)
        if num_splits > MAX_SPLITS:
            raise ValueError(f"num_splits {num_splits} exceeds MAX_SPLITS {MAX_SPLITS}")
    if out is not None:
        check_like(out, "out", q, "q")
        if out.shape != q.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}; expected {tuple(q.shape)}")


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   prefix_len: int, mask_bits: Optional[torch.Tensor], region: int,
                   sm_scale: Optional[float] = None, num_splits: Optional[int] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of q [T, Hq, D] over cache slots [0, prefix_len + region) -> [T, Hq, D].

    mask_bits: int32 [T, ceil(region / 32)] from `pack_mask`, or None (all region slots visible).
    num_splits: key-range splits (None: `choose_num_splits`); rounded to whole BLOCK_N blocks,
    so fewer may run. `out` (new if None) must not overlap q or the caches.
    """
    _check_args(q, k_cache, v_cache, prefix_len, mask_bits, region, num_splits, out)
    t, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[0]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if t == 0 or num_heads == 0:
        return out
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    num_keys, num_rows = prefix_len + region, group * t
    row_blocks = triton.cdiv(num_rows, BLOCK_M)
    block_m = min(BLOCK_M, max(16, triton.next_power_of_2(num_rows)))
    if num_splits is None:
        num_splits = choose_num_splits(num_keys, num_kv_heads * row_blocks)
    split_len = triton.cdiv(triton.cdiv(num_keys, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(num_keys, split_len)
    direct = num_splits == 1
    if direct:
        part_out = part_lse = out  # unused
    else:
        part_out = torch.empty(num_splits, num_kv_heads, num_rows, head_dim, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(num_splits, num_kv_heads, num_rows, dtype=torch.float32,
                               device=q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    bits = mask_bits if mask_bits is not None else q  # unused without HAS_MASK
    mask_stride = mask_bits.stride(0) if mask_bits is not None and t > 1 else 1
    # One query row's stride is meaningless (and may be anything after a transpose).
    q_stride_t = q.stride(0) if t > 1 else 0
    out_stride_t = out.stride(0) if t > 1 else 0
    _tree_attention_split_kernel[(num_kv_heads, num_splits, row_blocks)](
        q, k_cache, v_cache, bits, out, part_out, part_lse,
        t, group, prefix_len, num_keys, split_len, head_dim,
        q_stride_t, q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
        v_cache.stride(1), mask_stride, out_stride_t, out.stride(1), scale * _LOG2E,
        HAS_MASK=mask_bits is not None, DIRECT=direct, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        BLOCK_D=block_d, num_warps=4, num_stages=2)
    if not direct:
        _tree_attention_reduce_kernel[(num_kv_heads, num_rows)](
            part_out, part_lse, out, t, group, num_splits, head_dim, out_stride_t, out.stride(1),
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=1)
    return out


def tree_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       prefix_len: int, mask_bits: Optional[torch.Tensor], region: int,
                       sm_scale: Optional[float] = None) -> torch.Tensor:
    """Plain torch, float32 math, same arguments as `tree_attention`."""
    t, num_heads, head_dim = q.shape
    group = num_heads // k_cache.shape[0]
    num_keys = prefix_len + region
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    keys = k_cache[:, :num_keys].float().repeat_interleave(group, 0)  # [Hq, L, D]
    values = v_cache[:, :num_keys].float().repeat_interleave(group, 0)
    scores = torch.einsum("thd,hld->htl", q.float(), keys) * scale  # [Hq, T, L]
    if mask_bits is not None:
        visible = torch.ones(t, num_keys, dtype=torch.bool, device=q.device)
        visible[:, prefix_len:] = unpack_mask(mask_bits, region)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("htl,hld->thd", scores.softmax(-1), values).to(q.dtype)
