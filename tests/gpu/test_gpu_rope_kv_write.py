"""msd_rope_kv_write_cuda against `TorchOps.rope_kv_write` on the GPU, bit for bit in every dtype
(see tests/test_native_rope_kv_write.py), in place, under CUDA graph capture, and through the
`cuda` backend. Skipped without a GPU and the CUDA build of msd_engine._C.
"""
from __future__ import annotations

import pytest
import torch

from msd_engine import native
from tests.test_native_rope_kv_write import SHAPES, assert_step_matches, make_step, run

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and native.is_built() and native.cuda_available()),
    reason="needs a CUDA GPU and msd_engine._C built with CUDA")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("shape", SHAPES + ((32, 8, 128), (40, 40, 128)))
@pytest.mark.parametrize("t", (1, 7, 61, 577))
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_torch_bit_for_bit(dtype, t, shape):
    start = 5 if t < 70 else 0
    step = make_step(t, shape, dtype, seed=t * 131 + shape[2], device="cuda", start=start)
    if t > 70:  # a prefill: more slots than the default arena holds
        step = step._replace(arena=torch.full(step.arena.shape[:3] + (t + 3, shape[2]),
                                              float("nan"), dtype=dtype, device="cuda"))
    out = torch.full(step.q.shape, float("nan"), dtype=dtype, device="cuda")
    q_rot, arena = run(step, native_kernel=True, out=out)
    assert q_rot is out
    assert_step_matches(step, q_rot, arena)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_in_place(dtype):
    step = make_step(7, (8, 2, 128), dtype, seed=1, device="cuda")
    step = step._replace(q=step.q.clone())
    expected_q, _ = run(step, native_kernel=False)
    q = step.q
    assert run(step, native_kernel=True, out=q)[0] is q
    assert torch.equal(q, expected_q)


def test_graph_capture_and_the_cuda_backend():
    from msd_engine.ops.cuda_ops import CudaOps

    step = make_step(3, (32, 8, 128), torch.bfloat16, seed=4, device="cuda")
    k_cache, v_cache = step.arena[0, step.layer], step.arena[1, step.layer]
    ops = CudaOps(torch.device("cuda"))
    ops.rope_kv_write(step.q, step.k, step.v, step.cos, step.sin, k_cache, v_cache, step.start)
    torch.cuda.synchronize()  # warm-up before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_rot = ops.rope_kv_write(step.q, step.k, step.v, step.cos, step.sin, k_cache, v_cache,
                                  step.start)
    step.q.copy_(torch.randn_like(step.q))
    step.k.copy_(torch.randn_like(step.k))
    graph.replay()
    torch.cuda.synchronize()
    expected_q, expected_arena = run(step._replace(arena=torch.full_like(step.arena, float("nan"))),
                                     native_kernel=False)
    assert torch.equal(q_rot, expected_q)
    written = ~expected_arena.isnan()
    assert torch.equal(step.arena[written], expected_arena[written])
