"""`sampling.argmax_rows` (numpy's argmax on CPU float32) against torch.argmax, whose semantics it
keeps: the first of equal maxima, a NaN counted as the largest, -inf rows, strided rows, 1-D input."""
from __future__ import annotations

import pytest
import torch

from msd_engine.sampling import Sampler, SamplingParams, argmax_rows


def _torch_argmax(logits: torch.Tensor) -> list[int]:
    return logits.reshape(-1, logits.shape[-1]).argmax(dim=-1).tolist()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
def test_random_rows_match_torch(dtype):
    torch.manual_seed(0)
    for shape in [(49152,), (1, 49152), (8, 49152), (5, 7), (3, 1)]:
        logits = torch.randn(shape).to(dtype)
        assert argmax_rows(logits) == _torch_argmax(logits)


def test_ties_nan_and_infinities_match_torch():
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([
        [1.0, 3.0, 3.0, 2.0],         # equal maxima: the first
        [1.0, nan, 5.0, nan],         # NaN: the first NaN
        [-inf, -inf, -inf, -inf],     # nothing finite: index 0
        [-inf, inf, 2.0, inf],        # +inf
        [0.0, -0.0, 0.0, -1.0],       # signed zeros are equal
    ])
    assert argmax_rows(logits) == _torch_argmax(logits) == [1, 1, 0, 1, 0]


def test_strided_and_inference_tensors():
    torch.manual_seed(1)
    with torch.inference_mode():
        base = torch.randn(6, 300)
        for view in (base[::2], base[:, 5:250], base.t().contiguous().t()):
            assert argmax_rows(view) == _torch_argmax(view)


def test_greedy_sampler_and_tree_acceptance_use_it(monkeypatch):
    import msd_engine.sampling as sampling
    import msd_engine.spec.accept as accept
    from msd_engine.spec.tree import build_tree

    calls = []
    real = sampling.argmax_rows
    monkeypatch.setattr(sampling, "argmax_rows", lambda t: calls.append(tuple(t.shape)) or real(t))
    monkeypatch.setattr(accept, "argmax_rows", sampling.argmax_rows)
    logits = torch.tensor([0.5, 2.0, 2.0, -1.0])
    assert Sampler(SamplingParams(), torch.device("cpu"))(logits) == 1
    tree = build_tree(torch.tensor([7, 1, 2]), torch.tensor([-1, 0, 1]))
    assert accept.accept_greedy(tree, torch.eye(4)[[1, 2, 3]]) == ([0, 1, 2], 3)
    assert calls == [(4,), (3, 4)]


def test_inputs_it_does_not_take_and_grad_tensors():
    with pytest.raises(ValueError, match=r"logits \[V\] or \[T, V\], got shape \(\)"):
        argmax_rows(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 4\)"):
        argmax_rows(torch.zeros(2, 3, 4))
    logits = torch.randn(3, 10, requires_grad=True)
    assert argmax_rows(logits) == _torch_argmax(logits)
