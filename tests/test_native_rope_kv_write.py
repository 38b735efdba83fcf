"""`native.rope_kv_write` (msd_rope_kv_write_cpu) against `TorchOps.rope_kv_write`, which it
replaces: bit for bit in every dtype, since both round each product and sum of
`x * cos + rotate_half(x) * sin` to the dtype on its own (and float32 uses no FMA); and, as a
check on that reference itself, within a few roundings of a float64 rope written out here.
The CUDA kernel is checked the same way in tests/gpu/test_gpu_rope_kv_write.py.
"""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from msd_engine import native
from msd_engine.ops.torch_ops import TorchOps

pytestmark = pytest.mark.skipif(not native.is_built(), reason="needs msd_engine._C")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROWS = (1, 7, 61)
# (Hq, Hkv, D): MHA, GQA 3 (SmolLM2) and 4, an odd head dim, and the smallest one.
SHAPES = ((4, 4, 64), (9, 3, 64), (8, 2, 128), (6, 2, 40), (3, 1, 2))
LAYERS, SLOTS = 3, 80


class Step(NamedTuple):
    q: torch.Tensor       # [T, Hq, D], a view of a fused qkv output
    k: torch.Tensor       # [T, Hkv, D], likewise
    v: torch.Tensor
    cos: torch.Tensor     # [T, D]
    sin: torch.Tensor
    arena: torch.Tensor   # [2, L, Hkv, S, D], NaN in every slot: whatever is not written stays NaN
    layer: int
    start: int


def make_step(t: int, shape: tuple, dtype: torch.dtype, seed: int, device: str = "cpu",
              start: int = 5) -> Step:
    num_heads, num_kv_heads, head_dim = shape
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (num_heads + 2 * num_kv_heads) * head_dim, generator=g)
    q, k, v = qkv.to(dtype).to(device).view(t, -1, head_dim).split(
        [num_heads, num_kv_heads, num_kv_heads], dim=1)
    # transformers' tables at positions start..start+T (halves duplicated)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(start, start + t).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    arena = torch.full((2, LAYERS, num_kv_heads, SLOTS, head_dim), float("nan"), dtype=dtype,
                       device=device)
    return Step(q, k, v, emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device), arena,
                layer=1, start=start)


def run(step: Step, native_kernel: bool, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_rot, arena after the write) by the kernel or by TorchOps, on a copy of the arena."""
    arena = step.arena.clone()
    k_cache, v_cache = arena[0, step.layer], arena[1, step.layer]
    args = (step.q, step.k, step.v, step.cos, step.sin, k_cache, v_cache, step.start)
    if native_kernel:
        q_rot = native.rope_kv_write(*args, out=out)
    else:
        q_rot = TorchOps().rope_kv_write(*args)
    return q_rot, arena


def rope_exact(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x, cos, sin = x.double(), cos.double()[:, None], sin.double()[:, None]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos[..., :half] - x2 * sin[..., :half],
                      x2 * cos[..., half:] + x1 * sin[..., half:]], dim=-1)


def assert_step_matches(step: Step, q_rot: torch.Tensor, arena: torch.Tensor) -> None:
    expected_q, expected_arena = run(step, native_kernel=False)
    assert torch.equal(q_rot, expected_q)
    assert torch.equal(arena.isnan(), expected_arena.isnan())  # same slots written, no others
    assert torch.equal(arena.nan_to_num(), expected_arena.nan_to_num())
    # The reference itself: three roundings of at most eps / 2 * max|x| each (|cos|, |sin| <= 1).
    eps = torch.finfo(q_rot.dtype).eps
    scale = step.q.double().abs().amax(-1, keepdim=True)
    assert ((q_rot.double() - rope_exact(step.q, step.cos, step.sin)).abs() <= 2 * eps * scale).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_bit_for_bit(dtype, t, shape):
    step = make_step(t, shape, dtype, seed=t * 131 + shape[2])
    out = torch.full(step.q.shape, float("nan"), dtype=dtype)
    q_rot, arena = run(step, native_kernel=True, out=out)
    assert q_rot is out
    assert_step_matches(step, q_rot, arena)


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_and_separate_k_v(dtype):
    """q rotated in place (out=q); k and v separate tensors with different strides."""
    step = make_step(7, (8, 2, 128), dtype, seed=1, start=0)
    step = step._replace(q=step.q.clone(), k=step.k.contiguous())  # v stays a strided view
    expected_q, expected_arena = run(step, native_kernel=False)
    q = step.q
    q_rot, arena = run(step, native_kernel=True, out=q)
    assert q_rot is q and torch.equal(q, expected_q)
    assert torch.equal(arena.nan_to_num(), expected_arena.nan_to_num())


@pytest.mark.parametrize("isa", native.CPU_ISAS if native.is_built() else ())
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_simd_path_matches_torch_bit_for_bit(isa, dtype):
    """The scalar loop and the AVX-512 one (16 pairs at a time, masked tails for half a head
    under 16 or not a multiple of it), in place too."""
    try:
        native.set_cpu_isa(isa)
    except ValueError:
        pytest.skip(f"this CPU or build cannot run the {isa} path")
    try:
        for t, shape in [(1, (9, 3, 64)), (8, (9, 3, 64)), (5, (6, 2, 40)), (3, (3, 1, 2)),
                         (2, (4, 4, 66))]:
            step = make_step(t, shape, dtype, seed=t * 7 + shape[2])
            assert_step_matches(step, *run(step, native_kernel=True))
            expected_q, _ = run(step, native_kernel=False)
            q = step.q.clone()
            q_rot, _ = run(step._replace(q=q), native_kernel=True, out=q)
            assert q_rot is q and torch.equal(q, expected_q)
    finally:
        native.set_cpu_isa(None)


def test_last_slots_and_empty_step():
    step = make_step(4, (4, 4, 64), torch.float32, seed=2, start=SLOTS - 4)
    assert_step_matches(step, *run(step, native_kernel=True))
    empty = make_step(1, (4, 4, 64), torch.float32, seed=3)
    empty = empty._replace(q=empty.q[:0], k=empty.k[:0], v=empty.v[:0], cos=empty.cos[:0],
                           sin=empty.sin[:0])
    q_rot, arena = run(empty, native_kernel=True)
    assert q_rot.shape == (0, 4, 64) and arena.isnan().all()


def _args(**changes):
    step = make_step(3, (4, 2, 8), torch.float32, seed=0)
    values = dict(q=step.q, k=step.k, v=step.v, cos=step.cos, sin=step.sin,
                  k_cache=step.arena[0, 0], v_cache=step.arena[1, 0], start=0)
    values.update(changes)
    return values


@pytest.mark.parametrize("change, error, match", [
    (dict(q=torch.randn(3, 4, 7)), ValueError, "D even"),
    (dict(q=torch.randn(3, 4, 8).double()), TypeError, "q has dtype torch.float64"),
    (dict(k=torch.randn(3, 2, 8).half()), TypeError, "k has dtype torch.float16"),
    (dict(v=torch.randn(3, 3, 8)), ValueError, r"v has shape \(3, 3, 8\)"),
    (dict(cos=torch.randn(2, 8)), ValueError, r"cos has shape \(2, 8\)"),
    (dict(sin=torch.randn(8, 3).t()), ValueError, "sin must be contiguous"),
    (dict(k_cache=torch.randn(3, 80, 8)), ValueError, "k_cache has shape"),
    (dict(v_cache=torch.randn(80, 2, 8).transpose(0, 1)), ValueError,
     "v_cache has strides .* but k_cache has"),
    (dict(start=78), ValueError, "start 78 \\+ T 3 exceeds the cache's 80 slots"),
    (dict(start=-1), ValueError, "start must be >= 0"),
    (dict(start=1.0), TypeError, "start must be an int"),
    (dict(q=torch.randn(3, 4, 8, device="meta")), ValueError, "k is on cpu but q is on meta"),
])
def test_wrapper_argument_errors(change, error, match):
    with pytest.raises(error, match=match):
        native.rope_kv_write(**_args(**change))


def test_c_api_argument_errors_name_the_argument():
    from msd_engine import _C
    p = torch.randn(64).data_ptr()

    def args(**changes):
        values = dict(q=p, k=p, v=p, cos=p, sin=p, q_out=p, k_cache=p, v_cache=p, tokens=3,
                      heads=4, kv_heads=2, head_dim=8, start=0, slots=80, q_row=48, q_head=8,
                      kv_row=64, kv_head=8, table=8, out_row=32, out_head=8, cache_head=640,
                      cache_slot=8, dtype=_C.FLOAT32)
        values.update(changes)
        return tuple(values.values())

    cases = [
        (args(k_cache=0), "k_cache is a null pointer"),
        (args(head_dim=7), "head_dim must be even, got 7"),
        (args(start=78), r"start \(78\) \+ num_tokens \(3\) exceeds num_slots \(80\)"),
        (args(kv_head=4), r"kv_head_stride \(4\) is smaller than the row length \(8\)"),
        (args(out_row=16), r"q_out_row_stride \(16\) and q_out_head_stride \(8\) make the "
                           r"\[3, 4\] rows of 8 elements of q_out overlap"),
        (args(cache_head=80), "cache_slot_stride .* of k_cache / v_cache overlap"),
        (args(dtype=7), "unsupported dtype: dtype 7"),
    ]
    for call_args, match in cases:
        with pytest.raises(ValueError, match=match):
            _C.rope_kv_write_cpu(*call_args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cuda_without_a_device_fails_clearly():
    from msd_engine import _C
    p = torch.randn(64).data_ptr()
    with pytest.raises(RuntimeError, match="CUDA error|not compiled"):
        _C.rope_kv_write_cuda(p, p, p, p, p, p, p, p, 3, 4, 2, 8, 0, 80, 48, 8, 64, 8, 8, 32, 8,
                              640, 8, _C.FLOAT32, 0)
