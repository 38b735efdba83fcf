"""The engine against transformers' LlavaForConditionalGeneration on tiny random models."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from msd_engine import Engine
from msd_engine.convert.llava_hf import convert_llava_hf
from tests.factories import IMAGE_TOKEN_ID, SPECS, build_hf_llava, image_tokens, save_hf_llava

NEW_TOKENS = 32


@pytest.fixture(scope="module", params=sorted(SPECS))
def pair(request, tmp_path_factory):
    """(spec, transformers model, engine) for one tiny config, converted through the llava-hf route."""
    spec = SPECS[request.param]
    hf = build_hf_llava(spec)
    root = tmp_path_factory.mktemp(request.param)
    save_hf_llava(hf, root / "hf")
    convert_llava_hf(root / "hf", root / "converted", dtype="float32", force=False, progress=False)
    engine = Engine.load(root / "converted", dtype="float32", max_seq_len=256)
    # Random weights emit EOS by chance; run the full length on both sides.
    engine.config = dataclasses.replace(engine.config, eos_token_ids=())
    return spec, hf, engine


def _prompt(spec, seed: int, with_image: bool) -> tuple[list[int], torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 32000, (11,), generator=g).tolist()
    if not with_image:
        return [1] + text, None
    ids = [1] + text[:4] + [IMAGE_TOKEN_ID] * image_tokens(spec) + text[4:]
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=g)
    return ids, pixels


def _engine_prefill_logits(engine: Engine, ids: list[int], pixels) -> torch.Tensor:
    model = engine.model
    with torch.inference_mode():
        feats = model.image_features(pixels) if pixels is not None else None
        embeds = model.input_embeds(torch.tensor(ids), feats)
        n = len(ids)
        step = model.text.plan_step(torch.arange(n), 0, torch.ones(n, n, dtype=torch.bool).tril())
        engine.cache.reset()
        return model.text.logits(model.text.forward(embeds, step, engine.cache))


@pytest.mark.parametrize("with_image", [True, False])
def test_prefill_logits_match_transformers(pair, with_image):
    spec, hf, engine = pair
    ids, pixels = _prompt(spec, 0, with_image)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].float()
    ours = _engine_prefill_logits(engine, ids, pixels)
    # float32 throughout, same op order: differences are summation-order rounding only.
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_tokens_match_transformers(pair, seed):
    spec, hf, engine = pair
    ids, pixels = _prompt(spec, 100 + seed, with_image=True)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = out[0, len(ids):].tolist()
    # Give the image once (the engine expands it) to cover both input conventions.
    compact = [t for i, t in enumerate(ids) if t != IMAGE_TOKEN_ID or ids[i - 1] != IMAGE_TOKEN_ID]
    result = engine.generate(input_ids=compact, pixel_values=pixels, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == ref
    assert result.finish_reason == "length"
    assert result.stats["prompt_tokens"] == len(ids)
