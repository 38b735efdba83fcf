"""The draft loss (shift, masking, weights), the input noise, and the curriculum."""
from __future__ import annotations

import math

import pytest
import torch

from msd_engine.draft.config import DraftConfig
from msd_engine.train.curriculum import Curriculum
from msd_engine.train.losses import UNROLL_DECAY, draft_loss, input_noise, unrolled_loss
from msd_engine.train.module import DraftModule


def test_hand_computed_example():
    # B=1, N=3, H=2, V=2; lm_head = identity so logits = features.
    lm_head = torch.eye(2)
    pred = torch.tensor([[[0.0, 0.0], [1.0, 3.0], [9.0, 9.0]]])
    target = torch.tensor([[[5.0, 5.0], [0.5, 0.0], [1.0, 0.0]]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    loss, stats = draft_loss(pred, target, mask, lm_head)
    # prediction 0 vs target 1 (mask[1]=1); prediction 1 vs target 2 (mask[2]=1); prediction 2 unused.
    f0 = (0.5 * 0.5 ** 2 + 0.0) / 2                  # |0-0.5|<1 -> 0.5 d^2; |0-0|
    f1 = ((1.0 - 1.0) + (3.0 - 0.5)) / 2             # d=0 -> 0; d=3>1 -> 3-0.5
    p0 = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    p1 = [math.e / (math.e + 1), 1 / (math.e + 1)]
    ce0 = -(p0[0] * math.log(0.5) + p0[1] * math.log(0.5))
    lz = math.log(math.e + math.e ** 3)
    ce1 = -(p1[0] * (1 - lz) + p1[1] * (3 - lz))
    assert stats["feature_loss"] == pytest.approx((f0 + f1) / 2, rel=1e-6)
    assert stats["ce_loss"] == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    assert float(loss) == pytest.approx((f0 + f1) / 2 + 0.1 * (ce0 + ce1) / 2, rel=1e-6)
    # the cross-entropy's weight is the caller's (the recipe's sixth stage: 0.5); the statistics are not
    for weight in (0.0, 0.5):
        weighted, weighted_stats = draft_loss(pred, target, mask, lm_head, ce_weight=weight)
        assert float(weighted) == pytest.approx((f0 + f1) / 2 + weight * (ce0 + ce1) / 2, rel=1e-6)
        assert weighted_stats == {**stats, "loss": pytest.approx(float(weighted))}
    # argmax: pred0 (0,0) -> 0 vs target1 -> 0 agree; pred1 -> 1 vs target2 -> 0 disagree
    assert stats["acc"] == pytest.approx(0.5)
    assert stats["positions"] == 2


def test_masked_positions_contribute_nothing():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    lm_head = torch.randn(11, 4, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.float32)
    loss, stats = draft_loss(pred, target, mask, lm_head)
    pred2, target2 = pred.clone(), target.clone()
    # prediction i is weighted by mask[i+1]: predictions with mask[i+1]=0, and targets with mask=0
    for b in range(2):
        for i in range(6):
            if i == 5 or mask[b, i + 1] == 0:
                pred2[b, i] = torch.randn(4, generator=g) * 100
            if mask[b, i] == 0:
                target2[b, i] = float("nan") if i > 0 else 1e4
    loss2, stats2 = draft_loss(pred2, target2, mask, lm_head)
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
    assert stats2 == pytest.approx(stats)
    assert stats["positions"] == 5


def test_all_masked_is_zero_loss():
    loss, stats = draft_loss(torch.randn(1, 4, 3), torch.randn(1, 4, 3), torch.tensor([[1.0, 0, 0, 0]]),
                             torch.randn(5, 3))
    assert float(loss) == 0.0 and stats["positions"] == 0


def test_gradient_flows_only_into_trainable_params():
    config = DraftConfig(hidden_size=8, intermediate_size=12, num_heads=2, num_kv_heads=2, vocab_size=20)
    module = DraftModule.from_config(config, torch.randn(20, 8), std=0.2)
    lm_head = torch.randn(20, 8, requires_grad=True)
    features = torch.randn(1, 5, 8, requires_grad=True)
    pred = module(torch.randint(0, 20, (1, 5)), features)
    loss, _ = draft_loss(pred, features.detach(), torch.ones(1, 5), lm_head)
    loss.backward()
    for name, p in module.named_parameters():
        if name == "embed_tokens.weight":
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert lm_head.grad is None  # the target's lm_head is frozen


def test_input_noise_range_and_determinism():
    x = torch.zeros(2, 64, 16)
    a = input_noise(x, torch.Generator().manual_seed(1))
    b = input_noise(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    half_width = 0.1 * 512 / 64
    assert a.abs().max() <= half_width and a.abs().max() > 0.9 * half_width
    assert abs(float(a.mean())) < 0.05 * half_width


def test_curriculum_default_probabilities():
    c = Curriculum()
    for epoch in range(1, 21):
        assert c.visual_probability(epoch) == 0.0
    for epoch in range(21, 40):
        assert c.visual_probability(epoch) == pytest.approx((epoch - 20) / 20)
    assert c.visual_probability(40) == 1.0
    for bad in (0, 41):
        with pytest.raises(ValueError, match="1-based"):
            c.visual_probability(bad)


def test_curriculum_other_config():
    c = Curriculum(text_epochs=2, ramp_epochs=3, total_epochs=7)
    assert [c.visual_probability(e) for e in range(1, 8)] == pytest.approx([0, 0, 0.25, 0.5, 0.75, 1, 1])
    assert [Curriculum(0, 0, 1).visual_probability(1)] == [1.0]


@pytest.mark.parametrize("args", [(-1, 1, 5), (1, -1, 5), (1, 1, 0), (3, 3, 5)])
def test_curriculum_validation(args):
    with pytest.raises(ValueError):
        Curriculum(*args)


def test_curriculum_select_statistics():
    c = Curriculum()
    flags = [i % 3 != 0 for i in range(300)]  # 200 visual, 100 text
    visual = [i for i, v in enumerate(flags) if v]
    g = torch.Generator().manual_seed(0)
    for epoch in (1, 20):
        chosen = c.select(epoch, flags, g)
        assert chosen == [i for i, v in enumerate(flags) if not v]
    for epoch in (25, 30, 39):
        p, kept, draws = c.visual_probability(epoch), 0, 0
        for _ in range(20):
            chosen = set(c.select(epoch, flags, g))
            assert all(i in chosen for i, v in enumerate(flags) if not v)
            kept += sum(i in chosen for i in visual)
            draws += len(visual)
        sigma = math.sqrt(draws * p * (1 - p))
        assert abs(kept - draws * p) <= 5 * sigma
    assert c.select(40, flags, g) == list(range(300))


def test_unrolled_loss_weighs_the_steps_and_drops_the_unreachable_first_positions():
    g = torch.Generator().manual_seed(1)
    preds = [torch.randn(2, 7, 4, generator=g) for _ in range(3)]
    target, lm_head = torch.randn(2, 7, 4, generator=g), torch.randn(9, 4, generator=g)
    mask = torch.ones(2, 7)
    loss, stats = unrolled_loss(preds, target, mask, lm_head)
    kept = mask.clone()
    kept[:, 1:3] = 0  # predictions 0 and 1: step 3 at positions < 2 has no drafter state behind it
    steps = [draft_loss(p, target, kept, lm_head) for p in preds]
    weights = [1.0, UNROLL_DECAY, UNROLL_DECAY ** 2]
    want = sum(w * float(l) for w, (l, _) in zip(weights, steps)) / sum(weights)
    assert float(loss) == pytest.approx(want, rel=1e-6) and stats["loss"] == pytest.approx(want, rel=1e-6)
    assert stats["acc"] == pytest.approx(steps[0][1]["acc"]) and stats["positions"] == 2 * 4
    assert stats["acc_2"] == pytest.approx(steps[1][1]["acc"]) and stats["acc_3"] == pytest.approx(steps[2][1]["acc"])
    assert stats["feature_loss"] == pytest.approx(steps[0][1]["feature_loss"])
    with pytest.raises(ValueError, match="at least one step"):
        unrolled_loss([], target, mask, lm_head)
