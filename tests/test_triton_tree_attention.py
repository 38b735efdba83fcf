"""tree_attention against a float64 reference written here, on CUDA or in the interpreter.

Error bound (STYLE 8): the kernel's max error against float64 is at most twice that of the plain
torch computation in the same dtype (scores, softmax and P @ V all in dtype), plus slack:
  float16: one rounding of the largest output (eps * max|exact|): the kernel keeps scores in
    float32 but rounds P to float16 for the P @ V product, as the plain computation does.
  float32: 32 eps * max|exact|: compiled, the kernel computes exp2(s * scale * log2 e) with
    ex2.approx (2^-22 relative) on an argument rounded at |s| ~ 16 (2^-20 relative), so its
    weights carry ~8 ulps where torch's exp carries ~1; 32 leaves a factor 4 for the sums.
Cache slots past prefix + region hold NaN (the kernel must not read them) and outputs are
poisoned with NaN before the call.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from msd_engine.ops.torch_ops import TorchOps
from msd_engine.triton_kernels.tree_attention import (MAX_SPLITS, choose_num_splits, pack_mask,
                                                      tree_attention, tree_attention_ref,
                                                      unpack_mask)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = (torch.float32, torch.float16) + (() if INTERPRET else (torch.bfloat16,))
SLACK_EPS = {torch.float32: 32.0, torch.float16: 1.0, torch.bfloat16: 1.0}
NAN = float("nan")


def random_tree_mask(t: int, region: int, gen: torch.Generator) -> torch.Tensor:
    """bool [t, region]: a random forest over the region's slots, each node seeing its ancestors
    and itself; the queries are the last t nodes and the first of them is a root (sees only
    itself), so with no prefix its only visible key is its own entry."""
    visible = torch.eye(region, dtype=torch.bool)
    for j in range(1, region):
        if j != region - t and torch.rand(1, generator=gen).item() < 0.8:
            visible[j] |= visible[torch.randint(0, j, (1,), generator=gen).item()]
    return visible[region - t:].to(DEVICE)


def make_inputs(t, prefix_len, region, group, num_kv_heads, head_dim, dtype, seed, spare=3):
    gen = torch.Generator().manual_seed(seed)
    slots = prefix_len + region + spare
    q = torch.randn(t, group * num_kv_heads, head_dim, generator=gen)
    k_cache = torch.randn(num_kv_heads, slots, head_dim, generator=gen)
    v_cache = torch.randn(num_kv_heads, slots, head_dim, generator=gen)
    k_cache[:, prefix_len + region:] = NAN
    v_cache[:, prefix_len + region:] = NAN
    return [x.to(dtype).to(DEVICE) for x in (q, k_cache, v_cache)] + [gen]


def visible_keys(t, prefix_len, region, mask):
    full = torch.ones(t, prefix_len + region, dtype=torch.bool, device=DEVICE)
    if mask is not None:
        full[:, prefix_len:] = mask
    return full


def attention_exact(q, k_cache, v_cache, prefix_len, mask, region):
    """float64, written out: softmax(q k^T / sqrt(D) masked) v per query head."""
    t, num_heads, head_dim = q.shape
    group, n = num_heads // k_cache.shape[0], prefix_len + region
    keys = k_cache[:, :n].double().repeat_interleave(group, 0)  # [Hq, L, D]
    values = v_cache[:, :n].double().repeat_interleave(group, 0)
    scores = torch.einsum("thd,hld->htl", q.double(), keys) / math.sqrt(head_dim)
    scores = scores.masked_fill(~visible_keys(t, prefix_len, region, mask), float("-inf"))
    return torch.einsum("htl,hld->thd", scores.softmax(-1), values)


def attention_plain(q, k_cache, v_cache, prefix_len, mask, region):
    """The same computation in q.dtype throughout (each torch op rounds to dtype)."""
    t, num_heads, head_dim = q.shape
    group, n = num_heads // k_cache.shape[0], prefix_len + region
    keys = k_cache[:, :n].repeat_interleave(group, 0)
    values = v_cache[:, :n].repeat_interleave(group, 0)
    scores = torch.matmul(q.transpose(0, 1), keys.transpose(1, 2)) * (1.0 / math.sqrt(head_dim))
    scores = scores.masked_fill(~visible_keys(t, prefix_len, region, mask), float("-inf"))
    return torch.matmul(scores.softmax(-1), values).transpose(0, 1)


def assert_close_to_exact(out, plain, exact):
    assert not torch.isnan(out).any(), "kernel output has NaN"
    kernel_error = (out.double() - exact).abs().max().item()
    torch_error = (plain.double() - exact).abs().max().item()
    slack = SLACK_EPS[out.dtype] * torch.finfo(out.dtype).eps * exact.abs().max().item()
    assert kernel_error <= 2 * torch_error + slack, (kernel_error, torch_error, slack)


def run_case(t, prefix_len, extra, group, head_dim, dtype, masked=True, num_splits=None, seed=0):
    region = t + extra
    num_kv_heads = 1 if prefix_len > 1024 else 2  # the interpreter's time goes with Hkv x keys
    q, k_cache, v_cache, gen = make_inputs(t, prefix_len, region, group, num_kv_heads, head_dim,
                                           dtype, seed)
    mask = random_tree_mask(t, region, gen) if masked else None
    bits = pack_mask(mask) if masked else None
    out = torch.full_like(q, NAN)
    result = tree_attention(q, k_cache, v_cache, prefix_len, bits, region, num_splits=num_splits,
                            out=out)
    assert result is out
    exact = attention_exact(q, k_cache, v_cache, prefix_len, mask, region)
    plain = attention_plain(q, k_cache, v_cache, prefix_len, mask, region)
    assert_close_to_exact(out, plain, exact)
    return out, exact


# (T, prefix_len) over {1, 7, 60, 128} x {0, 1, 577, 2049}, less the interpreter's most expensive
# T=128 x P=2049; group (GQA ratio 1, 4, 3), head dim and extra region slots (draft-tree scratch)
# rotate so that each value meets several of the others.
CASES = [(t, p) for t in (1, 7, 60, 128) for p in (0, 1, 577, 2049)
         if not (INTERPRET and (t, p) == (128, 2049))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, prefix_len", CASES)
def test_matches_float64(t, prefix_len, dtype):
    i = CASES.index((t, prefix_len))
    group, head_dim, extra = (1, 4, 3)[i % 3], (64, 128)[i % 2], (0, 5, 37)[i % 3]
    if t == 1 and extra == 0:  # decode: no mask, the one new entry visible
        run_case(t, prefix_len, 0, group, head_dim, dtype, masked=False, seed=i)
    else:
        run_case(t, prefix_len, extra, group, head_dim, dtype, seed=i)


@pytest.mark.parametrize("head_dim", (40, 80, 96))
def test_padded_head_dims(head_dim):
    run_case(7, 61, 3, 2, head_dim, torch.float16, seed=head_dim)


def test_largest_query_tile():
    """T = 128 queries x 8 heads per KV group: 1024 rows, 16 row blocks per split."""
    run_case(128, 1, 0, 8, 64, torch.float16, seed=8)


def test_unmasked_region_larger_than_t():
    run_case(7, 33, 9, 3, 64, torch.float32, masked=False)


@pytest.mark.parametrize("t, prefix_len, group", [(7, 577, 4), (1, 2049, 1)])
def test_num_splits_agree(t, prefix_len, group):
    outs = [run_case(t, prefix_len, 5, group, 64, torch.float32, num_splits=n)[0]
            for n in (1, 2, 3, 5, 9, MAX_SPLITS)]
    for out in outs[1:]:  # only the summation order differs
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6)


def test_each_row_sees_only_itself():
    t, head_dim = 9, 64
    q, k_cache, v_cache, _ = make_inputs(t, 0, t, 3, 2, head_dim, torch.float32, seed=5)
    mask = torch.eye(t, dtype=torch.bool, device=DEVICE)
    out = tree_attention(q, k_cache, v_cache, 0, pack_mask(mask), t, out=torch.full_like(q, NAN))
    expected = v_cache[:, :t].repeat_interleave(3, 0).transpose(0, 1)  # [T, Hq, D]
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_matches_torch_ops_on_engine_layouts():
    """q split out of a fused qkv buffer, caches as per-layer views of an arena, as the engine."""
    t, prefix_len, region, hq, hkv, d = 7, 50, 12, 8, 2, 64
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(t, hq + 2 * hkv, d, generator=gen).to(DEVICE)
    q = qkv[:, :hq]  # non-contiguous: row stride (hq + 2 hkv) * d
    arena = torch.randn(2, 3, hkv, 80, d, generator=gen).to(DEVICE)
    k_cache, v_cache = arena[0, 1], arena[1, 1]
    mask = random_tree_mask(t, region, gen)
    out = tree_attention(q, k_cache, v_cache, prefix_len, pack_mask(mask), region)
    expected = TorchOps().cached_attention(q, k_cache, v_cache, prefix_len, mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tree_attention_ref(q, k_cache, v_cache, prefix_len, pack_mask(mask),
                                                  region), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("region", (1, 31, 32, 33, 64, 70))
def test_pack_mask(region):
    gen = torch.Generator().manual_seed(region)
    mask = torch.rand(5, region, generator=gen) < 0.5
    mask[0, -1] = mask[1, :] = True  # the last bit of the last word, and words of all ones
    bits = pack_mask(mask)
    assert bits.dtype == torch.int32 and bits.shape == (5, (region + 31) // 32)
    assert torch.equal(unpack_mask(bits, region), mask)
    for i, j in ((0, region - 1), (2, 0), (3, region // 2)):
        word = bits[i, j // 32].item() & 0xFFFFFFFF
        assert bool((word >> (j % 32)) & 1) == bool(mask[i, j])


def test_choose_num_splits():
    assert choose_num_splits(61, 32) == 1  # short: one split, no reduce
    assert choose_num_splits(4156, 32) == 9  # LLaVA-7B verify at P = 4096: ~2 waves of 132 SMs
    assert choose_num_splits(4097, 1) == 17  # few programs: bounded by 256 keys per split
    assert choose_num_splits(10 ** 6, 1) == MAX_SPLITS


def _call(q_shape=(3, 4, 64), cache_shape=(2, 40, 64), prefix_len=10, region=3, bits=True,
          dtype=torch.float32, cache_dtype=None, **kwargs):
    q = torch.randn(q_shape, device=DEVICE).to(dtype)
    k = torch.randn(cache_shape, device=DEVICE).to(cache_dtype or dtype)
    mask_bits = torch.zeros(q_shape[0], (region + 31) // 32, dtype=torch.int32, device=DEVICE)
    mask_bits = mask_bits if bits is True else bits
    return tree_attention(q, k, k.clone(), prefix_len, mask_bits, region, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dtype=torch.float64), TypeError, "q has dtype torch.float64"),
    (dict(cache_dtype=torch.float16), TypeError, "k_cache has dtype"),
    (dict(q_shape=(3, 64)), ValueError, r"q has shape \(3, 64\)"),
    (dict(cache_shape=(2, 40, 32)), ValueError, "k_cache has shape"),
    (dict(q_shape=(3, 5, 64)), ValueError, "5 heads, not a multiple"),
    (dict(prefix_len=38), ValueError, "exceeds the cache's 40 slots"),
    (dict(region=2), ValueError, "region must be >= 3"),
    (dict(prefix_len=-1), ValueError, "prefix_len must be >= 0"),
    (dict(bits=torch.zeros(3, 1, dtype=torch.int64)), TypeError, "mask_bits must be an int32"),
    (dict(bits=torch.zeros(3, 2, dtype=torch.int32)), ValueError, r"expected \[3, 1\]"),
    (dict(num_splits=0), ValueError, "num_splits must be >= 1"),
    (dict(num_splits=MAX_SPLITS + 1), ValueError, "exceeds MAX_SPLITS"),
    (dict(out=torch.empty(3, 4, 32, device=DEVICE)), ValueError, "out has shape"),
])
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(**kwargs)


def test_non_contiguous_head_dim_is_refused():
    q = torch.randn(3, 64, 4, device=DEVICE).transpose(1, 2)
    k = torch.randn(2, 40, 64, device=DEVICE)
    with pytest.raises(ValueError, match="q must be contiguous in its last dim"):
        tree_attention(q, k, k, 10, None, 3)


@pytest.mark.skipif(not INTERPRET, reason="interpreter-only limitation")
def test_interpreter_refuses_bfloat16():
    with pytest.raises(TypeError, match="bfloat16"):
        _call(dtype=torch.bfloat16)


# Compiled ahead of time for sm_90 in a fresh process (this one defined the kernels in the
# interpreter), as tests/test_triton_kernels.py does: catches what the interpreter cannot, e.g.
# int arguments equal to 1 (T = 1, MHA, one mask word) becoming constexprs.
COMPILE_SCRIPT = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for spec in json.loads(sys.argv[1]):
    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    constexprs, signature = dict(spec["constexprs"]), {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in spec["types"]:
            signature[name] = spec["types"][name]
        elif name.endswith("_ptr"):
            signature[name] = "*" + spec["dtype"]
        elif spec["ones"]:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
    triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                   options=spec["options"])
print("compiled")
"""


def compile_for_sm90(specs: list[dict], tmp_path) -> None:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(specs)], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


def test_kernels_compile_for_sm90(tmp_path):
    module = "msd_engine.triton_kernels.tree_attention"
    split_types = {"mask_ptr": "*i32", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
                   "qk_scale": "fp32"}
    specs = []
    # (dtype, HAS_MASK, DIRECT, every int argument 1): both 16-bit types, both paths.
    variants = (("bf16", True, False, False), ("fp16", False, True, False),
                ("fp16", True, True, True))
    for dtype, has_mask, direct, ones in variants:
        specs.append(dict(module=module, kernel="_tree_attention_split_kernel", dtype=dtype,
                          types=split_types, ones=ones, options=dict(num_warps=4, num_stages=2),
                          constexprs=dict(HAS_MASK=has_mask, DIRECT=direct,
                                          BLOCK_M=16 if ones else 64, BLOCK_N=64, BLOCK_D=128)))
    for dtype in ("fp16", "bf16"):
        specs.append(dict(module=module, kernel="_tree_attention_reduce_kernel", dtype=dtype,
                          types={"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}, ones=False,
                          options=dict(num_warps=1), constexprs=dict(BLOCK_S=16, BLOCK_D=128)))
    compile_for_sm90(specs, tmp_path)
