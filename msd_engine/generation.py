"""Autoregressive decoding: prefill the prompt, then one token per step until a stop condition."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch

from msd_engine.kv_cache import CacheCapacityError, KVCache
from msd_engine.model.llava import LlavaModel
from msd_engine.sampling import Sampler


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    vision_ms: float = 0.0
    target_forwards: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes from the prefill; the rest from decode steps.
        steps = max(self.new_tokens - 1, 0)
        return steps / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "decode_tokens_per_s": self.decode_tokens_per_s}


@dataclass
class StopState:
    """Why decoding ended: 'stop' (an EOS token), 'length' (max_new_tokens or cache capacity)."""

    finish_reason: Optional[str] = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(model: LlavaModel, cache: KVCache, prompt_embeds: torch.Tensor, sampler: Sampler,
           max_new_tokens: int, eos_ids: tuple[int, ...], stats: GenerationStats,
           stop: StopState) -> Iterator[int]:
    """Yield new token ids; fill `stats` and `stop` as it goes. EOS is yielded, then decoding ends."""
    text = model.text
    device = prompt_embeds.device
    num_prompt = prompt_embeds.shape[0]
    cache.reset()
    cache.check_fits(num_prompt)
    stats.prompt_tokens = num_prompt
    if max_new_tokens <= 0:
        stop.finish_reason = "length"
        return

    t0 = time.perf_counter()
    positions = torch.arange(num_prompt, device=device)
    causal = torch.ones(num_prompt, num_prompt, dtype=torch.bool, device=device).tril()
    with torch.inference_mode():
        step = text.plan_step(positions, 0, causal if num_prompt > 1 else None)
        hidden = text.forward(prompt_embeds, step, cache)
        with text.ops.step_scope(1):  # a one-row step's work: see below
            token = sampler(text.logits(hidden[-1:])[0])
    cache.advance(num_prompt)
    _sync(device)
    # prefill_ms counts the vision tower too (measured by the caller into vision_ms).
    stats.prefill_ms = stats.vision_ms + (time.perf_counter() - t0) * 1e3
    stats.target_forwards = 1

    while True:
        stats.new_tokens += 1
        yield token
        if token in eos_ids:
            stop.finish_reason = "stop"
            break
        if stats.new_tokens >= max_new_tokens or cache.length >= cache.max_seq_len:
            stop.finish_reason = "length"
            break
        t1 = time.perf_counter()
        token, _ = decode_step(model, cache, token, sampler)
        stats.target_forwards += 1
        _sync(device)
        # Only the steps are timed: a streaming consumer's time between tokens is not ours.
        stats.decode_ms += (time.perf_counter() - t1) * 1e3


def decode_step(model: LlavaModel, cache: KVCache, token: int, sampler: Sampler) -> tuple[int, torch.Tensor]:
    """One plain decoding step after `token` at the cache's next position: (the next token, the
    step's final hidden state [1, H]); the cache advances by one."""
    text = model.text
    device = text.embed_tokens.device
    position = cache.length
    # The whole step in the backend's one-row scope, sampling included: on the CPU a softmax
    # over the vocabulary on torch's threads, right after the kernels' pool, made each sampled
    # token ~5 ms slower (the pool's spinning worker and torch's thread share the cores).
    with torch.inference_mode(), text.ops.step_scope(1):
        step = text.plan_step(torch.tensor([position], device=device), position, None)
        hidden = text.forward(text.embed(torch.tensor([token], device=device)), step, cache)
        next_token = sampler(text.logits(hidden)[0])
    cache.advance(1)
    return next_token, hidden


def check_prompt_fits(num_prompt: int, cache: KVCache) -> None:
    if num_prompt > cache.max_seq_len:
        raise CacheCapacityError(
            f"prompt of {num_prompt} tokens does not fit max_seq_len {cache.max_seq_len}; "
            "load the engine with a larger max_seq_len or shorten the prompt")
