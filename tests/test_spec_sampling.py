"""Speculative sampling preserves the target's distribution (chi-square goodness of fit).

On a 4-token vocabulary the exact joint distribution of the first three sampled tokens is computed
from the target alone; speculative samples (random draft, and an oracle-style draft) must fit it.
False-alarm rate per test: p < 1e-3.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from msd_engine import Engine
from msd_engine.sampling import SamplingParams, probabilities
from msd_engine.spec.pause import PausePolicy
from msd_engine.spec.tree import TreeParams
from tests.factories import write_tiny_text_model
from tests.spec_doubles import OracleDrafter, write_random_draft

VOCAB, STEPS, SAMPLES = 4, 3, 2400
PROMPT = [0, 1, 2, 3, 1]
ALPHA = 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vocab")
    model = write_tiny_text_model(root / "model", VOCAB, std=0.12)  # flat enough that most cells count
    target = Engine.load(model, max_seq_len=64)
    draft = write_random_draft(target, root / "draft", std=0.5)
    return model, target, draft


def exact_joint(target: Engine, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(first STEPS tokens) from plain target forwards over every prefix."""
    text = target.model.text

    def next_probs(ids: list[int]) -> torch.Tensor:
        n = len(ids)
        target.cache.reset()
        with torch.inference_mode():
            step = text.plan_step(torch.arange(n), 0, torch.ones(n, n, dtype=torch.bool).tril())
            hidden = text.forward(text.embed(torch.tensor(ids)), step, target.cache)
            return probabilities(text.logits(hidden[-1:])[0], params).double()

    joint = {}
    for seq in itertools.product(range(VOCAB), repeat=STEPS):
        p = 1.0
        for i in range(STEPS):
            p *= float(next_probs(PROMPT + list(seq[:i]))[seq[i]])
        joint[seq] = p
    return joint


def chi_square_p(counts: dict, expected_p: dict, n: int) -> float:
    """Goodness-of-fit p-value; cells with expected count < 5 are pooled into one."""
    stat, cells, pool_obs, pool_exp = 0.0, 0, 0.0, 0.0
    for key, p in expected_p.items():
        e, o = p * n, counts.get(key, 0)
        if e < 5:
            pool_obs, pool_exp = pool_obs + o, pool_exp + e
            continue
        stat += (o - e) ** 2 / e
        cells += 1
    if pool_exp > 0:
        stat += (pool_obs - pool_exp) ** 2 / pool_exp
        cells += 1
    df = cells - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def sample_counts(engine: Engine, params: SamplingParams) -> dict:
    counts: dict = {}
    for seed in range(SAMPLES):
        out = engine.generate(input_ids=PROMPT, max_new_tokens=STEPS, temperature=params.temperature,
                              top_p=params.top_p, seed=seed).token_ids
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    return counts


@pytest.mark.parametrize("params", [SamplingParams(1.0, 1.0), SamplingParams(0.8, 0.85)], ids=["t1", "t0.8-p0.85"])
@pytest.mark.parametrize("drafter_kind", ["random", "oracle", "random-paused"])
def test_speculative_samples_follow_the_target_distribution(tiny, params, drafter_kind):
    model, target, draft = tiny
    joint = exact_joint(target, params)
    assert abs(sum(joint.values()) - 1.0) < 1e-5  # float32 probabilities
    if drafter_kind.startswith("random"):
        engine = Engine.load(model, max_seq_len=64, draft=draft, tree=TreeParams(top_k=3, depth=2, total_tokens=8))
        if drafter_kind == "random-paused":  # a round, then a plain step in place of the next one
            engine.pause = PausePolicy(break_even=50.0, first_rounds=1, first_pause=1, longest_pause=1)
    else:  # deterministic proposals: the greedy continuation with wrong siblings
        greedy = target.generate(input_ids=PROMPT, max_new_tokens=STEPS + 8).token_ids
        engine = Engine(target.config, target.model, target.tokenizer, target.cache, target.device, target.backend,
                        OracleDrafter(greedy + [0] * 8, VOCAB, corrupt=0.0), TreeParams(2, 3, 7))
    counts = sample_counts(engine, params)
    assert sum(counts.values()) == SAMPLES
    if drafter_kind == "random-paused":  # the plain steps did stand in for rounds in these samples
        steps = [engine.generate(input_ids=PROMPT, max_new_tokens=STEPS, temperature=params.temperature,
                                 top_p=params.top_p, seed=seed).stats["plain_steps"] for seed in range(40)]
        assert 0 < sum(1 for n in steps if n) < 40
    assert chi_square_p(counts, joint, SAMPLES) > ALPHA
    if drafter_kind == "oracle":
        engine.drafter.reset()


def test_chi_square_detects_a_wrong_distribution(tiny):
    """The statistic has power: plain samples at another temperature are rejected."""
    _, target, _ = tiny
    joint = exact_joint(target, SamplingParams(1.0, 1.0))
    counts = sample_counts(target, SamplingParams(0.5, 1.0))
    assert chi_square_p(counts, joint, SAMPLES) < ALPHA
