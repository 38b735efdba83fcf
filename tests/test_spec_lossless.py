"""Speculative decoding is lossless: greedy output equals plain greedy output token for token."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from msd_engine import Engine
from msd_engine.spec.tree import TreeParams
from tests.factories import IMAGE_TOKEN_ID, SPECS
from tests.spec_doubles import OracleDrafter, write_random_draft

TREES = [TreeParams(1, 1, 2), TreeParams(4, 3, 12), TreeParams(10, 5, 60), TreeParams(3, 6, 30)]


def no_eos(engine: Engine) -> Engine:
    engine.config = dataclasses.replace(engine.config, eos_token_ids=())
    return engine


@pytest.fixture(scope="module")
def target(tiny_llava_dir):
    return no_eos(Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=192))


@pytest.fixture(scope="module")
def random_draft(target, tmp_path_factory):
    return write_random_draft(target, tmp_path_factory.mktemp("draft") / "msd")


def _request(seed: int, with_image: bool):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 32000, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
    if not with_image:
        return [1] + text, None
    spec = SPECS["gqa"]
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=g)
    return [1] + text[:1] + [IMAGE_TOKEN_ID] + text[1:], pixels


@pytest.mark.parametrize("tree", TREES, ids=str)
@pytest.mark.parametrize("mode", ["msd", "eagle"])
def test_random_draft_greedy_equals_plain(tiny_llava_dir, target, random_draft, tmp_path, tree, mode):
    draft = random_draft if mode == "msd" else write_random_draft(target, tmp_path / "eagle", "eagle", seed=1)
    spec = no_eos(Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=192, draft=draft, tree=tree))
    for seed in range(3):
        ids, pixels = _request(seed, with_image=seed != 1)
        plain = target.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=30)
        fast = spec.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=30)
        assert fast.token_ids == plain.token_ids
        assert fast.stats["tau"] >= 1.0 and fast.finish_reason == "length"


@pytest.mark.parametrize("draft_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_draft_over_float32_target_is_lossless(tiny_llava_dir, target, random_draft, draft_dtype):
    spec = no_eos(Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=192, draft=random_draft,
                              tree=TreeParams(4, 3, 12), draft_dtype=draft_dtype))
    draft = spec.drafter.model
    assert draft.fc_weight.dtype == draft.lm_head.dtype == spec.drafter.cache.arena.dtype == draft_dtype
    assert spec.model.text.lm_head.dtype == torch.float32
    for seed in range(3):
        ids, pixels = _request(20 + seed, with_image=seed != 1)
        plain = target.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=30)
        assert spec.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=30).token_ids == plain.token_ids


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_target_verifies_exactly_what_plain_decoding_computes(tiny_llava_dir, dtype):
    """In 16-bit precision each op's rounding would turn any difference between a tree node's
    arithmetic and plain decoding's into other tokens at near-ties; the CPU kernels compute a node
    exactly as plain decoding computes its token (see msd_tree_attention_cpu). Oracle drafts: deep
    acceptance, wrong siblings beside every chain node. This tiny random model has no near-ties that
    the old kernel flipped (it passed there too): the kernel test in test_native_tree_attention.py
    and the bfloat16 demo test in test_demo.py are the ones that fail without the fix."""
    target = no_eos(Engine.load(tiny_llava_dir, dtype=dtype, max_seq_len=192))
    assert target.backend == "cpu" and target.model.text.lm_head.dtype == getattr(torch, dtype)
    for seed in range(4):
        ids, pixels = _request(40 + seed, with_image=seed % 2 == 0)
        plain = target.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=48)
        drafter = OracleDrafter(plain.token_ids + [0] * 16, vocab=target.config.text.vocab_size, seed=seed,
                                corrupt=0.2)
        engine = Engine(target.config, target.model, target.tokenizer, target.cache,
                        target.device, target.backend, drafter, TreeParams(4, 6, 16))
        fast = engine.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=48)
        assert fast.token_ids == plain.token_ids
        assert fast.stats["tau"] > 2.0


@pytest.mark.parametrize("corrupt", [0.0, 0.3, 0.8])
@pytest.mark.parametrize("with_image", [True, False])
def test_oracle_draft_exercises_partial_and_full_acceptance(target, corrupt, with_image):
    for seed in range(3):
        ids, pixels = _request(10 + seed, with_image)
        plain = target.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=40)
        drafter = OracleDrafter(plain.token_ids + [0] * 16, vocab=target.config.text.vocab_size, seed=seed,
                                corrupt=corrupt)
        engine = Engine(target.config, target.model, target.tokenizer, target.cache,
                        target.device, target.backend, drafter, TreeParams(4, 6, 16))
        fast = engine.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=40)
        assert fast.token_ids == plain.token_ids
        hist = {int(k): v for k, v in fast.stats["accepted_histogram"].items()}
        if corrupt == 0.0:
            assert fast.stats["tau"] > 5.0  # near-full acceptance of 7-token chains
        # Every round's tokens are counted, the last round's even if max_new_tokens cut it short.
        total = sum(n * c for n, c in hist.items())
        assert len(plain.token_ids) - 1 <= total < len(plain.token_ids) - 1 + max(hist)


def test_stops_inside_an_accepted_run_on_eos_and_max_new_tokens(target):
    ids, pixels = _request(3, with_image=False)
    plain = target.generate(input_ids=ids, max_new_tokens=40).token_ids
    eos = plain[9]
    first = plain.index(eos)
    for max_new in (1, 2, 5, 13):
        drafter = OracleDrafter(plain + [0] * 16, vocab=target.config.text.vocab_size, corrupt=0.0)
        engine = Engine(target.config, target.model, target.tokenizer, target.cache, target.device, target.backend,
                        drafter, TreeParams(2, 6, 14))
        out = engine.generate(input_ids=ids, max_new_tokens=max_new)
        assert out.token_ids == plain[:max_new] and out.finish_reason == "length"
        engine.config = dataclasses.replace(target.config, eos_token_ids=(eos,))
        drafter.reset()
        out = engine.generate(input_ids=ids, max_new_tokens=40)
        assert out.token_ids == plain[:first + 1] and out.finish_reason == "stop"


def test_capacity_is_respected(tiny_llava_dir, random_draft):
    spec = no_eos(Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=40, draft=random_draft,
                              tree=TreeParams(4, 3, 12)))
    plain = no_eos(Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=40))
    ids = [1] + list(range(100, 130))
    a = plain.generate(input_ids=ids, max_new_tokens=100)
    b = spec.generate(input_ids=ids, max_new_tokens=100)
    assert b.token_ids == a.token_ids and b.finish_reason == "length"
    assert spec.cache.length <= spec.cache.max_seq_len


def test_speculative_false_forces_plain_and_true_needs_a_draft(tiny_llava_dir, target, random_draft):
    spec = no_eos(Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=192, draft=random_draft))
    plain = spec.generate(input_ids=[1, 5, 6], max_new_tokens=4, speculative=False)
    assert "tau" not in plain.stats
    with pytest.raises(ValueError, match="no draft is loaded"):
        target.generate(input_ids=[1, 5, 6], max_new_tokens=4, speculative=True)


def test_stats_split_time_and_count_forwards(tiny_llava_dir, random_draft):
    spec = no_eos(Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=192, draft=random_draft))
    s = spec.generate(input_ids=[1, 5, 6], max_new_tokens=12).stats
    assert s["target_forwards"] == 1 + s["verify_forwards"]
    assert s["draft_ms"] > 0 and s["verify_ms"] > 0 and s["other_ms"] >= 0
    assert abs(s["tau"] - 11 / s["verify_forwards"]) < 1e-9  # 12 tokens: 1 from prefill, 11 from rounds


def test_real_smollm2_random_and_oracle_drafts_are_lossless(smollm2_float32, tmp_path):
    target = no_eos(Engine.load(smollm2_float32, dtype="float32", max_seq_len=256))
    prompt = "List three facts about the moon."
    plain = target.generate(prompt, max_new_tokens=32)
    draft = write_random_draft(target, tmp_path / "draft", std=0.02)
    spec = no_eos(Engine.load(smollm2_float32, dtype="float32", max_seq_len=256, draft=draft,
                              tree=TreeParams(4, 3, 10)))
    assert spec.generate(prompt, max_new_tokens=32).token_ids == plain.token_ids
    drafter = OracleDrafter(plain.token_ids + [0] * 16, vocab=target.config.text.vocab_size, corrupt=0.2)
    oracle = Engine(target.config, target.model, target.tokenizer, target.cache, target.device, target.backend,
                    drafter, TreeParams(4, 5, 12))
    assert oracle.generate(prompt, max_new_tokens=32).token_ids == plain.token_ids


@pytest.mark.parametrize("mode", ["msd", "eagle"])
def test_triton_backend_speculation_matches_torch_plain(tiny_llava_dir, target, random_draft, tmp_path, mode):
    """Tree attention, compaction and the fused draft input as Triton kernels (interpreter on CPU)."""
    draft = random_draft if mode == "msd" else write_random_draft(target, tmp_path / "eagle", "eagle", seed=1)
    tri = no_eos(Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=192, backend="triton", draft=draft,
                             tree=TreeParams(3, 3, 8)))
    ids, pixels = _request(5, with_image=True)
    plain = target.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=12)
    assert tri.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=12).token_ids == plain.token_ids
    ids, _ = _request(6, with_image=False)
    plain = target.generate(input_ids=ids, max_new_tokens=16).token_ids
    oracle = Engine(tri.config, tri.model, tri.tokenizer, tri.cache, tri.device, tri.backend,
                    OracleDrafter(plain + [0] * 16, vocab=target.config.text.vocab_size, corrupt=0.3), TreeParams(3, 5, 11))
    assert oracle.generate(input_ids=ids, max_new_tokens=16).token_ids == plain
