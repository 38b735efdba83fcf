"""kv_compact and draft_fc against their `*_ref`s (and float64), on CUDA or in the interpreter.

kv_compact is a copy: bit-exact against the ref, over the whole arena (nothing else may move).
draft_fc: its error against float64 is at most twice that of the plain torch `draft_fc_ref` in
the same dtype plus one rounding (tests/kernel_checks.assert_error_bounded); bypassed image rows
are the image rows bit for bit.
"""
from __future__ import annotations

import os

import pytest
import torch

from msd_engine.triton_kernels.draft_fc import draft_fc, draft_fc_ref
from msd_engine.triton_kernels.kv_compact import kv_compact, kv_compact_ref
from tests.kernel_checks import assert_error_bounded
from tests.test_triton_tree_attention import compile_for_sm90

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = (torch.float32, torch.float16) + (() if INTERPRET else (torch.bfloat16,))


def randn(*shape: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0):
    return (scale * torch.randn(*shape, generator=gen)).to(dtype).to(DEVICE)


# ---- kv_compact ------------------------------------------------------------------------------
# (arena [2, L, Hkv, S, D], start, nodes): a single node, node 0 alone, identity, gaps, more nodes
# than one chunk of 64 (chunked path), a head dim of 1 and an odd one.
COMPACT_CASES = [
    ((2, 1, 1, 9, 1), 0, [0]),
    ((2, 3, 5, 37, 40), 4, [7]),
    ((2, 3, 5, 37, 40), 2, [0, 1, 2, 3, 4, 5]),
    ((2, 2, 3, 61, 128), 11, [0, 2, 5, 6, 11, 30, 49]),
    ((2, 2, 1, 150, 64), 3, sorted(torch.randperm(140, generator=torch.Generator().manual_seed(0))
                                   [:70].tolist())),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, start, nodes", COMPACT_CASES)
def test_kv_compact(shape, start, nodes, dtype):
    gen = torch.Generator().manual_seed(len(nodes) * 31 + start)
    arena = randn(*shape, dtype=dtype, gen=gen)
    expected = arena.clone()
    nodes = torch.tensor(nodes, dtype=torch.int64, device=DEVICE)
    kv_compact(arena, start, nodes)
    kv_compact_ref(expected, start, nodes)
    assert torch.equal(arena, expected)


def test_kv_compact_strided_arena():
    """An arena whose head dim is padded (row stride D + 3): only the first D columns move."""
    gen = torch.Generator().manual_seed(7)
    base = randn(2, 3, 2, 40, 67, dtype=torch.float16, gen=gen)
    arena, expected = base[..., :64], base.clone()[..., :64]
    nodes = torch.tensor([1, 4, 5, 9], device=DEVICE)
    kv_compact(arena, 6, nodes)
    kv_compact_ref(expected, 6, nodes)
    assert torch.equal(arena, expected)
    assert torch.equal(base[..., 64:], base.clone()[..., 64:])


@pytest.mark.parametrize("call, error, match", [
    (lambda a: kv_compact(a[0], 0, torch.tensor([0], device=DEVICE)), ValueError,
     "arena has shape"),
    (lambda a: kv_compact(a, 0, torch.tensor([0], dtype=torch.int32, device=DEVICE)), TypeError,
     "nodes must be a 1-D int64"),
    (lambda a: kv_compact(a, 8, torch.tensor([0, 1, 2], device=DEVICE)), ValueError,
     "start 8 \\+ 3 nodes exceeds the arena's 10 slots"),
    (lambda a: kv_compact(a, -1, torch.tensor([0], device=DEVICE)), ValueError, "start must be"),
    (lambda a: kv_compact(a.double(), 0, torch.tensor([0], device=DEVICE)), TypeError,
     "arena has dtype torch.float64"),
])
def test_kv_compact_argument_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.zeros(2, 1, 2, 10, 8, device=DEVICE))


# ---- draft_fc --------------------------------------------------------------------------------
def draft_inputs(t: int, hidden: int, dtype: torch.dtype, images: str, seed: int):
    """Random draft-head inputs; `images` places image rows: "none", "start" or "middle"."""
    gen = torch.Generator().manual_seed(seed)
    vocab = 50
    token_ids = torch.randint(1, vocab, (t,), generator=gen).to(DEVICE)
    embed = randn(vocab, hidden, dtype=dtype, gen=gen)
    features = randn(t, hidden, dtype=dtype, gen=gen, scale=2.0)
    weight = randn(hidden, 2 * hidden, dtype=dtype, gen=gen, scale=hidden ** -0.5)
    bias = randn(hidden, dtype=dtype, gen=gen, scale=0.1)
    if images == "none":
        return token_ids, embed, features, None, None, weight, bias
    is_image = torch.zeros(t, dtype=torch.bool)
    first = 0 if images == "start" else t // 3
    is_image[first:first + max(1, t // 2)] = True  # one row when t = 1
    image_rows = randn(t, hidden, dtype=dtype, gen=gen)
    return token_ids, embed, features, image_rows, is_image.to(DEVICE), weight, bias


def draft_fc_exact(token_ids, embed, features, image_rows, is_image, weight, bias, bypass):
    args = [x.double() if x is not None and x.is_floating_point() else x
            for x in (token_ids, embed, features, image_rows, is_image, weight, bias)]
    return draft_fc_ref(*args, bypass=bypass)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bypass", (False, True))
@pytest.mark.parametrize("images", ("none", "start", "middle"))
@pytest.mark.parametrize("hidden", (64, 96))
@pytest.mark.parametrize("t", (1, 7, 60, 70))
def test_draft_fc(t, hidden, images, bypass, dtype):
    args = draft_inputs(t, hidden, dtype, images, seed=t * 131 + hidden)
    out = torch.full((t, hidden), float("nan"), dtype=dtype, device=DEVICE)
    assert draft_fc(*args, bypass=bypass, out=out) is out
    expected = draft_fc_ref(*args, bypass=bypass)
    assert_error_bounded(out, expected, draft_fc_exact(*args, bypass=bypass))
    is_image, image_rows = args[4], args[3]
    if bypass and is_image is not None:  # MSD: the projector output itself, no fc
        assert torch.equal(out[is_image], image_rows[is_image])


def test_draft_fc_image_flags_without_image_rows():
    """As extend() without image_embeds: an image row gathers embed[0] (and bypasses fc)."""
    token_ids, embed, features, _, is_image, weight, bias = draft_inputs(7, 64, torch.float32,
                                                                         "middle", seed=3)
    for bypass in (False, True):
        out = draft_fc(token_ids, embed, features, None, is_image, weight, bias, bypass)
        expected = draft_fc_ref(token_ids, embed, features, None, is_image, weight, bias, bypass)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[is_image], embed[0].expand(int(is_image.sum()), -1))


def test_draft_fc_strided_rows():
    """features as a slice of a wider buffer; the output into a padded buffer."""
    gen = torch.Generator().manual_seed(9)
    token_ids, embed, _, _, _, weight, bias = draft_inputs(7, 64, torch.float32, "none", seed=4)
    features = randn(7, 70, dtype=torch.float32, gen=gen)[:, 3:67]
    out = torch.full((7, 69), float("nan"), device=DEVICE)
    draft_fc(token_ids, embed, features, None, None, weight, bias, False, out=out[:, :64])
    expected = draft_fc_ref(token_ids, embed, features, None, None, weight, bias, False)
    torch.testing.assert_close(out[:, :64], expected, rtol=1e-5, atol=1e-5)
    assert torch.isnan(out[:, 64:]).all()


def _fc_call(**changes):
    args = dict(zip(("token_ids", "embed", "features", "image_rows", "is_image", "fc_weight",
                     "fc_bias"), draft_inputs(5, 64, torch.float32, "start", seed=1)))
    args.update(changes)
    return draft_fc(**args, bypass=True)


@pytest.mark.parametrize("changes, error, match", [
    (dict(token_ids=torch.zeros(5, dtype=torch.int32)), TypeError, "token_ids must be a 1-D int64"),
    (dict(features=torch.zeros(4, 64)), ValueError, r"features has shape \(4, 64\)"),
    (dict(fc_weight=torch.zeros(64, 128, dtype=torch.float16)), TypeError, "fc_weight has dtype"),
    (dict(fc_weight=torch.zeros(64, 64)), ValueError, "fc_weight has shape"),
    (dict(fc_bias=torch.zeros(65)), ValueError, "fc_bias has shape"),
    (dict(is_image=None), ValueError, "image_rows given without is_image"),
    (dict(is_image=torch.zeros(5, dtype=torch.int64)), TypeError, "is_image must be a bool"),
    (dict(embed=torch.zeros(50, 64, dtype=torch.float64)), TypeError, "embed has dtype"),
])
def test_draft_fc_argument_errors(changes, error, match):
    changes = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in changes.items()}
    with pytest.raises(error, match=match):
        _fc_call(**changes)


def test_kernels_compile_for_sm90(tmp_path):
    fc = dict(module="msd_engine.triton_kernels.draft_fc", kernel="_draft_fc_kernel",
              types={"token_ptr": "*i64", "is_image_ptr": "*u8"},
              options=dict(num_warps=4, num_stages=3))
    compact = dict(module="msd_engine.triton_kernels.kv_compact", kernel="_kv_compact_kernel",
                   types={"nodes_ptr": "*i64"}, options=dict(num_warps=4, num_stages=1))
    specs = []
    for dtype, ones in (("bf16", False), ("fp16", False), ("fp16", True)):
        specs.append(dict(fc, dtype=dtype, ones=ones, constexprs=dict(
            HAS_FLAGS=True, HAS_IMAGE_ROWS=not ones, BYPASS=dtype == "bf16",
            BLOCK_T=16 if ones else 64, BLOCK_N=32, BLOCK_K=128)))
        specs.append(dict(compact, dtype=dtype, ones=ones,
                          constexprs=dict(BLOCK_M=1 if ones else 64, BLOCK_D=128)))
    compile_for_sm90(specs, tmp_path)
