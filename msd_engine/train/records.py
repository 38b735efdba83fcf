"""One training sequence for the draft, and how to record it from the target (in memory).

All per-position tensors are indexed by draft position i, which pairs the token at target position
i+1 (`token_ids`, the EAGLE shift, as `prompt_draft_inputs` builds it) with the target's feature at
target position i (`features`). `loss_mask[i]` marks target position i as an assistant token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from msd_engine.kv_cache import KVCache
from msd_engine.model.llava import LlavaModel
from msd_engine.spec.speculative import prompt_draft_inputs


@dataclass
class DraftRecord:
    token_ids: torch.Tensor              # [N] long: tokens at target positions 1..N-1, then the next token
    features: torch.Tensor               # [N, H] target post-norm last hidden states
    loss_mask: torch.Tensor              # [N] 1 on assistant positions
    image_rows: Optional[torch.Tensor] = None  # [N, H] projector output where is_image
    is_image: Optional[torch.Tensor] = None    # [N] bool
    is_visual: bool = False

    def __post_init__(self) -> None:
        n = self.token_ids.shape[0]
        if self.token_ids.dim() != 1 or self.features.shape[0] != n or self.loss_mask.shape != (n,):
            raise ValueError(f"record shapes disagree: token_ids {list(self.token_ids.shape)}, features "
                             f"{list(self.features.shape)}, loss_mask {list(self.loss_mask.shape)}")
        if (self.image_rows is None) != (self.is_image is None):
            raise ValueError("image_rows and is_image must be given together")


def record_from_target(model: LlavaModel, cache: KVCache, input_ids: torch.Tensor,
                       pixel_values: Optional[torch.Tensor], response_start: int,
                       image_token_id: Optional[int]) -> DraftRecord:
    """Run the target over `input_ids` (prompt + response; response from `response_start`) and
    record the draft's view of it. The token after the last one is the target's greedy choice."""
    n = input_ids.shape[0]
    if not 0 < response_start <= n:
        raise ValueError(f"response_start {response_start} outside 1..{n}")
    with torch.inference_mode():
        image = None if pixel_values is None else model.image_features(pixel_values)
        embeds = model.input_embeds(input_ids, image)                           # [n, H]
        causal = torch.ones(n, n, dtype=torch.bool, device=embeds.device).tril()
        cache.reset()
        features = model.text.forward(embeds, model.text.plan_step(torch.arange(n), 0, causal), cache)
        cache.reset()
        nxt = int(model.text.logits(features[-1:])[0].argmax())
        token_ids, rows, is_image = prompt_draft_inputs(input_ids, embeds, nxt, image_token_id)
    mask = torch.zeros(n)
    mask[response_start:] = 1
    visual = bool(is_image.any())
    # clone out of inference mode: autograd cannot use inference tensors
    return DraftRecord(token_ids.clone(), features.float().clone(), mask,
                       rows.float().clone() if visual else None, is_image.clone() if visual else None, visual)
