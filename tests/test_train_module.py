"""DraftModule (training) computes exactly what the inference drafter computes, in the released format."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from msd_engine import Engine
from msd_engine.draft.config import DraftConfig
from msd_engine.draft.init import draft_config_for
from msd_engine.draft.weights import draft_expected_shapes
from msd_engine.spec.speculative import prompt_draft_inputs
from msd_engine.train.module import DraftModule
from tests.factories import IMAGE_TOKEN_ID, SPECS, image_tokens
from tests.spec_doubles import write_random_draft


@pytest.fixture(scope="module")
def target(tiny_llava_dir):
    return Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=96)


def _image_prompt(model):
    spec = SPECS["gqa"]
    g = torch.Generator().manual_seed(3)
    text = torch.randint(3, 32000, (9,), generator=g).tolist()
    ids = torch.tensor([1] + text[:2] + [IMAGE_TOKEN_ID] * image_tokens(spec) + text[2:])
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=g)
    return ids, pixels


@pytest.mark.parametrize("mode", ["msd", "eagle"])
def test_module_matches_tree_drafter_extend(tiny_llava_dir, target, tmp_path, mode):
    draft_dir = write_random_draft(target, tmp_path / mode, mode, seed=5)
    engine = Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=96, draft=draft_dir)
    model = engine.model
    ids, pixels = _image_prompt(model)
    n = ids.shape[0]
    with torch.inference_mode():
        embeds = model.input_embeds(ids, model.image_features(pixels))
        engine.cache.reset()
        step = model.text.plan_step(torch.arange(n), 0, torch.ones(n, n, dtype=torch.bool).tril())
        features = model.text.forward(embeds, step, engine.cache)
        inputs = prompt_draft_inputs(ids, embeds, 123, IMAGE_TOKEN_ID)
        engine.drafter.reset()
        expected = engine.drafter.extend(*inputs, features).clone()
    token_ids, rows, is_image = (t.clone() for t in inputs)
    assert is_image.sum() == image_tokens(SPECS["gqa"])

    module = DraftModule(engine.drafter.model.config)
    module.load_weights(load_file(str(draft_dir / "model.safetensors")))
    got = module(token_ids[None], features.clone()[None], rows[None], is_image[None])[0]
    torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=1e-5)
    # padding on the right changes nothing for the real positions
    pad = 5
    padded = module(torch.nn.functional.pad(token_ids, (0, pad))[None],
                    torch.nn.functional.pad(features.clone(), (0, 0, 0, pad))[None],
                    torch.nn.functional.pad(rows.clone(), (0, 0, 0, pad))[None],
                    torch.nn.functional.pad(is_image, (0, pad))[None],
                    torch.arange(n + pad)[None] < n)[0, :n]
    torch.testing.assert_close(padded.detach(), expected, atol=1e-5, rtol=1e-5)


def test_state_dict_is_the_released_format(target):
    config = draft_config_for(target.config, "msd")
    module = DraftModule.from_config(config, target.model.text.embed_tokens)
    state = module.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == draft_expected_shapes(config)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == set(state) - {"embed_tokens.weight"}
    torch.testing.assert_close(state["embed_tokens.weight"], target.model.text.embed_tokens)


def test_load_weights_is_strict():
    config = DraftConfig(hidden_size=16, intermediate_size=24, num_heads=2, num_kv_heads=2, vocab_size=50)
    module = DraftModule(config)
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    del weights["fc.bias"]
    with pytest.raises(ValueError, match="fc.bias"):
        module.load_weights(weights)
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    weights["fc.weight"] = torch.zeros(16, 16)
    with pytest.raises(ValueError, match="fc.weight"):
        module.load_weights(weights)


def test_gqa_forward_runs_and_is_causal():
    config = DraftConfig(hidden_size=16, intermediate_size=24, num_heads=4, num_kv_heads=2, vocab_size=50)
    module = DraftModule.from_config(config, torch.randn(50, 16), std=0.2)
    ids = torch.randint(0, 50, (2, 7))
    feats = torch.randn(2, 7, 16)
    out = module(ids, feats)
    feats2 = feats.clone()
    feats2[:, 4:] += 1.0
    out2 = module(ids, feats2)
    torch.testing.assert_close(out[:, :4], out2[:, :4])
    assert not torch.allclose(out[:, 4:], out2[:, 4:])


def _drafted(module, ids, feats, rows, is_image, context_end, depth):
    """Plain reference for `forward_unrolled`: the draft run as drafting runs it, with `forward`
    alone: target features up to `context_end`, then `depth` - 1 predictions fed back one at a time."""
    f = feats[:, :context_end + 1]
    for j in range(depth):
        end = context_end + 1 + j
        out = module(ids[:, :end], f, None if rows is None else rows[:, :end],
                     None if is_image is None else is_image[:, :end])
        f = torch.cat([f, out[:, -1:]], dim=1)
    return out[:, -1]


@pytest.mark.parametrize("mode,kv_heads", [("msd", 2), ("eagle", 4), ("msd", 4)])
def test_unrolled_steps_are_the_draft_fed_its_own_predictions(mode, kv_heads):
    config = DraftConfig(hidden_size=16, intermediate_size=24, num_heads=4, num_kv_heads=kv_heads,
                         vocab_size=50, mode=mode)
    g = torch.Generator().manual_seed(4)
    module = DraftModule.from_config(config, torch.randn(50, 16, generator=g), std=0.3, seed=2)
    n = 9
    ids = torch.randint(0, 50, (2, n), generator=g)
    feats = torch.randn(2, n, 16, generator=g)
    rows = torch.randn(2, n, 16, generator=g)
    is_image = torch.zeros(2, n, dtype=torch.bool)
    is_image[:, 1:4] = True
    steps = module.forward_unrolled(ids, feats, rows, is_image, steps=3)
    assert len(steps) == 3
    torch.testing.assert_close(steps[0], module(ids, feats, rows, is_image))
    for k in (2, 3):
        for i in range(k - 1, n):
            want = _drafted(module, ids, feats, rows, is_image, i - k + 1, k)
            # other sequence lengths, other float32 summation orders (as in the padding test below)
            torch.testing.assert_close(steps[k - 1][:, i], want, atol=1e-4, rtol=1e-4)


def test_unrolled_steps_ignore_right_padding_and_carry_gradients():
    config = DraftConfig(hidden_size=16, intermediate_size=24, num_heads=4, num_kv_heads=2, vocab_size=50)
    g = torch.Generator().manual_seed(5)
    module = DraftModule.from_config(config, torch.randn(50, 16, generator=g), std=0.2, seed=1)
    ids = torch.randint(0, 50, (1, 6), generator=g)
    feats = torch.randn(1, 6, 16, generator=g)
    plain = module.forward_unrolled(ids, feats, steps=3)
    pad = 4
    padded = module.forward_unrolled(torch.nn.functional.pad(ids, (0, pad)),
                                     torch.nn.functional.pad(feats, (0, 0, 0, pad)),
                                     attention_mask=torch.arange(6 + pad)[None] < 6, steps=3)
    # padded keys change the matmuls' shapes, hence float32 summation order. Weights of std 0.2 keep
    # outputs under ~8: over 40 seeds the worst difference was 0.11 of (1e-5 + 1e-5 |x|); at std 0.3
    # outputs reach ~80 and three steps amplify rounding to ~6e-5 (measured)
    for a, b in zip(plain, padded):
        torch.testing.assert_close(b[:, :6], a, atol=1e-5, rtol=1e-5)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="steps must be an int >= 1"):
            module.forward_unrolled(ids, feats, steps=bad)


def test_unrolled_gradients_are_the_drafting_chains():
    """A later step's gradient flows back through the earlier steps' fed-back predictions: the same
    gradients as the plain chain's (`_drafted`, which feeds them back undetached)."""
    config = DraftConfig(hidden_size=16, intermediate_size=24, num_heads=4, num_kv_heads=2, vocab_size=50)
    g = torch.Generator().manual_seed(6)
    module = DraftModule.from_config(config, torch.randn(50, 16, generator=g), std=0.3, seed=3)
    ids, feats = torch.randint(0, 50, (1, 7), generator=g), torch.randn(1, 7, 16, generator=g)
    params = [p for p in module.parameters() if p.requires_grad]
    weight = torch.randn(16, generator=g)
    got = torch.autograd.grad((module.forward_unrolled(ids, feats, steps=3)[2][:, 5] * weight).sum(), params)
    want = torch.autograd.grad((_drafted(module, ids, feats, None, None, 3, 3) * weight).sum(), params)
    # float32 through two summation orders: gradients up to ~400 here agree within 1e-4 (measured)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3)
    # with the fed-back predictions detached the gradients differ far beyond that: the check can fail
    detached = _drafted_detached(module, ids, feats, 3, 3)
    other = torch.autograd.grad((detached * weight).sum(), params)
    assert max(float((a - b).abs().max()) for a, b in zip(got, other)) > 1e-2


def _drafted_detached(module, ids, feats, context_end, depth):
    f = feats[:, :context_end + 1]
    for j in range(depth):
        out = module(ids[:, :context_end + 1 + j], f)
        f = torch.cat([f, out[:, -1:].detach()], dim=1)
    return out[:, -1]
