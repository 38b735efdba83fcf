"""GPU checks of the fused kernels, compiled, at model sizes (skipped without CUDA; run with
`TRITON_INTERPRET=0 pytest tests/gpu`).

rope_kv_write is bit-exact against torch's own CUDA rope in every dtype, bfloat16 included (it is
compiled without FMA contraction). logsoftmax_topk at a draft step's sizes (H = 4096, the real
vocabularies): its top-k values within twice the plain torch error of float64, the float64
log-probs at its indices equal to its values within that bound, ties by ascending index.
"""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="GPU tests compile Triton: run with TRITON_INTERPRET=0"),
]
DTYPES = [torch.float16, torch.bfloat16]


def _rotary(positions: torch.Tensor, head_dim: int, dtype: torch.dtype):
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("t, q_heads, kv_heads", [(1, 32, 32), (60, 32, 8), (577, 32, 32)])
def test_compiled_rope_kv_write_matches_torch(dtype, t, q_heads, kv_heads):
    from msd_engine.triton_kernels.rope_kv_write import rope_kv_write, rope_kv_write_ref

    torch.manual_seed(t)
    head_dim, start = 128, 100
    qkv = torch.randn(t, (q_heads + 2 * kv_heads) * head_dim, device="cuda").to(dtype)
    q, k, v = qkv.view(t, -1, head_dim).split([q_heads, kv_heads, kv_heads], dim=1)
    cos, sin = _rotary(start + torch.arange(t, device="cuda"), head_dim, dtype)
    arena = torch.full((2, 3, kv_heads, start + t + 9, head_dim), float("nan"), dtype=dtype,
                       device="cuda")
    expected_arena = arena.clone()
    out = rope_kv_write(q, k, v, cos, sin, arena[0, 2], arena[1, 2], start)
    expected = rope_kv_write_ref(q, k, v, cos, sin, expected_arena[0, 2], expected_arena[1, 2],
                                 start)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(arena, expected_arena, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, vocab, k", [(1, 32064, 1), (60, 32064, 10), (64, 49152, 32),
                                         (70, 4099, 4)])
def test_compiled_logsoftmax_topk_error_within_2x_torch(dtype, t, vocab, k):
    from msd_engine.triton_kernels.lm_head_topk import logsoftmax_topk, logsoftmax_topk_ref

    torch.manual_seed(vocab + t)
    hidden = torch.randn(t, 4096, device="cuda").to(dtype)
    weight = (torch.randn(vocab, 4096, device="cuda") / 16).to(dtype)
    values, indices = logsoftmax_topk(hidden, weight, k)
    log_probs = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    exact = log_probs.topk(k, dim=-1).values
    ref_values, _ = logsoftmax_topk_ref(hidden, weight, k)
    torch_error = (ref_values.double() - exact).abs().max().item()
    bound = 2 * torch_error + 1e-6 * exact.abs().max().item()
    assert (values.double() - exact).abs().max().item() <= bound
    assert (values.double() - log_probs.gather(1, indices)).abs().max().item() <= bound
    assert (values[:, 1:] <= values[:, :-1]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_logsoftmax_topk_ties_by_ascending_index(dtype):
    from msd_engine.triton_kernels.lm_head_topk import logsoftmax_topk

    torch.manual_seed(1)
    hidden = torch.randint(-1, 2, (60, 128), device="cuda").to(dtype)
    weight = torch.randint(-1, 2, (32064, 128), device="cuda").to(dtype)
    weight[16032:] = weight[:16032].clone()  # every logit at least twice, in far-apart tiles
    values, indices = logsoftmax_topk(hidden, weight, 10)
    log_probs = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    exact, exact_indices = torch.sort(log_probs, dim=-1, descending=True, stable=True)
    assert torch.equal(indices, exact_indices[:, :10])
    torch.testing.assert_close(values.double(), exact[:, :10], rtol=0, atol=1e-5)
