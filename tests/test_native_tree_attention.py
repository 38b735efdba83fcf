"""`native.tree_attention` and `native.kv_compact` (msd_tree_attention_*, msd_kv_compact_*)
against a float64 reference written out here and the torch ops they replace; the CUDA kernels
too where they are compiled and a GPU is present; and the engine's `cpu` backend, which runs
them, against the `torch` backend token for token.

Tolerances, at the scale of the output's terms, scale = max(sum_s p_s |v_s|) (a weighted sum's
rounding error scales with its terms' magnitudes, not with its often much smaller value):
  * float16 / bfloat16: the kernel's error against float64 is at most twice that of the same
    attention done plainly by torch in that dtype (scores, softmax and P.V each rounded to it),
    plus one rounding, eps(dtype) * scale;
  * float32: within 8 eps * scale. The kernel sums in float32 as torch does, in another order
    (per 64-key block, then across blocks), so "2x torch's error" is a coin toss where both are
    a few eps; measured worst over the shapes below: ~2 eps (SIMD paths), ~4 eps (scalar),
    torch ~2.7 eps.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from msd_engine import Engine, native
from msd_engine.kv_cache import StepState
from msd_engine.ops.torch_ops import TorchOps
from msd_engine.spec.tree import TreeParams
from tests.factories import IMAGE_TOKEN_ID
from tests.spec_doubles import write_random_draft

pytestmark = pytest.mark.skipif(not native.is_built(), reason="needs msd_engine._C")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (Hq, Hkv, D): GQA ratios 1, 3 (SmolLM2's heads), 4, and an odd head dim (CPU only).
SHAPES = ((4, 4, 64), (9, 3, 64), (8, 2, 128), (6, 2, 40))
CUDA = native.is_built() and native.cuda_available()


def tree_mask(t: int, region: int, generator: torch.Generator) -> torch.Tensor:
    """bool [t, region]: the first region - t slots are earlier scratch entries, each visible
    to a random half of the rows; the last t are a random tree, row i seeing its ancestors and
    its own slot region - t + i."""
    extra = region - t
    mask = torch.zeros(t, region, dtype=torch.bool)
    mask[:, :extra] = torch.rand(t, extra, generator=generator) < 0.5
    for i in range(t):
        mask[i, extra + i] = True
        if i > 0:
            parent = int(torch.randint(0, i, (1,), generator=generator))
            mask[i, extra:extra + i] |= mask[parent, extra:extra + i]
    return mask


def operands(t, prefix, region, shape, dtype, seed, device="cpu"):
    """q [t, Hq, D] as a slice of a fused qkv buffer; caches [Hkv, S, D] holding NaN in every
    slot from prefix + region on; a random tree mask."""
    num_heads, num_kv_heads, head_dim = shape
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (num_heads + 2 * num_kv_heads) * head_dim, generator=g)
    q = qkv.to(dtype).view(t, -1, head_dim)[:, :num_heads]
    slots = prefix + region + 5
    k = torch.randn(num_kv_heads, slots, head_dim, generator=g).to(dtype)
    v = torch.randn(num_kv_heads, slots, head_dim, generator=g).to(dtype)
    k[:, prefix + region:] = float("nan")
    v[:, prefix + region:] = float("nan")
    mask = tree_mask(t, region, g)
    return q.to(device), k.to(device), v.to(device), mask.to(device)


def plain_attention(q, k, v, prefix, mask, dtype=None):
    """Attention written out in `dtype` (q's if None): the reference and the torch baseline."""
    dtype = dtype or q.dtype
    t, num_heads, head_dim = q.shape
    group = num_heads // k.shape[0]
    num_keys = prefix + mask.shape[1]
    visible = torch.ones(t, num_keys, dtype=torch.bool, device=q.device)
    visible[:, prefix:] = mask
    keys = k[:, :num_keys].to(dtype).repeat_interleave(group, 0)  # [Hq, L, D]
    values = v[:, :num_keys].to(dtype).repeat_interleave(group, 0)
    scores = q.transpose(0, 1).to(dtype) @ keys.transpose(1, 2) * head_dim ** -0.5  # [Hq, T, L]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs @ values).transpose(0, 1)  # [T, Hq, D]


def check_attention(q, k, v, prefix, mask, use_mask: bool = True) -> None:
    region = mask.shape[1]
    if not use_mask:
        mask = torch.ones_like(mask)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    bits = native.pack_mask(mask) if use_mask else None
    assert native.tree_attention(q, k, v, prefix, bits, region, out=out) is out
    assert not torch.isnan(out).any(), "output has NaN (not written, or a NaN slot was read)"
    exact = plain_attention(q, k, v, prefix, mask, torch.float64)
    scale = plain_attention(q, k, v.abs(), prefix, mask, torch.float64).max().item()
    error = (out.double() - exact).abs().max().item()
    eps = torch.finfo(q.dtype).eps
    if q.dtype == torch.float32:
        assert error <= 8 * eps * scale, (error, eps * scale)
    else:
        torch_error = (plain_attention(q, k, v, prefix, mask).double() - exact).abs().max().item()
        assert error <= 2 * torch_error + eps * scale, (error, torch_error, eps * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("prefix", (0, 1, 577, 2049))
@pytest.mark.parametrize("t", (1, 7, 60, 128))
def test_cpu_matches_float64(t, prefix, shape, dtype):
    """Strided q, NaN past the attended slots and in the output beforehand; region = T or
    with earlier scratch slots before the queries' own."""
    region = t + (t + prefix) % 3 * 5  # T, T + 5 or T + 10
    q, k, v, mask = operands(t, prefix, region, shape, dtype, seed=t * 7919 + prefix + shape[2])
    check_attention(q, k, v, prefix, mask)


@pytest.mark.parametrize("isa", native.CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_simd_path(isa, dtype):
    try:
        native.set_cpu_isa(isa)
    except ValueError:
        pytest.skip(f"this CPU or build cannot run the {isa} path")
    try:
        for t, prefix, shape in [(1, 577, (9, 3, 64)), (7, 65, (6, 2, 40)), (60, 1, (8, 2, 128)),
                                 (3, 0, (2, 1, 17))]:
            q, k, v, mask = operands(t, prefix, t + 3, shape, dtype, seed=t + prefix)
            check_attention(q, k, v, prefix, mask)
            check_attention(q, k, v, prefix, mask, use_mask=False)
    finally:
        native.set_cpu_isa(None)


@pytest.mark.parametrize("isa", native.CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tree_rows_equal_decoding_each_token_alone_bit_for_bit(isa, dtype):
    """A decode-sized masked step (region <= 64: a verified tree, a draft level): each row's output
    is exactly that of a mask-free single-query call over the slots the row sees, laid out one
    after another, as plain decoding sees the same token after its ancestors. This is what makes
    greedy verification return plain decoding's tokens in every precision. Prefix lengths on both
    sides of the 64-slot blocks; regions with scratch slots before the tree."""
    try:
        native.set_cpu_isa(isa)
    except ValueError:
        pytest.skip(f"this CPU or build cannot run the {isa} path")
    try:
        for prefix in (0, 5, 63, 64, 100, 127, 577):
            for t, region, shape in [(5, 5, (9, 3, 64)), (16, 16, (6, 2, 40)), (12, 30, (9, 3, 64)),
                                     (60, 64, (8, 2, 128))]:
                q, k, v, mask = operands(t, prefix, region, shape, dtype, seed=prefix * 31 + t)
                out = native.tree_attention(q, k, v, prefix, native.pack_mask(mask), region)
                for i in range(t):
                    seen = torch.cat([torch.arange(prefix), prefix + mask[i].nonzero()[:, 0]])
                    alone = native.tree_attention(q[i:i + 1], k[:, seen].contiguous(), v[:, seen].contiguous(),
                                                  len(seen) - 1, None, 1)
                    assert torch.equal(out[i], alone[0]), (prefix, t, region, i)
    finally:
        native.set_cpu_isa(None)


def test_without_mask_and_rows_that_see_nothing():
    q, k, v, mask = operands(7, 100, 7, (9, 3, 64), torch.float32, seed=1)
    check_attention(q, k, v, 100, mask, use_mask=False)  # mask None: every region slot visible
    q, k, v, mask = operands(5, 0, 9, (4, 2, 64), torch.float32, seed=2)
    mask[2] = False  # no prefix and nothing visible: zeros (torch's SDPA would give NaN)
    out = native.tree_attention(q, k, v, 0, native.pack_mask(mask), 9)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    rows = [0, 1, 3, 4]
    exact = plain_attention(q[rows], k, v, 0, mask[rows], torch.float64)
    assert (out[rows].double() - exact).abs().max() < 1e-5


def test_strided_out_and_the_torch_op_it_replaces():
    q, k, v, mask = operands(7, 300, 12, (9, 3, 64), torch.float32, seed=3)
    out = torch.full((9, 7, 64), float("nan")).transpose(0, 1)  # [T, Hq, D], heads outermost
    native.tree_attention(q, k, v, 300, native.pack_mask(mask), 12, out=out)
    expected = TorchOps().cached_attention(q, k, v, 300, mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_pack_mask_matches_step_state():
    mask = tree_mask(9, 45, torch.Generator().manual_seed(4))
    step = StepState(positions=torch.arange(9), start=50, prefix_len=14, mask=mask,
                     cos=torch.ones(9, 4), sin=torch.zeros(9, 4))
    assert torch.equal(native.pack_mask(mask), step.mask_bits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nodes", [[0, 1, 2, 3], [0, 2, 3, 7, 11], [0], [0, 5], []], ids=str)
def test_kv_compact_matches_torch(nodes, dtype):
    torch.manual_seed(5)
    arena = torch.randn(2, 3, 2, 40, 24).to(dtype)  # [2, L, Hkv, S, D]
    expected = arena.clone()
    index = torch.tensor(nodes, dtype=torch.int64)
    TorchOps().kv_compact(expected, 17, index)
    native.kv_compact(arena, 17, index)
    assert torch.equal(arena, expected)


@pytest.mark.skipif(not CUDA, reason="needs the CUDA kernels and a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t, prefix", [(1, 0), (1, 4000), (7, 577), (60, 1200), (128, 2049)])
@pytest.mark.parametrize("shape", [(4, 4, 64), (9, 3, 64), (32, 8, 128), (32, 32, 128)], ids=str)
def test_cuda_matches_float64(shape, t, prefix, dtype):
    """One split (short keys) and several (long), each K/V tile shared by G * T rows."""
    region = t + prefix % 3 * 5
    q, k, v, mask = operands(t, prefix, region, shape, dtype, seed=t + prefix, device="cuda")
    check_attention(q, k, v, prefix, mask)
    check_attention(q, k, v, prefix, mask, use_mask=False)


@pytest.mark.skipif(not CUDA, reason="needs the CUDA kernels and a GPU")
def test_cuda_kv_compact_and_graph_capture():
    arena = torch.randn(2, 3, 4, 300, 128, device="cuda").half()
    for nodes in ([0, 1, 2], [0, 3, 4, 40, 41, 200], list(range(0, 280, 2))):
        expected = arena.clone()
        index = torch.tensor(nodes, device="cuda")
        TorchOps().kv_compact(expected, 10, index)
        native.kv_compact(arena, 10, index)
        assert torch.equal(arena, expected)
    q, k, v, mask = operands(9, 3000, 9, (32, 8, 128), torch.float16, seed=6, device="cuda")
    bits, out = native.pack_mask(mask), torch.empty_like(q)
    native.tree_attention(q, k, v, 3000, bits, 9, out=out)  # warm-up before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        native.tree_attention(q, k, v, 3000, bits, 9, out=out)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    expected = plain_attention(q, k, v, 3000, mask, torch.float64)
    assert (out.double() - expected).abs().max() < 1e-2


def _cpu_args(**overrides):
    """Valid msd_tree_attention_cpu arguments (T=2, Hq=4, Hkv=2, D=8, P=3, R=4), with overrides."""
    from msd_engine import _C
    q, cache, out = torch.randn(2, 4, 8), torch.randn(2, 16, 8), torch.empty(2, 4, 8)
    args = dict(q=q.data_ptr(), k=cache.data_ptr(), v=cache.data_ptr(), mask=0,
                out=out.data_ptr(), t=2, hq=4, hkv=2, d=8, prefix=3, region=4, q_row=32,
                q_head=8, kv_head=128, kv_slot=8, out_row=32, out_head=8, scale=0.35,
                dtype=_C.FLOAT32)
    args.update(overrides)
    return (q, cache, out), tuple(args.values())


@pytest.mark.parametrize("overrides, match", [
    (dict(q=0), "q is a null pointer"),
    (dict(out=0), "out is a null pointer"),
    (dict(t=0), "num_queries must be positive, got 0"),
    (dict(region=1), r"region \(1\) is smaller than num_queries \(2\)"),
    (dict(hkv=3), r"num_heads \(4\) is not a multiple of num_kv_heads \(3\)"),
    (dict(prefix=-1), "prefix_len must be >= 0"),
    (dict(kv_slot=7), r"kv_slot_stride \(7\) is smaller than the row length \(8\)"),
    (dict(q_head=4), r"q_head_stride \(4\)"),
    (dict(out_row=8), r"out_row_stride \(8\) and out_head_stride \(8\) make"),
    (dict(scale=float("inf")), "sm_scale must be finite"),
    (dict(dtype=9), "unsupported dtype: dtype 9"),
])
def test_c_api_argument_errors_name_the_argument(overrides, match):
    from msd_engine import _C
    keep, args = _cpu_args(**overrides)
    with pytest.raises(ValueError, match=match):
        _C.tree_attention_cpu(*args)


def test_c_api_kv_compact_and_cuda_errors():
    from msd_engine import _C
    arena = torch.zeros(2, 1, 1, 8, 4)
    p, f32 = arena.data_ptr(), _C.FLOAT32
    nodes = torch.tensor([0, 2, 1])
    with pytest.raises(ValueError, match=r"nodes\[2\] = 1: expected nodes\[j\] >= j"):
        _C.kv_compact_cpu(p, 2, 1, 1, 8, 4, 0, nodes.data_ptr(), 3, f32)
    with pytest.raises(ValueError, match=r"nodes\[1\] = 2: .* start \(6\)"):
        _C.kv_compact_cpu(p, 2, 1, 1, 8, 4, 6, nodes.data_ptr(), 2, f32)
    with pytest.raises(ValueError, match=r"start \(6\) \+ num_nodes \(3\) exceeds max_slots"):
        _C.kv_compact_cpu(p, 2, 1, 1, 8, 4, 6, nodes.data_ptr(), 3, f32)
    _C.kv_compact_cpu(p, 2, 1, 1, 8, 4, 0, 0, 0, f32)  # no nodes: a no-op, NULL allowed
    assert _C.tree_attention_cuda_workspace_bytes(9, 32, 128, 200, 9) == 0  # one split
    assert _C.tree_attention_cuda_workspace_bytes(9, 32, 128, 2000, 9) == 8 * 9 * 32 * 129 * 4
    # Sizes only: these calls fail before any pointer is used.
    def cuda_args(d):
        return _cpu_args(d=d, kv_head=16 * d, kv_slot=d, q_row=4 * d, q_head=d, out_row=4 * d,
                         out_head=d)[1] + (0, 0, 0)  # + workspace, workspace_bytes, stream

    if _C.cuda_compiled():
        with pytest.raises(ValueError, match="head_dim 40 is not supported by msd_tree_attention"):
            _C.tree_attention_cuda(*cuda_args(40))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA error|not compiled"):
            _C.tree_attention_cuda(*cuda_args(64))


@pytest.mark.parametrize("call, error, match", [
    (lambda q, k, m: native.tree_attention(q.double(), k, k, 3, m, 4), TypeError,
     "q has dtype torch.float64"),
    (lambda q, k, m: native.tree_attention(q, k.half(), k, 3, m, 4), TypeError,
     "k_cache has dtype torch.float16"),
    (lambda q, k, m: native.tree_attention(q, k, k, 3, m.long(), 4), TypeError,
     "mask_bits has dtype torch.int64.*pack_mask"),
    (lambda q, k, m: native.tree_attention(q, k, k, 3, m[:1], 4), ValueError,
     r"mask_bits has shape \(1, 1\)"),
    (lambda q, k, m: native.tree_attention(q, k[:, :, :4], k[:, :, :4], 3, m, 4), ValueError,
     "k_cache has shape"),
    (lambda q, k, m: native.tree_attention(q, k, k.clone()[:, ::2], 3, m, 4), ValueError,
     "v_cache .* must match k_cache"),
    (lambda q, k, m: native.tree_attention(q, k, k, 14, m, 4), ValueError,
     "prefix_len 14 \\+ region 4 exceeds the cache's 16 slots"),
    (lambda q, k, m: native.tree_attention(q, k, k, 3, m, 1), ValueError, "region must be >= 2"),
    (lambda q, k, m: native.tree_attention(q, k, k, 3.0, m, 4), TypeError,
     "prefix_len must be an int"),
    (lambda q, k, m: native.tree_attention(q, k, k, 3, m, 4, out=torch.empty(2, 4, 7)),
     ValueError, "out has shape"),
    (lambda q, k, m: native.tree_attention(q[:, :, ::2], k[:, :, ::2], k[:, :, ::2], 3, m, 4),
     ValueError, "q must be contiguous in its last dim"),
    (lambda q, k, m: native.kv_compact(k, 0, torch.tensor([0])), ValueError,
     "arena .* must be a contiguous"),
    (lambda q, k, m: native.kv_compact(k[None, None], 0, torch.tensor([0.0])), TypeError,
     "nodes must be a 1-D int64 tensor"),
    (lambda q, k, m: native.kv_compact(k[None, None], 15, torch.tensor([0, 1])), ValueError,
     "start 15 \\+ 2 nodes exceeds"),
    (lambda q, k, m: native.kv_compact(k[None, None], 0, torch.tensor([1, 0])), ValueError,
     r"nodes\[1\] = 0"),
])
def test_wrapper_argument_errors(call, error, match):
    q, k = torch.randn(2, 4, 8), torch.randn(2, 16, 8)
    mask = native.pack_mask(torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(error, match=match):
        call(q, k, mask)


# ---- the engine: backend "cpu" (these kernels) against "torch" ---------------------------------
@pytest.fixture(scope="module")
def engines(tiny_llava_dir, tmp_path_factory):
    def load(backend, draft=None):
        engine = Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=160, backend=backend,
                             draft=draft, tree=TreeParams(4, 3, 12))
        engine.config = dataclasses.replace(engine.config, eos_token_ids=())  # full length
        return engine

    torch_engine = load("torch")
    draft = write_random_draft(torch_engine, tmp_path_factory.mktemp("draft") / "msd")
    return torch_engine, load("cpu"), load("cpu", draft)


@pytest.mark.parametrize("with_image", [True, False])
def test_cpu_backend_greedy_tokens_match_torch(engines, with_image):
    torch_engine, cpu_engine, cpu_spec = engines
    assert type(cpu_engine.model.text.ops).__name__ == "CpuOps"
    g = torch.Generator().manual_seed(7)
    ids = [1] + torch.randint(3, 32000, (6,), generator=g).tolist()
    pixels = None
    if with_image:
        ids = ids[:2] + [IMAGE_TOKEN_ID] + ids[2:]
        pixels = torch.randn(1, 3, 28, 28, generator=g)
    expected = torch_engine.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=24)
    plain = cpu_engine.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=24)
    spec = cpu_spec.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=24)
    assert plain.token_ids == expected.token_ids
    assert spec.token_ids == expected.token_ids and spec.stats["verify_forwards"] > 0
