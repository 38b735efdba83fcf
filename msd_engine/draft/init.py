"""A fresh draft head for a target: random layer weights (as training starts), frozen embedding copy."""
from __future__ import annotations

from typing import Optional

import torch

from msd_engine.config import ModelConfig
from msd_engine.draft.config import DraftConfig
from msd_engine.draft.weights import DRAFT_VOCAB_KEY, draft_expected_shapes


def draft_config_for(target: ModelConfig, mode: str = "msd", dtype: str = "float32",
                     draft_vocab_size: int = 0) -> DraftConfig:
    """The draft shape MSD uses for a target: one MHA layer of the target's width (draft_vocab_size:
    0 = the whole vocabulary, else the size of a reduced draft vocabulary)."""
    t = target.text
    return DraftConfig(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_heads=t.num_heads,
                       num_kv_heads=t.num_heads, vocab_size=t.vocab_size, rms_norm_eps=t.rms_norm_eps,
                       rope_theta=t.rope_theta, head_dim=t.head_dim, mode=mode, dtype=dtype,
                       draft_vocab_size=draft_vocab_size)


def init_draft_weights(config: DraftConfig, target_embed: torch.Tensor, seed: int = 0, std: float = 0.02,
                       draft_vocab: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Normal(0, std) matrices, zero fc bias, unit norm weight; embed_tokens = the target's embedding;
    `draft_vocab` (given exactly when config.draft_vocab_size > 0) the reduced vocabulary's ids."""
    if (draft_vocab is not None) != bool(config.draft_vocab_size):
        raise ValueError(f"draft_vocab {'given' if draft_vocab is not None else 'missing'} but the config's "
                         f"draft_vocab_size is {config.draft_vocab_size}")
    g = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for name, shape in draft_expected_shapes(config).items():
        if name == DRAFT_VOCAB_KEY:
            weights[name] = draft_vocab.detach().to("cpu").clone()  # its dtype is checked by the loader
        elif name == "embed_tokens.weight":
            weights[name] = target_embed.detach().to("cpu", torch.float32).clone()
        elif name.endswith("layernorm.weight"):
            weights[name] = torch.ones(shape)
        elif name == "fc.bias":
            weights[name] = torch.zeros(shape)
        else:
            weights[name] = torch.randn(shape, generator=g) * std
    return weights
