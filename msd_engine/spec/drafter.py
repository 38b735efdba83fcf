"""Drafters: what proposes a token tree each round. `TreeDrafter` runs the MSD/EAGLE draft head.

The draft sequence is the target sequence shifted by one: draft position i pairs the token at target
position i+1 with the target's feature at position i. `extend` commits new draft positions from
the TARGET's features (so the draft's KV for accepted tokens is always recomputed from them);
`draft` grows an EAGLE-2 tree from the last committed position in scratch KV slots;
`extend_guessing` commits a pause's tokens and returns what the draft would have guessed first for
each (the pause's look-back, `spec.pause.hindsight_rounds`).
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from msd_engine.draft.model import DraftModel
from msd_engine.kv_cache import KVCache
from msd_engine.spec.tree import DraftTree, TreeCandidates, TreeParams, build_tree, expand_topk, select_tree


class Drafter(Protocol):
    def reset(self) -> None:
        """Forget the previous request."""

    def extend(self, token_ids: torch.Tensor, image_embeds: Optional[torch.Tensor], is_image: Optional[torch.Tensor],
               features: torch.Tensor) -> torch.Tensor:
        """Commit m draft positions: token_ids [m] are the tokens at target positions p+1..p+m,
        features [m, H] the target's features at p..p+m-1; where is_image [m], the token is an
        image patch whose projector output is image_embeds [m, H] (is_image None: text tokens only).
        Returns the draft's hidden [m, H]."""

    def draft(self, root_token: int, params: TreeParams) -> DraftTree:
        """Propose a tree rooted at `root_token` (the last emitted token)."""

    def extend_guessing(self, token_ids: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
        """`extend` over text tokens, returning the draft's k best guesses [m, k] (best first) for each
        of them, made from the position before it, as a round's first level makes them."""


class TreeDrafter:
    """EAGLE-2 dynamic-tree drafting with a `DraftModel` over its own static KV cache."""

    def __init__(self, model: DraftModel, max_seq_len: int, params: TreeParams):
        cfg = model.config
        self.model = model
        self.max_seq_len = max_seq_len
        # Committed positions plus scratch for the deepest tree this drafter may grow.
        scratch = params.depth * params.top_k
        self.cache = KVCache(1, cfg.num_kv_heads, max_seq_len + scratch, cfg.head_dim,
                             model.fc_weight.dtype, model.fc_weight.device)
        self.scratch = scratch
        self.last_hidden: Optional[torch.Tensor] = None  # [H] draft output at the last committed position
        # The backend's one-call steps (CPU), or None: then extend / draft run the Python below.
        self.native = model.ops.native_draft_head(model, self.cache)

    def reset(self) -> None:
        self.cache.reset()
        self.last_hidden = None

    def extend(self, token_ids, image_embeds, is_image, features) -> torch.Tensor:
        model = self.model
        m = token_ids.shape[0]
        self.cache.check_fits(m)
        start = self.cache.length
        hidden = None
        if self.native is not None and is_image is None and image_embeds is None:
            hidden = self.native.extend(token_ids, features, start)
        if hidden is None:
            x = model.inputs(token_ids, features, image_embeds, is_image)
            positions = torch.arange(start, start + m, device=x.device)
            causal = torch.ones(m, m, dtype=torch.bool, device=x.device).tril() if m > 1 else None
            hidden = model.forward(x, model.plan_step(positions, start, causal), self.cache)
        self.cache.advance(m)
        self.last_hidden = hidden[-1]
        return hidden

    def extend_guessing(self, token_ids, features, k) -> torch.Tensor:
        assert self.last_hidden is not None, "extend() must run before extend_guessing()"
        before = self.last_hidden  # [H]: the draft's output before token_ids[0]
        hidden = self.extend(token_ids, None, None, features)
        rows = torch.cat([before[None], hidden[:-1]])  # row i precedes token i
        return self.model.top_k(rows, k)[1]

    def draft(self, root_token: int, params: TreeParams) -> DraftTree:
        assert self.last_hidden is not None, "extend() must run before draft()"
        if params.depth * params.top_k > self.scratch:
            raise ValueError(f"tree depth {params.depth} x top_k {params.top_k} exceeds the drafter's scratch "
                             f"of {self.scratch} slots; build the engine with these tree parameters")
        model, k = self.model, params.top_k
        device = self.last_hidden.device
        committed = self.cache.length
        if self.native is not None:
            native = self.native.tree(self.last_hidden, committed, root_token, params)
            if native is not None:
                return build_tree(*native)
        candidates = TreeCandidates()
        scores, tokens = (row[0] for row in model.top_k(self.last_hidden[None], k))
        frontier_ids = torch.arange(candidates.add_level(tokens, scores, torch.full_like(tokens, -1)),
                                    candidates.num_candidates, device=tokens.device)
        parent_hidden = self.last_hidden.expand(tokens.shape[0], -1)
        ancestors = torch.zeros(tokens.shape[0], 0, dtype=torch.bool, device=device)  # over scratch slots
        for level in range(1, params.depth + 1):
            n = tokens.shape[0]
            x = model.inputs(tokens, parent_hidden)
            start = committed + ancestors.shape[1]
            mask = torch.cat([ancestors, torch.eye(n, dtype=torch.bool, device=device)], dim=1)
            positions = torch.full((n,), committed + level - 1, device=device)
            hidden = model.forward(x, model.plan_step(positions, start, mask, prefix_len=committed), self.cache)
            child_logprobs, child_ids = model.top_k(hidden, k)
            child_tokens, child_scores, parent_slot, next_idx = expand_topk(scores, child_logprobs, child_ids)
            first = candidates.add_level(child_tokens, child_scores, frontier_ids[parent_slot])
            chosen_parent = parent_slot[next_idx]
            frontier_ids = first + next_idx
            tokens, scores = child_tokens[next_idx], child_scores[next_idx]
            parent_hidden = hidden[chosen_parent]
            ancestors = mask[chosen_parent]
        return select_tree(root_token, candidates, params.total_tokens)
