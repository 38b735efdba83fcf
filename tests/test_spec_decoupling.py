"""The MSD decoupling: over an image prompt, draft positions s-1..s+N-2 take the raw projector output
(no fc); every other position is fc([embed(next token), target feature]). Checked against a
straightforward float64 implementation written here, and against `eagle` mode, which must differ.
"""
from __future__ import annotations

import math

import pytest
import torch

from msd_engine import Engine
from msd_engine.spec.speculative import prompt_draft_inputs
from tests.factories import IMAGE_TOKEN_ID, SPECS, image_tokens
from tests.spec_doubles import write_random_draft


def plain_draft_hidden(w: dict, inputs: torch.Tensor, heads: int, theta: float, eps: float) -> torch.Tensor:
    """One draft layer, no input norm, no final norm, causal MHA with RoPE, float64."""
    n, hidden = inputs.shape
    d = hidden // heads
    x = inputs.double()
    q = (x @ w["layers.0.self_attn.q_proj.weight"].double().T).view(n, heads, d)
    k = (x @ w["layers.0.self_attn.k_proj.weight"].double().T).view(n, heads, d)
    v = (x @ w["layers.0.self_attn.v_proj.weight"].double().T).view(n, heads, d)
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]

    def rot(t):
        return t * cos + torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1) * sin

    q, k = rot(q), rot(k)
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    attn = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v).reshape(n, hidden)
    h = x + attn @ w["layers.0.self_attn.o_proj.weight"].double().T
    normed = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w["layers.0.post_attention_layernorm.weight"].double()
    gate = normed @ w["layers.0.mlp.gate_proj.weight"].double().T
    up = normed @ w["layers.0.mlp.up_proj.weight"].double().T
    return h + (torch.nn.functional.silu(gate) * up) @ w["layers.0.mlp.down_proj.weight"].double().T


@pytest.fixture(scope="module")
def setup(tiny_llava_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("decouple")
    target = Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128)
    drafts = {mode: write_random_draft(target, root / mode, mode) for mode in ("msd", "eagle")}
    return target, drafts


@pytest.mark.parametrize("image_at", [1, 4])
def test_msd_draft_hidden_states_match_a_plain_implementation(tiny_llava_dir, setup, image_at):
    from safetensors.torch import load_file

    target, drafts = setup
    spec = SPECS["gqa"]
    num = image_tokens(spec)
    text = torch.randint(3, 32000, (8,), generator=torch.Generator().manual_seed(image_at)).tolist()
    ids = torch.tensor([1] + text[:image_at - 1] + [IMAGE_TOKEN_ID] * num + text[image_at - 1:])
    s = image_at  # first image position
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(7))
    root = 123
    hidden = {}
    for mode, path in drafts.items():
        engine = Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128, draft=path)
        model = engine.model
        with torch.inference_mode():
            proj = model.image_features(pixels)[0]                           # [N, H]
            embeds = model.input_embeds(ids, proj[None])
            n = ids.shape[0]
            step = model.text.plan_step(torch.arange(n), 0, torch.ones(n, n, dtype=torch.bool).tril())
            engine.cache.reset()
            features = model.text.forward(embeds, step, engine.cache)        # [n, H], post final norm
            engine.drafter.reset()
            hidden[mode] = engine.drafter.extend(*prompt_draft_inputs(ids, embeds, root, IMAGE_TOKEN_ID), features)

        w = load_file(str(path / "model.safetensors"))
        next_tokens = ids[1:].tolist() + [root]
        rows = []
        for i in range(n):
            if mode == "msd" and s - 1 <= i <= s + num - 2:
                rows.append(proj[i - (s - 1)].double())                       # raw projector output, no fc
                continue
            tok_embed = proj[i + 1 - s] if s <= i + 1 < s + num else w["embed_tokens.weight"][next_tokens[i]]
            fused = torch.cat([tok_embed.double(), features[i].double()]) @ w["fc.weight"].double().T
            rows.append(fused + w["fc.bias"].double())
        cfg = engine.drafter.model.config
        ref = plain_draft_hidden(w, torch.stack(rows), cfg.num_heads, cfg.rope_theta, cfg.rms_norm_eps)
        torch.testing.assert_close(hidden[mode].double(), ref, rtol=1e-4, atol=1e-4)
    # Decoupling changes the draft's view of the image span and everything after it.
    assert not torch.allclose(hidden["msd"][s - 1:], hidden["eagle"][s - 1:], atol=1e-3)
    torch.testing.assert_close(hidden["msd"][:s - 1], hidden["eagle"][:s - 1])
