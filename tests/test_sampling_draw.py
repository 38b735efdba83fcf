"""`sampling.sample_index`: one draw by the inverse cumulative distribution, checked against the
probabilities it is given (chi-square, false-alarm rate 1e-3) and at its edges."""
from __future__ import annotations

import pytest
import torch

from msd_engine.sampling import sample_index

DRAWS = 20000


def chi_square_p(counts: list[int], probs: list[float]) -> float:
    stat = sum((c - p * DRAWS) ** 2 / (p * DRAWS) for c, p in zip(counts, probs))
    df = len(probs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("scale", [1.0, 2.5])  # the total need not be 1
def test_draws_follow_the_probabilities_and_never_take_a_zero(scale):
    probs = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.0, 0.05]) * scale
    generator = torch.Generator().manual_seed(0)
    counts = [0] * probs.shape[0]
    for _ in range(DRAWS):
        counts[sample_index(probs, generator)] += 1
    assert counts[1] == counts[4] == 0
    mass = [0.5, 0.2, 0.25, 0.05]
    assert chi_square_p([counts[0], counts[2], counts[3], counts[5]], mass) > 1e-3


def test_the_test_has_power():
    generator = torch.Generator().manual_seed(0)
    counts = [0, 0]
    for _ in range(DRAWS):
        counts[sample_index(torch.tensor([0.52, 0.48]), generator)] += 1
    assert chi_square_p(counts, [0.5, 0.5]) < 1e-3


def test_a_large_vocabulary_and_the_seed_repeat():
    probs = torch.softmax(torch.randn(49152, generator=torch.Generator().manual_seed(1)) * 3, dim=0)
    a = [sample_index(probs, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2] and 0 <= a[0] < 49152


def test_a_draw_rounded_up_to_the_total_takes_the_last_index_with_mass(monkeypatch):
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(1.0, dtype=torch.float64))
    assert sample_index(torch.tensor([0.5, 0.2, 0.3, 0.0, 0.0]), None) == 2


@pytest.mark.parametrize("probs, message", [
    (torch.ones(2, 3), r"probabilities \[V\], got shape \(2, 3\)"),
    (torch.ones(0), r"probabilities \[V\], got shape \(0,\)"),
    (torch.zeros(4), "sum to zero"),
])
def test_bad_input_is_named(probs, message):
    with pytest.raises(ValueError, match=message):
        sample_index(probs, torch.Generator())
