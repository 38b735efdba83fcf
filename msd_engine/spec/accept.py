"""Acceptance of a verified draft tree: greedy matching and recursive rejection sampling.

Both walk the tree from the root (already emitted) and return the accepted node indices, root
first, plus the one token the target contributes after them (bonus or residual sample). Tokens
emitted this step = tree.tokens[accepted[1:]] followed by that token.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from msd_engine.sampling import argmax_rows, sample_index
from msd_engine.spec.tree import DraftTree

# coin(prob) -> True with probability prob (a 0-d float tensor); draw(p) -> a token ~ p [V].
Coin = Callable[[Tensor], bool]
Draw = Callable[[Tensor], int]


def _check_rows(tree: DraftTree, target: Tensor, name: str) -> None:
    if target.dim() != 2 or target.shape[0] != tree.num_nodes:
        raise ValueError(f"{name} must be [T={tree.num_nodes}, V], got {tuple(target.shape)}")


def accept_greedy(tree: DraftTree, target_logits: Tensor) -> tuple[list[int], int]:
    """Longest root path whose tokens equal the target's argmax at their parent.

    target_logits [T, V]: the target's logits at each tree node. Siblings hold distinct tokens
    (they are a top-k), so at most one child can match and the walk is the longest matching
    path prefix. Returns (accepted nodes starting with 0, argmax at the last accepted node).
    """
    _check_rows(tree, target_logits, "target_logits")
    best = argmax_rows(target_logits)  # [T]; first maximum, as greedy decoding
    tokens = tree.tokens.tolist()
    node, accepted = 0, [0]
    while True:
        match = next((c for c in tree.children[node] if tokens[c] == best[node]), None)
        if match is None:
            return accepted, best[node]
        node = match
        accepted.append(node)


def accept_sampling(tree: DraftTree, target_probs: Tensor,
                    generator: torch.Generator) -> tuple[list[int], int]:
    """Recursive rejection sampling with deterministic drafts (q = 1 on each drafted child).

    target_probs [T, V] float32: the target's sampling distribution at each node (temperature /
    top-p already applied, rows sum to 1), on the generator's device. Emitted tokens follow the
    target's distribution exactly. Returns (accepted nodes starting with 0, next token).
    """
    _check_rows(tree, target_probs, "target_probs")
    if target_probs.device != generator.device:
        raise ValueError(f"generator is on {generator.device}, target_probs on {target_probs.device}")

    def coin(prob: Tensor) -> bool:
        u = torch.rand((), generator=generator, device=generator.device)
        return bool(u < prob)

    def draw(p: Tensor) -> int:
        return sample_index(p, generator)

    return accept_sampling_with(tree, target_probs, coin, draw)


def accept_sampling_with(tree: DraftTree, target_probs: Tensor, coin: Coin,
                         draw: Draw) -> tuple[list[int], int]:
    """`accept_sampling` with its randomness passed in, so tests can enumerate every outcome."""
    _check_rows(tree, target_probs, "target_probs")
    tokens = tree.tokens.tolist()
    node, accepted = 0, [0]
    while True:
        if not tree.children[node]:
            return accepted, draw(target_probs[node])
        child, residual = _try_children(tree.children[node], tokens, target_probs[node], coin)
        if child is None:
            return accepted, draw(residual)
        node = child
        accepted.append(node)


def _try_children(children: tuple[int, ...], tokens: list[int], probs: Tensor,
                  coin: Coin) -> tuple[int | None, Tensor]:
    """Offer each distinct child token x to p in creation order: accept with p(x), else p(x) = 0
    and renormalise. Returns (accepted child or None, the residual p [V] after the rejections)."""
    p = probs.clone()                      # [V]
    tried: set[int] = set()
    for child in children:
        x = tokens[child]
        if x in tried:                     # a duplicate token has p(x) = 0 by now
            continue
        tried.add(x)
        if coin(p[x]):
            return child, p
        p[x] = 0.0
        total = p.sum()
        assert bool(total > 0), "residual distribution is empty: target row was degenerate"
        p /= total
    return None, p
