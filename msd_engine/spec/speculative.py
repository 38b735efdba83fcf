"""Speculative decoding: [draft -> verify -> accept -> cache update]* after one prefill.

Lossless: greedy acceptance yields exactly the target's greedy tokens, and recursive rejection
sampling with deterministic drafts yields exactly the target's sampling distribution.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional

import torch

from msd_engine.generation import GenerationStats, StopState, _sync, decode_step
from msd_engine.kv_cache import KVCache
from msd_engine.model.llava import LlavaModel
from msd_engine.sampling import Sampler, probabilities
from msd_engine.spec.accept import accept_greedy, accept_sampling
from msd_engine.spec.drafter import Drafter
from msd_engine.spec.pause import PausePolicy, PauseState, hindsight_rounds
from msd_engine.spec.tree import DraftTree, TreeParams


@dataclass
class SpecStats(GenerationStats):
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    other_ms: float = 0.0
    verify_forwards: int = 0
    accepted_histogram: dict = field(default_factory=dict)  # tokens emitted per verify forward -> count
    tree_nodes: int = 0
    plain_steps: int = 0     # steps taken while speculation paused (`PausePolicy`), one token each
    plain_ms: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # Every token after the prefill's comes from the rounds (drafting, verifying, accepting)
        # or from the plain steps of a pause.
        ms = self.draft_ms + self.verify_ms + self.other_ms + self.plain_ms
        return max(self.new_tokens - 1, 0) / (ms / 1e3) if ms > 0 else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens emitted per verify forward of a draft tree, the bonus token counted (a
        pause's plain steps are not rounds and are not counted)."""
        total = sum(n * c for n, c in self.accepted_histogram.items())
        return total / self.verify_forwards if self.verify_forwards else 0.0

    def to_dict(self) -> dict:
        return {**super().to_dict(), "tau": self.tau,
                "accepted_histogram": {str(k): v for k, v in sorted(self.accepted_histogram.items())}}


class _Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.t = time.perf_counter()

    def lap(self) -> float:
        _sync(self.device)
        now = time.perf_counter()
        ms, self.t = (now - self.t) * 1e3, now
        return ms


def _prefill(model: LlavaModel, cache: KVCache, embeds: torch.Tensor) -> torch.Tensor:
    n = embeds.shape[0]
    device = embeds.device
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril() if n > 1 else None
    hidden = model.text.forward(embeds, model.text.plan_step(torch.arange(n, device=device), 0, causal), cache)
    cache.advance(n)
    return hidden


def _verify(model: LlavaModel, cache: KVCache, tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor]:
    """One target forward over the tree: returns (hidden [T, H], float32 logits [T, V])."""
    text, start = model.text, cache.length
    step = text.plan_step(start + tree.depths, start, tree.mask)
    hidden = text.forward(text.embed(tree.tokens), step, cache)
    return hidden, text.logits(hidden)


def _tree_params_for(params: TreeParams, slots_left: int) -> TreeParams:
    """Shrink the tree near the end of the cache so verification never writes past it."""
    return params if params.total_tokens <= slots_left else replace(params, total_tokens=slots_left)


def speculative_decode(model: LlavaModel, cache: KVCache, drafter: Drafter, input_ids: torch.Tensor,
                       prompt_embeds: torch.Tensor, sampler: Sampler, params: TreeParams, max_new_tokens: int,
                       eos_ids: tuple[int, ...], stats: SpecStats, stop: StopState,
                       pause: Optional[PausePolicy] = None) -> Iterator[int]:
    """Yield new token ids; `pause` (None: never) lets plain steps stand in for rounds that do not pay."""
    device = prompt_embeds.device
    cache.reset()
    drafter.reset()
    stats.prompt_tokens = input_ids.shape[0]
    if max_new_tokens <= 0:
        stop.finish_reason = "length"
        return
    timer = _Timer(device)
    with torch.inference_mode():
        hidden = _prefill(model, cache, prompt_embeds)
        with model.text.ops.step_scope(1):
            root = sampler(model.text.logits(hidden[-1:])[0])
    stats.prefill_ms = stats.vision_ms + timer.lap()
    stats.target_forwards = 1

    with torch.inference_mode():
        drafter.extend(*prompt_draft_inputs(input_ids, prompt_embeds, root, model.config.image_token_id), hidden)
    stats.draft_ms += timer.lap()

    pending = [root]
    pausing = PauseState(pause)
    deferred = _Deferred()  # what plain steps emitted, for the draft to commit before its next round
    while True:
        for token in pending:  # emit, checking every stop rule token by token
            stats.new_tokens += 1
            yield token
            if token in eos_ids:
                stop.finish_reason = "stop"
                return
            if stats.new_tokens >= max_new_tokens:
                stop.finish_reason = "length"
                return
        slots_left = cache.max_seq_len - cache.length
        if slots_left <= 0:
            stop.finish_reason = "length"
            return
        timer.lap()  # the consumer's time between tokens is not ours
        tree_params = _tree_params_for(params, slots_left)
        speculate = pausing.speculate()
        if speculate and deferred.tokens:  # a pause ended: the draft catches up and looks back
            with torch.inference_mode():
                speculate = pausing.review(deferred.commit(drafter, device, tree_params))
            stats.draft_ms += timer.lap()
        if not speculate:
            pending = [_plain_step(model, cache, pending[-1], sampler, deferred)]
            stats.plain_ms += timer.lap()
            stats.plain_steps += 1
            stats.target_forwards += 1
            continue
        pending = _speculate_round(model, cache, drafter, pending[-1], sampler, tree_params, stats, timer)
        pausing.observe(len(pending))


class _Deferred:
    """Tokens emitted by plain steps and the target features they followed, not yet in the draft."""

    def __init__(self):
        self.tokens: list[int] = []
        self.features: list[torch.Tensor] = []

    def add(self, token: int, feature: torch.Tensor) -> None:
        self.tokens.append(token)
        self.features.append(feature)

    def commit(self, drafter: Drafter, device: torch.device, params: TreeParams) -> list[int]:
        """Commit as a round's extend does (the token at each position p + 1 with the target's feature
        at p); returns the tokens per round that rounds of `params` would have emitted over them."""
        guesses = drafter.extend_guessing(torch.tensor(self.tokens, device=device), torch.stack(self.features),
                                          params.top_k)
        rounds = hindsight_rounds(self.tokens, guesses.tolist(), min(params.depth + 1, params.total_tokens - 1))
        self.tokens, self.features = [], []
        return rounds


def _plain_step(model: LlavaModel, cache: KVCache, token: int, sampler: Sampler, deferred: _Deferred) -> int:
    """Plain decoding's step after `token`, its token and feature kept for the draft; returns the token."""
    next_token, hidden = decode_step(model, cache, token, sampler)
    deferred.add(next_token, hidden[-1].clone())  # the step's buffers may be reused
    return next_token


def _speculate_round(model: LlavaModel, cache: KVCache, drafter: Drafter, root: int, sampler: Sampler,
                     params: TreeParams, stats: SpecStats, timer: _Timer) -> list[int]:
    # The round in the backend's scope for its size, acceptance included (see generation.decode).
    # (On the CPU a round of <= 16 tree tokens pins torch to one thread; its inner steps are no
    # larger. A larger tree leaves the scope to each step.)
    with torch.inference_mode(), model.text.ops.step_scope(params.total_tokens):
        tree = drafter.draft(root, params)
        stats.draft_ms += timer.lap()
        hidden, logits = _verify(model, cache, tree)
        stats.verify_ms += timer.lap()
        if sampler.params.greedy:
            accepted, bonus = accept_greedy(tree, logits)
        else:
            accepted, bonus = accept_sampling(tree, probabilities(logits, sampler.params), sampler.generator)
        nodes = torch.tensor(accepted, device=logits.device)
        cache.compact(cache.length, nodes, model.text.ops)
        cache.advance(len(accepted))
        emitted = tree.tokens[nodes[1:]].tolist() + [bonus]
        stats.other_ms += timer.lap()
        device = logits.device
        drafter.extend(torch.tensor(emitted, device=device), None, None, hidden[nodes])  # text tokens
        stats.draft_ms += timer.lap()
    stats.target_forwards += 1
    stats.verify_forwards += 1
    stats.tree_nodes += tree.num_nodes
    stats.accepted_histogram[len(emitted)] = stats.accepted_histogram.get(len(emitted), 0) + 1
    return emitted


def prompt_draft_inputs(input_ids: torch.Tensor, prompt_embeds: torch.Tensor, root: int,
                        image_token_id: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The draft's view of the prompt, shifted by one: (token ids [n], image rows [n, H], is_image [n]).

    Draft position i takes the token at target position i+1 (the root for the last one); where that
    token is an image patch, its row is the patch's projector output (the target's input embedding).
    """
    device = input_ids.device
    next_ids = torch.cat([input_ids[1:], torch.tensor([root], device=device)])
    is_image = torch.zeros_like(next_ids, dtype=torch.bool)
    if image_token_id is not None:
        is_image = next_ids == image_token_id
        is_image[-1] = False  # the root is a sampled text token
    image_rows = torch.cat([prompt_embeds[1:], prompt_embeds[-1:]])  # last row unused (not an image)
    return next_ids, image_rows, is_image
