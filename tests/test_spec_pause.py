"""Speculation that steps aside (`PausePolicy`): when to pause, and that paused decoding is still the
target's decoding and leaves the draft exactly where plain rounds would have."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from msd_engine import Engine
from msd_engine.spec.pause import PausePolicy, PauseState, hindsight_rounds
from msd_engine.spec.tree import TreeParams
from tests.factories import IMAGE_TOKEN_ID, SPECS
from tests.spec_doubles import OracleDrafter, write_random_draft

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


@pytest.mark.parametrize("tokens, guesses, longest, rounds", [
    ([5, 6, 7, 8, 9], [[5, 1], [6, 0], [7, 0], [8, 0], [0, 9]], 3, [4, 2]),  # first token: any of k; then best only
    ([5, 6, 7, 8], [[1, 5], [0, 6], [7, 0], [8, 0]], 3, [2, 3]),  # 6 only second best: that round ends
    ([5, 6, 7], [[1, 2], [3, 4], [7, 0]], 3, [1, 1, 2]),  # misses emit the target's token; the cut round: 1 + 1
    ([5, 6, 7], [[5], [6], [7]], 5, [4]),  # all guessed, the stretch ends first: a lower bound, accepted + 1
    ([5, 6], [[1], [2]], 2, [1, 1]),  # the last token missed: its round is whole (the token is the bonus)
    ([5, 6, 7, 8], [[5], [6], [7], [8]], 0, [1, 1, 1, 1]),  # a root-only tree accepts nothing
    ([5, 6, 7, 8, 9, 10], [[5], [6], [7], [8], [9], [10]], 2, [3, 3]),  # longest caps a round
    ([], [], 3, []),
])
def test_hindsight_walks_the_stretch_as_rounds_would(tokens, guesses, longest, rounds):
    assert hindsight_rounds(tokens, guesses, longest) == rounds


def test_hindsight_rejects_mismatched_guesses():
    with pytest.raises(ValueError, match="one row of guesses per token, got 1 for 2"):
        hindsight_rounds([1, 2], [[1]], 3)
    with pytest.raises(ValueError, match="longest must be >= 0"):
        hindsight_rounds([1], [[1]], -1)


def test_review_resumes_when_hindsight_pays_else_doubles_the_pause():
    state = PauseState(PausePolicy(break_even=2.0, first_rounds=1, first_pause=2, longest_pause=8, smoothing=0.5))
    state.observe(1)  # mean 1 < 1.8: a 2-step pause
    assert _steps(state, 3) == [False, False, True]
    assert not state.review([1, 1])  # would not have paid: a 4-step pause, this step its first
    assert _steps(state, 4) == [False, False, False, True]
    assert not state.review([1])  # 8 steps
    assert _steps(state, 8) == [False] * 7 + [True]
    assert not state.review([2])  # mean 1.5: still under; capped at 8
    assert _steps(state, 8) == [False] * 7 + [True]
    assert state.review([4, 3])  # mean 2.6 (1.5 -> 2.75 -> 2.875): rounds resume
    state.observe(1)  # mean 1.94 >= 1.8: no pause
    assert _steps(state, 2) == [True, True]
    state.observe(1)  # mean 1.47: the pause is short again
    assert _steps(state, 3) == [False, False, True]


def _oracle_engine(target: Engine, plain_ids: list[int], hindsight_right: bool, policy: PausePolicy) -> Engine:
    # Every drafted chain token wrong (rounds emit 1 token); hindsight's best guesses right or wrong.
    drafter = OracleDrafter(plain_ids + [0] * 16, vocab=target.config.text.vocab_size, corrupt=1.0,
                            hindsight_right=hindsight_right)
    return Engine(target.config, target.model, target.tokenizer, target.cache, target.device, target.backend,
                  drafter, TreeParams(2, 3, 7), pause=policy)


@pytest.mark.parametrize("hindsight_right", [True, False])
def test_a_pause_ends_on_what_the_draft_would_have_done(engines, hindsight_right):
    """Rounds that emit one token start a 4-step pause. Where the draft would have guessed the paused
    tokens, rounds resume at once and every pause stays 4 steps; where it would not, no round runs again
    and the pause doubles (no trial rounds)."""
    plain, _ = engines
    ids, _ = _request(5, False)
    expected = plain.generate(input_ids=ids, max_new_tokens=40).token_ids
    policy = PausePolicy(break_even=2.0, first_rounds=2, first_pause=4, longest_pause=16, smoothing=1.0)
    out = _oracle_engine(plain, expected, hindsight_right, policy).generate(input_ids=ids, max_new_tokens=40)
    assert out.token_ids == expected
    s = out.stats
    if hindsight_right:  # 2 rounds, then (4 plain steps, 1 round) 7 times, then 2 plain steps: 39 tokens
        assert (s["verify_forwards"], s["plain_steps"]) == (2 + 7, 7 * 4 + 2)
    else:  # 2 rounds, then pauses of 4, 8, 16, 16 ... with no round between them
        assert (s["verify_forwards"], s["plain_steps"]) == (2, 37)


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


def test_extend_guessing_guesses_each_token_from_the_position_before_it(engines):
    """The guesses for token j are what the draft proposes first with the tokens before j committed:
    the same as committing the tokens one at a time and asking for the top k before each."""
    _, spec = engines
    drafter = spec.drafter
    hidden = spec.model.text.config.hidden_size
    g = torch.Generator().manual_seed(0)
    prefix, prefix_features = torch.randint(3, 32000, (5,), generator=g), torch.randn(5, hidden, generator=g)
    tokens, features = torch.randint(3, 32000, (7,), generator=g), torch.randn(7, hidden, generator=g)
    with torch.inference_mode():
        drafter.reset()
        drafter.extend(prefix, None, None, prefix_features)
        one_by_one = []
        for j in range(tokens.shape[0]):
            one_by_one.append(drafter.model.top_k(drafter.last_hidden[None], 3)[1][0])
            drafter.extend(tokens[j:j + 1], None, None, features[j:j + 1])
        drafter.reset()
        drafter.extend(prefix, None, None, prefix_features)
        guesses = drafter.extend_guessing(tokens, features, 3)
        drafter.reset()
    assert guesses.tolist() == torch.stack(one_by_one).tolist()
