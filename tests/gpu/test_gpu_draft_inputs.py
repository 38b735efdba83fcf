"""msd_draft_inputs_cuda against the float64 reference of tests/test_native_draft_inputs.py (same
tolerances: see there), on both of its kernels: the tensor-core one (float16 / bfloat16, rows
16-byte aligned; row blocks of 16, 32 and 64) and the CUDA-core one (float32, and 16-bit shapes
that are not aligned), plus CUDA graph capture and the NaN row for an out-of-range token id.
Skipped without a GPU and the CUDA build of msd_engine._C.
"""
from __future__ import annotations

import pytest
import torch

from msd_engine import native
from tests.test_native_draft_inputs import (IMAGES, Operands, assert_draft_close, operands,
                                            poisoned, source_rows)

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and native.is_built() and native.cuda_available()),
    reason="needs a CUDA GPU and msd_engine._C built with CUDA")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Row counts around the kernels' row blocks (1, 4, 16 CUDA-core; 16, 32, 64 tensor cores).
ROWS = (1, 4, 7, 16, 17, 60, 64, 65, 128)
# 61 and 203 are not multiples of 8: 16-bit inputs take the CUDA-core kernel without vectors.
HIDDENS = (61, 64, 200, 203, 576)


@pytest.mark.parametrize("images", IMAGES)
@pytest.mark.parametrize("hidden", HIDDENS)
@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_float64(dtype, t, hidden, images):
    ops = operands(t, hidden, dtype, images, seed=t * 7919 + hidden * 31 + IMAGES.index(images),
                   device="cuda")
    for bypass in (False, True):
        out = poisoned(ops)
        assert native.draft_inputs(*ops, bypass, out=out) is out
        torch.cuda.synchronize()
        assert_draft_close(out, ops, bypass)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 10, 60, 128])
def test_llava_7b_shape(dtype, t):
    """H = 4096 with a prompt-like image span: the shape the kernel is tuned for."""
    ops = operands(t, 4096, dtype, "span", seed=t, device="cuda")
    for bypass in (False, True):
        out = native.draft_inputs(*ops, bypass, out=poisoned(ops))
        assert_draft_close(out, ops, bypass)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_strided_rows_and_unaligned_views(dtype):
    """Row strides with padding (aligned for 16-bit when pad % 8 == 0, else not), fc_weight a
    column slice starting off a 16-byte boundary, no bias."""
    t, hidden = 61, 200
    for pad, offset in ((8, 0), (7, 3)):
        ops = operands(t, hidden, dtype, "mixed", seed=pad, device="cuda", pad=pad, bias=False)
        wide = torch.randn(hidden, 2 * hidden + 16, device="cuda").to(dtype)
        ops = ops._replace(fc_weight=wide[:, offset:offset + 2 * hidden])
        for bypass in (False, True):
            assert_draft_close(native.draft_inputs(*ops, bypass, out=poisoned(ops)), ops, bypass)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_broadcast_rows(dtype):
    """features / image_rows expanded from one row (row stride 0), as the drafter passes them."""
    ops = operands(12, 576, dtype, "mixed", seed=3, device="cuda")
    ops = ops._replace(features=ops.features[:1].expand(12, -1),
                       image_rows=ops.image_rows[4:5].expand(12, -1))
    for bypass in (False, True):
        assert_draft_close(native.draft_inputs(*ops, bypass, out=poisoned(ops)), ops, bypass)


def test_cuda_agrees_with_the_cpu_kernel():
    ops = operands(60, 576, torch.bfloat16, "span", seed=3)
    cpu = native.draft_inputs(*ops, True)
    gpu = native.draft_inputs(*Operands(*(None if x is None else x.cuda() for x in ops)), True)
    assert (gpu.cpu().double() - cpu.double()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * \
        cpu.double().abs().max()


def test_out_of_range_token_gives_a_nan_row():
    """A CUDA kernel cannot check ids without a sync: the row is NaN instead of a wild read."""
    ops = operands(7, 64, torch.float16, "none", seed=4, device="cuda")
    ids = ops.token_ids.clone()
    ids[2], ids[5] = -1, 10 ** 9
    out = native.draft_inputs(*ops._replace(token_ids=ids), False)
    assert torch.isnan(out[[2, 5]]).all()
    fine = [0, 1, 3, 4, 6]
    expected = native.draft_inputs(*ops, False)
    assert torch.equal(out[fine], expected[fine])


def test_graph_capture_and_the_torch_stream():
    ops = operands(10, 576, torch.bfloat16, "mixed", seed=6, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = native.draft_inputs(*ops, True)  # also the warm-up before capture
    side.synchronize()
    assert_draft_close(out, ops, True)

    graph, out = torch.cuda.CUDAGraph(), poisoned(ops)
    with torch.cuda.graph(graph):
        native.draft_inputs(*ops, True, out=out)
    ops.features.copy_(torch.randn_like(ops.features))
    ops.image_rows.copy_(torch.randn_like(ops.image_rows))
    graph.replay()
    torch.cuda.synchronize()
    assert_draft_close(out, ops, True)


def test_cuda_backend_uses_it():
    from msd_engine.ops.cuda_ops import CudaOps

    ops = operands(12, 200, torch.bfloat16, "span", seed=8, device="cuda")
    out = CudaOps(torch.device("cuda")).draft_inputs(*ops, bypass=True)
    assert_draft_close(out, ops, True)
    assert torch.equal(out[ops.is_image], source_rows(ops)[ops.is_image])
