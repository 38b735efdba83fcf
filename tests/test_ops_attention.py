"""TorchOps (the reference backend) against float64 references written out plainly here, and
KVCache.compact.

Attention: float32 within 1e-5 of float64; float16 within 2x the error of a plain float16 torch
implementation (STYLE.md habit 8). Elementwise ops follow Llama's semantics, including RMSNorm's
rounding to the input dtype before the weight is applied.
"""
from __future__ import annotations

import math

import pytest
import torch

from msd_engine.kv_cache import KVCache
from msd_engine.ops.torch_ops import TorchOps
from tests.kernel_checks import DIMS, EPS, ROWS, assert_error_bounded, max_ulps, random_weight, strided

OPS = TorchOps()
KV_HEADS = 2


# ----------------------------------------------------------------------------- cached attention

def tree_mask(t: int, region: int, g: torch.Generator) -> torch.Tensor:
    """Random [T, R] visibility; row i always sees its own entry, column R - T + i."""
    mask = torch.rand(t, region, generator=g) < 0.5
    mask[torch.arange(t), region - t + torch.arange(t)] = True
    return mask


def attention_inputs(t: int, prefix_len: int, region: int, group: int, head_dim: int, dtype: torch.dtype,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, Hq, D] as a non-contiguous split of a fused qkv (as the model makes it); caches
    [Hkv, S, D] whose slots past prefix_len + R hold NaN: attention must never read them."""
    g = torch.Generator().manual_seed(seed)
    heads = KV_HEADS * group
    qkv = (1.5 * torch.randn(t, heads + 2 * KV_HEADS, head_dim, generator=g)).to(dtype)
    q = qkv[:, :heads]
    used, slots = prefix_len + region, prefix_len + region + 5
    k_cache = torch.full((KV_HEADS, slots, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full((KV_HEADS, slots, head_dim), float("nan"), dtype=dtype)
    k_cache[:, :used] = torch.randn(KV_HEADS, used, head_dim, generator=g).to(dtype)
    v_cache[:, :used] = torch.randn(KV_HEADS, used, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache


def visibility(t: int, prefix_len: int, mask: torch.Tensor | None) -> torch.Tensor:
    """[T, prefix_len + R]: the whole prefix, then the mask (all of the T new entries if None)."""
    region = t if mask is None else mask.shape[1]
    full = torch.ones(t, prefix_len + region, dtype=torch.bool)
    if mask is not None:
        full[:, prefix_len:] = mask
    return full


def attention_exact(q, k_cache, v_cache, prefix_len, mask) -> torch.Tensor:
    """float64, one query head at a time: head h reads kv head h // (Hq / Hkv)."""
    t, heads, head_dim = q.shape
    group = heads // k_cache.shape[0]
    visible = visibility(t, prefix_len, mask)
    length = visible.shape[1]
    out = torch.empty(t, heads, head_dim, dtype=torch.float64)
    for h in range(heads):
        k = k_cache[h // group, :length].double()  # [L, D]
        v = v_cache[h // group, :length].double()
        scores = q[:, h].double() @ k.T / math.sqrt(head_dim)  # [T, L]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[:, h] = torch.softmax(scores, dim=-1) @ v
    return out


def attention_plain(q, k_cache, v_cache, prefix_len, mask) -> torch.Tensor:
    """The textbook implementation in q's dtype (scores, softmax and all): the error yardstick."""
    t, heads, head_dim = q.shape
    group = heads // k_cache.shape[0]
    visible = visibility(t, prefix_len, mask)
    length = visible.shape[1]
    k = k_cache[:, :length].repeat_interleave(group, dim=0)  # [Hq, L, D]
    v = v_cache[:, :length].repeat_interleave(group, dim=0)
    scores = torch.einsum("thd,hld->htl", q, k) * (1.0 / math.sqrt(head_dim))
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("htl,hld->thd", probs, v)


HEAD_SHAPES = [(1, 64), (3, 128), (4, 40), (4, 128)]  # (GQA group Hq/Hkv, head dim): every group, every dim


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("group, head_dim", HEAD_SHAPES)
@pytest.mark.parametrize("region_factor", [1, 3], ids=["R=T", "R=3T"])
@pytest.mark.parametrize("prefix_len", [0, 1, 577])
@pytest.mark.parametrize("t", [1, 7, 60])
def test_cached_attention_tree_mask(t, prefix_len, region_factor, group, head_dim, dtype):
    region = region_factor * t
    seed = hash((t, prefix_len, region, group, head_dim)) % 2**31
    q, k_cache, v_cache = attention_inputs(t, prefix_len, region, group, head_dim, dtype, seed)
    mask = tree_mask(t, region, torch.Generator().manual_seed(seed))
    out = OPS.cached_attention(q, k_cache, v_cache, prefix_len, mask)
    assert out.shape == q.shape and out.dtype == dtype
    exact = attention_exact(q, k_cache, v_cache, prefix_len, mask)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
    else:
        assert_error_bounded(out, attention_plain(q, k_cache, v_cache, prefix_len, mask), exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("prefix_len", [0, 1, 577])
@pytest.mark.parametrize("t", [1, 7, 60])
def test_cached_attention_without_mask_sees_everything(t, prefix_len, dtype):
    q, k_cache, v_cache = attention_inputs(t, prefix_len, t, 4, 64, dtype, seed=t + prefix_len)
    out = OPS.cached_attention(q, k_cache, v_cache, prefix_len, None)
    exact = attention_exact(q, k_cache, v_cache, prefix_len, None)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
    else:
        assert_error_bounded(out, attention_plain(q, k_cache, v_cache, prefix_len, None), exact)


def test_cached_attention_mask_selects_keys():
    # One visible key per row (beside an all-masked-out scratch region): the output is its value.
    t, prefix_len, region = 4, 0, 8
    q, k_cache, v_cache = attention_inputs(t, prefix_len, region, 3, 40, torch.float32, seed=5)
    mask = torch.zeros(t, region, dtype=torch.bool)
    mask[torch.arange(t), region - t + torch.arange(t)] = True
    out = OPS.cached_attention(q, k_cache, v_cache, prefix_len, mask)
    for i in range(t):
        for h in range(q.shape[1]):
            torch.testing.assert_close(out[i, h], v_cache[h // 3, region - t + i], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- rope

def rope_tables_exact(positions: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """float64 [T, D] cos/sin, halves duplicated (transformers' layout)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.double()[:, None] * inv_freq[None, :]  # [T, D/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rope_exact(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x = x.double()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # rotate_half
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [40, 64, 128])
@pytest.mark.parametrize("t", ROWS)
def test_rope(t, head_dim, dtype):
    g = torch.Generator().manual_seed(t * head_dim)
    heads = 4
    x = torch.randn(t, heads + 2, head_dim, generator=g).to(dtype)[:, :heads]  # non-contiguous, as q after split
    positions = torch.randint(0, 4096, (t,), generator=g)
    positions[0] = 0
    cos, sin = rope_tables_exact(positions, head_dim)
    out = OPS.rope(x, cos.to(dtype), sin.to(dtype))
    assert out.shape == x.shape and out.dtype == dtype
    exact = rope_exact(x, cos, sin)
    x64 = x.double()
    half = head_dim // 2
    magnitude = (x64 * cos[:, None]).abs() + (torch.cat([x64[..., half:], x64[..., :half]], -1) * sin[:, None]).abs()
    bound = 3 * torch.finfo(dtype).eps * magnitude + torch.finfo(dtype).tiny
    assert ((out.double() - exact).abs() <= bound).all(), (out.double() - exact).abs().max()
    assert torch.equal(out[0], x[0])  # position 0 is the identity


# ----------------------------------------------------------------------------- RMSNorm, SiLU

def rms_norm_llama_exact(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama: normalise (exactly, here), round to the input dtype, then scale by the weight."""
    x64 = x.double()
    normed = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight.double() * normed.double()


def assert_rms_norm_close(actual: torch.Tensor, exact: torch.Tensor) -> None:
    expected = exact.to(actual.dtype)
    if actual.dtype == torch.float32:
        assert max_ulps(actual, expected) <= 8
    else:
        # The float32 normalisation may land on the other side of a rounding boundary now and then
        # (one ulp of `normed`, two of the result where weight < 1); otherwise the result is exactly
        # round(weight * round(normed)), which scaling before rounding would not give.
        assert max_ulps(actual, expected) <= 2
        assert (actual != expected).float().mean().item() < 1e-3


LOW = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm(rows, dim, dtype):
    torch.manual_seed(rows * 7919 + dim)
    x = strided(rows, dim, dtype, pad=3)  # row stride != width
    weight = random_weight(dim, dtype)
    out = OPS.rms_norm(x, weight, EPS)
    assert out.shape == x.shape and out.dtype == dtype
    assert_rms_norm_close(out, rms_norm_llama_exact(x, weight, EPS))


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("rows", ROWS)
def test_add_rms_norm(rows, dim, dtype):
    torch.manual_seed(rows * 104729 + dim)
    x, residual = strided(rows, dim, dtype, pad=1), strided(rows, dim, dtype, pad=0)
    x_before = x.clone()
    weight = random_weight(dim, dtype)
    expected_residual = (x.double() + residual.double()).to(dtype)  # one correctly rounded add
    normed, new_residual = OPS.add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(new_residual, expected_residual)
    assert torch.equal(x, x_before)
    assert normed.dtype == dtype
    assert_rms_norm_close(normed, rms_norm_llama_exact(expected_residual, weight, EPS))


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul(rows, dim, dtype):
    torch.manual_seed(rows * 31 + dim)
    gate_up = strided(rows, 2 * dim, dtype, pad=5) * 2
    out = OPS.silu_mul(gate_up)
    assert out.shape == (rows, dim) and out.dtype == dtype
    gate, up = gate_up.double()[:, :dim], gate_up.double()[:, dim:]  # gate first, then up
    exact = gate * torch.sigmoid(gate) * up
    info = torch.finfo(dtype)
    bound = 2.5 * info.eps * exact.abs() + 2 * info.tiny * (1 + up.abs())
    assert ((out.double() - exact).abs() <= bound).all(), (out.double() - exact).abs().max()


# ----------------------------------------------------------------------------- KV cache compaction

def filled_cache(layers: int = 3, slots: int = 24, head_dim: int = 4) -> KVCache:
    cache = KVCache(layers, KV_HEADS, slots, head_dim, torch.float32, torch.device("cpu"))
    cache.arena.copy_(torch.arange(cache.arena.numel(), dtype=torch.float32).view_as(cache.arena))
    return cache


@pytest.mark.parametrize("start, nodes", [(10, [0, 2, 5]), (10, [0, 1, 2]), (3, [0, 1, 4, 6, 7]), (0, [0, 3])])
def test_kv_cache_compact(start, nodes):
    cache = filled_cache()
    before = cache.arena.clone()
    cache.length = start
    cache.compact(start, torch.tensor(nodes))
    m = len(nodes)
    for layer in range(3):
        k, v = cache.layer(layer)  # the per-layer views see the compaction
        for kind, view in ((0, k), (1, v)):
            old = before[kind, layer]  # [Hkv, S, D]
            for j, node in enumerate(nodes):
                assert torch.equal(view[:, start + j], old[:, start + node]), (layer, kind, j)
            assert torch.equal(view[:, :start], old[:, :start])  # the committed prefix is untouched
            assert torch.equal(view[:, start + m:], old[:, start + m:])  # only m slots are written
    assert cache.length == start


def test_kv_cache_compact_example():
    cache = filled_cache()
    before = cache.arena.clone()
    cache.compact(10, torch.tensor([0, 2, 5]))
    assert torch.equal(cache.arena[:, :, :, 10:13], before[:, :, :, [10, 12, 15]])
    assert torch.equal(cache.arena[:, :, :, :10], before[:, :, :, :10])
