"""Speculation that steps aside (`PausePolicy`): when to pause, and that paused decoding is still the
target's decoding and leaves the draft exactly where plain rounds would have."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from msd_engine import Engine
from msd_engine.spec.pause import PausePolicy, PauseState
from msd_engine.spec.tree import TreeParams
from tests.factories import IMAGE_TOKEN_ID, SPECS
from tests.spec_doubles import write_random_draft

# Pauses as soon and as often as it can: a round must emit 50 tokens to pay.
ALWAYS = PausePolicy(break_even=50.0, first_rounds=1, first_pause=2, longest_pause=4)


def no_eos(engine: Engine) -> Engine:
    engine.config = dataclasses.replace(engine.config, eos_token_ids=())
    return engine


@pytest.fixture(scope="module")
def engines(tiny_llava_dir, tmp_path_factory):
    plain = no_eos(Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=192))
    draft = write_random_draft(plain, tmp_path_factory.mktemp("pause") / "msd")
    spec = no_eos(Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=192, draft=draft,
                              tree=TreeParams(3, 2, 6), pause_below=None))
    return plain, spec


def _request(seed: int, with_image: bool):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 32000, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist()
    if not with_image:
        return [1] + text, None
    pixels = torch.randn(1, 3, SPECS["gqa"].image_size, SPECS["gqa"].image_size, generator=g)
    return [1] + text[:1] + [IMAGE_TOKEN_ID] + text[1:], pixels


@pytest.mark.parametrize("kwargs, message", [
    ({"break_even": 0.5}, "break_even must be a finite number >= 1"),
    ({"break_even": float("nan")}, "break_even must be a finite number >= 1"),
    ({"break_even": True}, "break_even must be a finite number >= 1"),
    ({"break_even": "2"}, "break_even must be a finite number >= 1"),
    ({"break_even": 2.0, "pause_under": 0.0}, r"pause_under must be in \(0, 1\]"),
    ({"break_even": 2.0, "smoothing": 1.5}, r"smoothing must be in \(0, 1\]"),
    ({"break_even": 2.0, "first_rounds": 0}, "first_rounds must be an int >= 1"),
    ({"break_even": 2.0, "first_pause": 2.0}, "first_pause must be an int >= 1"),
    ({"break_even": 2.0, "first_pause": 8, "longest_pause": 4}, r"longest_pause \(4\) must be >= first_pause"),
])
def test_policy_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PausePolicy(**kwargs)


def _steps(state: PauseState, n: int) -> list[bool]:
    return [state.speculate() for _ in range(n)]


def test_pauses_start_double_and_reset_as_the_average_crosses_the_threshold():
    policy = PausePolicy(break_even=2.0, pause_under=1.0, smoothing=1.0, first_rounds=2, first_pause=2,
                         longest_pause=8)
    state = PauseState(policy)
    state.observe(1)  # one round: too early to judge
    assert _steps(state, 1) == [True]
    state.observe(1)
    assert _steps(state, 3) == [False, False, True]  # a 2-step pause, then one try
    state.observe(1)  # the try did not pay: twice as long
    assert _steps(state, 5) == [False] * 4 + [True]
    state.observe(1)
    assert _steps(state, 9) == [False] * 8 + [True]
    state.observe(1)  # capped at longest_pause
    assert _steps(state, 9) == [False] * 8 + [True]
    state.observe(3)  # a paying round: no pause, and the next one is short again
    assert _steps(state, 2) == [True, True]
    state.observe(1)
    assert _steps(state, 3) == [False, False, True]


def test_the_moving_average_and_the_margin_decide():
    # mean after 2, 2, 1, 1 with smoothing 0.5: 2, 2, 1.5, 1.25; threshold 0.9 x 1.6 = 1.44
    state = PauseState(PausePolicy(break_even=1.6, smoothing=0.5, first_rounds=1, first_pause=1, longest_pause=1))
    for emitted, pauses in ((2, False), (2, False), (1, False), (1, True)):
        state.observe(emitted)
        assert state.steps_left == int(pauses), (emitted, state.mean)
        _steps(state, state.steps_left)
    assert state.mean == pytest.approx(1.25)


def test_no_policy_never_pauses():
    state = PauseState(None)
    for _ in range(20):
        state.observe(1)
    assert _steps(state, 20) == [True] * 20


@pytest.mark.parametrize("with_image", [False, True])
def test_paused_greedy_decoding_is_plain_decoding(engines, with_image):
    plain, spec = engines
    spec.pause = ALWAYS
    try:
        for seed in range(3):
            ids, pixels = _request(seed, with_image)
            expected = plain.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=40)
            out = spec.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=40)
            assert out.token_ids == expected.token_ids
            s = out.stats
            assert s["plain_steps"] > 0 and s["verify_forwards"] > 0 and s["plain_ms"] > 0
            assert s["target_forwards"] == 1 + s["verify_forwards"] + s["plain_steps"]
            emitted = sum(int(n) * c for n, c in s["accepted_histogram"].items())
            # 40 tokens: the prefill's, the plain steps', the rounds' (the last round may be cut short)
            assert 39 <= s["plain_steps"] + emitted < 39 + max(int(n) for n in s["accepted_histogram"])
            assert s["tau"] == pytest.approx(emitted / s["verify_forwards"])  # rounds only
    finally:
        spec.pause = None


def test_seeded_sampling_with_pauses_repeats(engines):
    _, spec = engines
    spec.pause = ALWAYS
    try:
        ids, _ = _request(7, False)
        runs = [spec.generate(input_ids=ids, max_new_tokens=30, temperature=1.0, seed=3) for _ in range(2)]
        assert runs[0].token_ids == runs[1].token_ids
        assert runs[0].stats["plain_steps"] == runs[1].stats["plain_steps"] > 0
    finally:
        spec.pause = None


def test_the_draft_commits_every_position_once_with_the_targets_feature(engines):
    """After pauses the draft catches up in one extend: every committed draft position, in order, is
    the token at target position p+1 with the target's feature at p, as a one-pass target forward
    over the whole text gives them."""
    _, spec = engines
    drafter = spec.drafter
    committed_tokens, committed_features = [], []
    real_extend = drafter.extend

    def recording_extend(token_ids, image_embeds, is_image, features):
        committed_tokens.extend(token_ids.tolist())
        committed_features.append(features.detach().clone())
        return real_extend(token_ids, image_embeds, is_image, features)

    spec.pause = ALWAYS
    drafter.extend = recording_extend
    try:
        ids, _ = _request(11, False)
        out = spec.generate(input_ids=ids, max_new_tokens=40)
    finally:
        spec.pause = None
        del drafter.extend
    assert out.stats["plain_steps"] > 0
    sequence = ids + out.token_ids
    n = len(committed_tokens)
    assert n >= len(ids) + 20  # the prompt and most of the answer (a pause's last steps may be pending)
    assert committed_tokens == sequence[1:n + 1]
    text = spec.model.text
    spec.cache.reset()
    with torch.inference_mode():
        step = text.plan_step(torch.arange(n), 0, torch.ones(n, n, dtype=torch.bool).tril())
        reference = text.forward(text.embed(torch.tensor(sequence[:n])), step, spec.cache)
    spec.cache.reset()
    features = torch.cat(committed_features)
    assert features.shape == reference.shape
    # float32 over a tiny model: the same positions computed as prefill, tree rows or one-row
    # steps differ only by summation order
    torch.testing.assert_close(features, reference, rtol=1e-4, atol=1e-4)
