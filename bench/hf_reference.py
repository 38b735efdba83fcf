"""transformers' `generate` on a converted msd-engine model, timed per token: the reference system of
the end-to-end benchmark (the model itself is built by `msd_engine.convert.to_transformers`).
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from msd_engine.config import ModelConfig
from msd_engine.convert.to_transformers import input_embeds


class _Clock:
    """A generate() streamer that notes when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        self.tokens.extend(int(x) for x in value.reshape(-1))

    def end(self) -> None:
        pass


def hf_generate(model, cfg: ModelConfig, input_ids: list[int], pixel_values: Optional[torch.Tensor],
                max_new_tokens: int, temperature: float, seed: int) -> tuple[list[int], float]:
    """(new token ids, decode tokens/s: tokens after the first over the time after the first)."""
    ids = torch.tensor([input_ids])
    with torch.inference_mode():
        embeds = input_embeds(model, cfg, ids, pixel_values)
        clock = _Clock()
        torch.manual_seed(seed)
        sample = temperature > 0
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=sample,
                             temperature=temperature if sample else None, top_p=None, top_k=None,
                             streamer=clock, eos_token_id=list(cfg.eos_token_ids),
                             pad_token_id=cfg.eos_token_ids[0])
    tokens = out[0].tolist()
    steps = len(clock.times) - 1
    rate = steps / (clock.times[-1] - clock.times[0]) if steps > 0 else 0.0
    return tokens, rate
