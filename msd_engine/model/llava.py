"""LLaVA: vision tower + projector + Llama, and the splice of image features into the embeddings."""
from __future__ import annotations

from typing import Optional

import torch

from msd_engine.config import ModelConfig
from msd_engine.model.llama import LlamaModel
from msd_engine.model.vision import ClipVisionTower, Projector
from msd_engine.ops import TorchOps


class LlavaModel:
    """A text-only Llama when `config.vision` is None; otherwise LLaVA."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], ops: TorchOps, max_seq_len: int):
        self.config = config
        self.text = LlamaModel(config.text, weights, ops, max_seq_len)
        self.vision: Optional[ClipVisionTower] = None
        self.projector: Optional[Projector] = None
        if config.vision is not None and config.projector is not None:
            self.vision = ClipVisionTower(config.vision, weights, ops)
            self.projector = Projector(config.projector, weights, ops)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> projected features [N, num_image_tokens, H]."""
        if self.vision is None or self.projector is None:
            raise ValueError("this model has no vision tower: it cannot take images")
        return self.projector.forward(self.vision.forward(pixel_values))

    def input_embeds(self, input_ids: torch.Tensor, image_features: Optional[torch.Tensor]) -> torch.Tensor:
        """Expanded ids [T] -> [T, H]; every image-token position takes the next image feature row."""
        image_id = self.config.image_token_id
        is_image = input_ids == image_id if image_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        # Image ids may lie outside the embedding table (original LLaVA): look up id 0 there instead.
        embeds = self.text.embed(torch.where(is_image, torch.zeros_like(input_ids), input_ids))
        num_slots = int(is_image.sum())
        if image_features is None:
            assert num_slots == 0, "image tokens without image features"
            return embeds
        rows = image_features.reshape(-1, image_features.shape[-1])
        assert rows.shape[0] == num_slots, f"{num_slots} image slots for {rows.shape[0]} feature rows"
        embeds = embeds.clone()
        embeds[is_image] = rows.to(embeds.dtype)
        return embeds
