"""rope_kv_write and logsoftmax_topk against float64 and their `*_ref`s (CUDA or interpreter).

rope_kv_write rounds like `TorchOps.rope`, so it is bit-exact against `rope_kv_write_ref` in the
same dtype; the caches are poisoned arenas and every slot outside [start, start + T) of the
written layer must stay NaN. logsoftmax_topk: its top-k values' error against float64 is at
most twice the plain torch reference's (tests/kernel_checks.assert_error_bounded), the float64
log-probs at its indices are its values, and on integer logits (exact, many ties) its indices
are exactly the stable descending order: equal values by ascending vocabulary index.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from msd_engine.triton_kernels.lm_head_topk import logsoftmax_topk, logsoftmax_topk_ref
from msd_engine.triton_kernels.rope_kv_write import rope_kv_write, rope_kv_write_ref
from tests.kernel_checks import assert_error_bounded
from tests.test_triton_tree_attention import compile_for_sm90

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = (torch.float32, torch.float16) + (() if INTERPRET else (torch.bfloat16,))
NAN = float("nan")


def randn(*shape: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0):
    return (scale * torch.randn(*shape, generator=gen)).to(dtype).to(DEVICE)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit, NaN where expected is NaN (the poisoned slots nobody may write)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


# ---- rope_kv_write ---------------------------------------------------------------------------
def rotary(positions: torch.Tensor, head_dim: int, dtype: torch.dtype):
    """cos/sin [T, D] in transformers' layout (halves duplicated), theta 10000."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).double() / head_dim)
    angles = positions.double()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)


def rope_exact(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """float64: (x1 | x2) -> (x1 cos - x2 sin | x2 cos + x1 sin), per head."""
    x, cos, sin = x.double(), cos.double()[:, None, :], sin.double()[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos[..., :half] - x2 * sin[..., :half],
                      x2 * cos[..., half:] + x1 * sin[..., half:]), dim=-1)


def fused_qkv(t: int, q_heads: int, kv_heads: int, head_dim: int, dtype, gen):
    """q, k, v as the model has them: head-split views of one [T, (Hq + 2 Hkv) * D] row."""
    qkv = randn(t, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, gen=gen, scale=2.0)
    return qkv.view(t, -1, head_dim).split([q_heads, kv_heads, kv_heads], dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", (64, 128))
@pytest.mark.parametrize("q_heads, kv_heads", ((4, 4), (6, 2), (5, 1)))
@pytest.mark.parametrize("t", (1, 7, 60))
def test_rope_kv_write(t, q_heads, kv_heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(t * 101 + q_heads * 11 + kv_heads + head_dim)
    q, k, v = fused_qkv(t, q_heads, kv_heads, head_dim, dtype, gen)
    start = 3 + t
    positions = start + torch.randint(0, t, (t,), generator=gen)  # tree depths, not an arange
    cos, sin = rotary(positions, head_dim, dtype)
    # Two layers of an arena [2, L, Hkv, S, D]; layer 1 is written, everything else stays NaN.
    arena = torch.full((2, 2, kv_heads, start + t + 5, head_dim), NAN, dtype=dtype, device=DEVICE)
    expected_arena = arena.clone()
    out = torch.full_like(q, NAN)
    assert rope_kv_write(q, k, v, cos, sin, arena[0, 1], arena[1, 1], start, out=out) is out
    expected = rope_kv_write_ref(q, k, v, cos, sin, expected_arena[0, 1], expected_arena[1, 1],
                                 start)
    assert_same(out, expected)
    assert_same(arena, expected_arena)
    assert_error_bounded(out, expected, rope_exact(q, cos, sin))
    written = arena[0, 1, :, start:start + t].transpose(0, 1)  # [T, Hkv, D]
    assert_error_bounded(written, expected_arena[0, 1, :, start:start + t].transpose(0, 1),
                         rope_exact(k, cos, sin))
    assert torch.equal(arena[1, 1, :, start:start + t], v.transpose(0, 1))


def test_rope_kv_write_padded_arena_and_random_tables():
    """Cache rows padded to D + 3 (head and slot strides not multiples of D), a new q_rot, and
    cos/sin whose halves differ (the kernel reads both halves, as the reference)."""
    gen = torch.Generator().manual_seed(5)
    t, q_heads, kv_heads, head_dim = 7, 4, 2, 64
    q, k, v = fused_qkv(t, q_heads, kv_heads, head_dim, torch.float16, gen)
    cos = randn(t, head_dim, dtype=torch.float16, gen=gen)
    sin = randn(t, head_dim + 8, dtype=torch.float16, gen=gen)[:, 4:4 + head_dim]
    base = torch.full((2, kv_heads, 16, head_dim + 3), NAN, dtype=torch.float16, device=DEVICE)
    expected_base = base.clone()
    out = rope_kv_write(q, k, v, cos, sin, base[0, ..., :head_dim], base[1, ..., :head_dim], 9)
    expected = rope_kv_write_ref(q, k, v, cos, sin, expected_base[0, ..., :head_dim],
                                 expected_base[1, ..., :head_dim], 9)
    assert out.shape == q.shape and out.is_contiguous()
    assert_same(out, expected)
    assert_same(base, expected_base)
    assert torch.isnan(base[..., head_dim:]).all()


def _rope_call(**changes):
    gen = torch.Generator().manual_seed(1)
    q, k, v = fused_qkv(3, 4, 2, 8, torch.float32, gen)
    cos, sin = rotary(torch.arange(3), 8, torch.float32)
    caches = torch.zeros(2, 2, 10, 8, device=DEVICE)
    args = dict(q=q, k=k, v=v, cos=cos, sin=sin, k_cache=caches[0], v_cache=caches[1], start=2)
    args.update(changes)
    return rope_kv_write(**args)


@pytest.mark.parametrize("changes, error, match", [
    (dict(q=torch.zeros(3, 32)), ValueError, r"q has shape \(3, 32\); expected \[T, Hq, D\]"),
    (dict(q=torch.zeros(3, 4, 7)), ValueError, "q has head dim 7; expected an even size"),
    (dict(q=torch.zeros(3, 4, 8, dtype=torch.float64)), TypeError, "q has dtype torch.float64"),
    (dict(k=torch.zeros(3, 2, 8, dtype=torch.float16)), TypeError, "k has dtype torch.float16"),
    (dict(k=torch.zeros(3, 2, 8, device="meta")), ValueError, "k is on meta but q is on"),
    (dict(k=torch.zeros(4, 2, 8)), ValueError, r"k has shape \(4, 2, 8\); expected \[3, heads"),
    (dict(v=torch.zeros(3, 3, 8)), ValueError, r"v has shape \(3, 3, 8\) but k has \(3, 2, 8\)"),
    (dict(v=torch.zeros(3, 2, 16)[..., ::2]), ValueError, "v must be contiguous in its last dim"),
    (dict(cos=torch.zeros(3, 16)), ValueError, r"cos has shape \(3, 16\); expected \[3, 8\]"),
    (dict(sin=torch.zeros(2, 8)), ValueError, r"sin has shape \(2, 8\)"),
    (dict(k_cache=torch.zeros(3, 10, 8)), ValueError, r"k_cache has shape \(3, 10, 8\); expected"),
    (dict(v_cache=torch.zeros(2, 11, 8)), ValueError, "k_cache has shape .* but v_cache has"),
    (dict(start=8), ValueError, "start 8 \\+ T 3 exceeds the cache's 10 slots"),
    (dict(start=-1), ValueError, "start must be a non-negative int, got -1"),
    (dict(start=2.0), ValueError, "start must be a non-negative int, got 2.0"),
])
def test_rope_kv_write_argument_errors(changes, error, match):
    changes = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
               for k, v in changes.items()}
    with pytest.raises(error, match=match):
        _rope_call(**changes)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's own limitation")
def test_rope_kv_write_bfloat16_refused_in_interpreter():
    with pytest.raises(TypeError, match="q is bfloat16, which the Triton interpreter cannot"):
        _rope_call(q=torch.zeros(3, 4, 8, dtype=torch.bfloat16))


# ---- logsoftmax_topk -------------------------------------------------------------------------
def topk_exact(hidden: torch.Tensor, weight: torch.Tensor, k: int):
    """float64 log-probs [T, V] and their k largest per row (stable: ties by ascending index)."""
    log_probs = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    values, indices = torch.sort(log_probs, dim=-1, descending=True, stable=True)
    return log_probs, values[:, :k], indices[:, :k]


def check_topk(hidden, weight, k, values, indices):
    t = hidden.shape[0]
    assert values.shape == indices.shape == (t, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert (values[:, 1:] <= values[:, :-1]).all(), "values not descending"
    assert ((indices >= 0) & (indices < weight.shape[0])).all()
    assert all(len(set(row)) == k for row in indices.tolist()), "an index repeats"
    log_probs, exact_values, _ = topk_exact(hidden, weight, k)
    ref_values, _ = logsoftmax_topk_ref(hidden, weight, k)
    # torch's error level over the whole row, not at the k values only: with T = k = 1 that is one
    # number, which a lucky rounding can make tiny (seen on an Intel Xeon: 7e-8 against the
    # kernel's 9e-7 on a log-prob of -2.3, about 4 ulps)
    ref_row = torch.log_softmax(torch.nn.functional.linear(hidden, weight).float(), dim=-1)
    torch_error = (ref_row.double() - log_probs).abs().max().item()
    assert_error_bounded(values, ref_values, exact_values, torch_error=torch_error)
    # Each index carries its value, within the same bound (near-ties may come in either order).
    kernel_error = (values.double() - log_probs.gather(1, indices)).abs().max().item()
    slack = torch.finfo(torch.float32).eps * exact_values.abs().max().item()
    assert kernel_error <= 2 * torch_error + slack, (kernel_error, torch_error, slack)


# (T, V, H, k, block_v): tail tiles, T over one row block, k past a tail tile's valid columns.
TOPK_CASES = [
    (1, 1000, 64, 1, 128),
    (7, 4099, 64, 4, 128),
    (60, 32064, 64, 10, 1024),
    (70, 1000, 64, 10, 32),
    (7, 37, 96, 32, 16),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, vocab, dim, k, block_v", TOPK_CASES)
def test_logsoftmax_topk(t, vocab, dim, k, block_v, dtype):
    gen = torch.Generator().manual_seed(t * 7 + vocab + k)
    hidden = randn(t, dim, dtype=dtype, gen=gen)
    weight = randn(vocab, dim, dtype=dtype, gen=gen, scale=2.0 / math.sqrt(dim))
    values, indices = logsoftmax_topk(hidden, weight, k, block_v=block_v)
    check_topk(hidden, weight, k, values, indices)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_v", (16, 128))
def test_logsoftmax_topk_ties_by_ascending_index(dtype, block_v):
    """Integer logits in a narrow range (every product and sum exact): many equal values,
    across tile borders; the indices are exactly the stable descending order."""
    gen = torch.Generator().manual_seed(block_v)
    t, vocab, dim, k = 7, 1000, 64, 10
    hidden = torch.randint(-1, 2, (t, dim), generator=gen).to(dtype).to(DEVICE)
    weight = torch.randint(-1, 2, (vocab, dim), generator=gen).to(dtype).to(DEVICE)
    weight[vocab // 2:] = weight[:vocab - vocab // 2].clone()  # every row at least twice
    values, indices = logsoftmax_topk(hidden, weight, k, block_v=block_v)
    _, exact_values, exact_indices = topk_exact(hidden, weight, k)
    assert torch.equal(indices, exact_indices)
    torch.testing.assert_close(values.double(), exact_values, rtol=0, atol=1e-5)


def test_logsoftmax_topk_strided_rows():
    """hidden and weight as column slices of wider buffers (row stride > H)."""
    gen = torch.Generator().manual_seed(11)
    hidden = randn(7, 80, dtype=torch.float32, gen=gen)[:, 5:69]
    weight = randn(500, 70, dtype=torch.float32, gen=gen, scale=0.25)[:, 3:67]
    values, indices = logsoftmax_topk(hidden, weight, 5)
    check_topk(hidden, weight, 5, values, indices)
    empty_values, empty_indices = logsoftmax_topk(hidden[:0], weight, 5)
    assert empty_values.shape == empty_indices.shape == (0, 5)


def _topk_call(**changes):
    args = dict(hidden=torch.zeros(3, 16, device=DEVICE), weight=torch.zeros(40, 16, device=DEVICE),
                k=4)
    args.update(changes)
    return logsoftmax_topk(**args)


@pytest.mark.parametrize("changes, error, match", [
    (dict(hidden=torch.zeros(16)), ValueError, r"hidden has shape \(16,\); expected \[T, H\]"),
    (dict(hidden=torch.zeros(3, 16, dtype=torch.int32)), TypeError, "hidden has dtype torch.int32"),
    (dict(weight=torch.zeros(40, 16, dtype=torch.float16)), TypeError, "weight has dtype"),
    (dict(weight=torch.zeros(40, 17)), ValueError,
     r"weight has shape \(40, 17\); expected \[V, 16\]"),
    (dict(weight=torch.zeros(0, 16)), ValueError, "with V >= 1"),
    (dict(weight=torch.zeros(40, 32)[:, ::2]), ValueError, "weight must be contiguous in its last"),
    (dict(k=0), ValueError, r"k is 0; expected 1 <= k <= min\(32, V = 40\)"),
    (dict(k=33), ValueError, "k is 33; expected"),
    (dict(weight=torch.zeros(3, 16)), ValueError, r"k is 4; expected 1 <= k <= min\(32, V = 3\)"),
    (dict(k=4.0), TypeError, "k must be an int, got float"),
    (dict(k=True), TypeError, "k must be an int, got bool"),
    (dict(block_v=48), ValueError, "block_v must be a power of two >= 16, got 48"),
])
def test_logsoftmax_topk_argument_errors(changes, error, match):
    changes = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in changes.items()}
    with pytest.raises(error, match=match):
        _topk_call(**changes)


def test_kernels_compile_for_sm90(tmp_path):
    rope = dict(module="msd_engine.triton_kernels.rope_kv_write", kernel="_rope_kv_write_kernel",
                types={}, options=dict(num_warps=4, enable_fp_fusion=False))
    topk = dict(module="msd_engine.triton_kernels.lm_head_topk", kernel="_lm_head_topk_kernel",
                types={"part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "cand_val_ptr": "*fp32",
                       "cand_idx_ptr": "*i32"}, options=dict(num_warps=4, num_stages=3))
    specs = []
    for dtype, ones in (("bf16", False), ("fp16", False), ("fp16", True)):
        specs.append(dict(rope, dtype=dtype, ones=ones,
                          constexprs=dict(BLOCK_H=1 if ones else 4, BLOCK_HALF=64)))
        specs.append(dict(topk, dtype=dtype, ones=ones, constexprs=dict(
            K=1 if ones else 32, BLOCK_T=16 if ones else 64, BLOCK_V=128, BLOCK_K=64)))
    compile_for_sm90(specs, tmp_path)
