"""EAGLE-2 dynamic draft tree: frontier expansion, node selection and the tree's plan tensors.

Model-free. The drafting loop (`spec.drafter.TreeDrafter.draft`) takes the root's top-k, then
`expand_topk`s the frontier `depth` times, feeding every level to a `TreeCandidates`; `select_tree`
then keeps the root plus the best `total_tokens - 1` candidates and builds what verification needs
(mask, depths, paths). `root_level` and `expand_frontier` are the same steps from full log-prob rows.
A backend's one-call drafting step returns the kept nodes' tokens and parents for `build_tree`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Union

import torch
from torch import Tensor


@dataclass(frozen=True)
class TreeParams:
    """EAGLE-2 tree shape: `top_k` children per frontier node, `depth` expansions after level 0,
    `total_tokens` tree nodes including the root."""

    top_k: int = 10
    depth: int = 5
    total_tokens: int = 60

    def __post_init__(self) -> None:
        for name in ("top_k", "depth", "total_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"TreeParams.{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"TreeParams.{name} must be >= 1, got {value}")
        if self.total_tokens > self.max_nodes:
            raise ValueError(
                f"TreeParams.total_tokens={self.total_tokens} exceeds the {self.max_nodes} nodes that "
                f"top_k={self.top_k}, depth={self.depth} can draft (1 + top_k + depth * top_k**2)")

    @property
    def max_nodes(self) -> int:
        """Root + level 0 (top_k) + depth levels of top_k * top_k candidates each."""
        return 1 + self.top_k + self.depth * self.top_k * self.top_k


@dataclass(frozen=True)
class DraftTree:
    """A draft tree in plan form. Node 0 is the root (the last sampled token, already emitted);
    the other nodes follow in creation order, so every parent index is below its child's."""

    tokens: Tensor   # [T] int64
    parents: Tensor  # [T] int64, -1 for the root
    depths: Tensor   # [T] int64, root 0; the node's position offset after the prefix
    mask: Tensor     # [T, T] bool, row i: ancestors of i and i itself
    paths: Tensor    # [P, max_depth + 1] int64 root-to-leaf node indices, -1 padded on the right

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[0]

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """children[i] = node indices whose parent is i, in creation order (host-side lists)."""
        kids: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for node, parent in enumerate(self.parents.tolist()[1:], start=1):
            kids[parent].append(node)
        return tuple(tuple(k) for k in kids)


class TreeCandidates:
    """Every node drafted this step, level by level, in creation order (candidate ids 0..N-1)."""

    def __init__(self) -> None:
        self._tokens: list[Tensor] = []
        self._scores: list[Tensor] = []
        self._parents: list[Tensor] = []
        self.num_candidates = 0

    @property
    def num_levels(self) -> int:
        return len(self._tokens)

    @property
    def device(self) -> torch.device:
        """Where the candidates live (the CPU before the first level)."""
        return self._tokens[0].device if self._tokens else torch.device("cpu")

    def add_level(self, tokens: Tensor, scores: Tensor, parents: Tensor) -> int:
        """Append one level: tokens [n] int64, scores [n] cumulative log-probs, parents [n]
        (candidate ids from earlier levels, -1 = child of the root). Returns the id of the first
        added candidate, so the caller can name this level's nodes as parents of the next.
        Parent ids are checked by `select_tree` (once per step, not once per level)."""
        n = tokens.shape[0]
        for name, t in (("tokens", tokens), ("scores", scores), ("parents", parents)):
            if t.dim() != 1 or t.shape[0] != n:
                raise ValueError(f"add_level: {name} must have shape [{n}], got {tuple(t.shape)}")
        if tokens.dtype != torch.int64 or parents.dtype != torch.int64:
            raise TypeError(f"add_level: tokens/parents must be int64, got {tokens.dtype}/{parents.dtype}")
        if not scores.is_floating_point():
            raise TypeError(f"add_level: scores must be floating point, got {scores.dtype}")
        self._tokens.append(tokens)
        self._scores.append(scores.float())
        self._parents.append(parents)
        first = self.num_candidates
        self.num_candidates += n
        return first

    def lists(self) -> tuple[list[int], list[float], list[int]]:
        """(tokens, scores, parents) of all candidates as host lists (scores: the float32 values).
        ValueError unless every parent id is -1 or names a candidate of an earlier level."""
        tokens: list[int] = []
        scores: list[float] = []
        parents: list[int] = []
        for level_tokens, level_scores, level_parents in zip(self._tokens, self._scores, self._parents):
            first = len(parents)
            level = level_parents.tolist()
            for j, parent in enumerate(level):
                if not -1 <= parent < first:
                    raise ValueError(f"TreeCandidates: candidate {first + j} has parent {parent}, not -1 "
                                     f"and not from an earlier level (its level starts at {first})")
            tokens += level_tokens.tolist()
            scores += level_scores.tolist()
            parents += level
        return tokens, scores, parents


def root_level(root_logprobs: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Level 0: the draft's log-probs at the last position [V] -> (tokens [k], scores [k])."""
    if root_logprobs.dim() != 1:
        raise ValueError(f"root_logprobs must be [V], got {tuple(root_logprobs.shape)}")
    if not 1 <= top_k <= root_logprobs.shape[0]:
        raise ValueError(f"top_k must be in [1, V={root_logprobs.shape[0]}], got {top_k}")
    scores, tokens = torch.topk(root_logprobs, top_k)
    return tokens, scores.float()


def expand_frontier(frontier_scores: Tensor, child_logprobs: Tensor,
                    top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One EAGLE-2 expansion of n frontier nodes.

    frontier_scores [n] (cumulative log-probs), child_logprobs [n, V] (the draft's log-probs at
    each frontier node) -> child_tokens [n*k], child_scores [n*k], child_parent_slot [n*k]
    (which frontier node, 0..n-1), next_frontier_idx [min(k, n*k)] (indices into the n*k
    children, best first; ties go to the earlier child so the choice is deterministic).
    """
    n = frontier_scores.shape[0]
    if frontier_scores.dim() != 1 or child_logprobs.dim() != 2 or child_logprobs.shape[0] != n:
        raise ValueError(f"expand_frontier: want frontier_scores [n] and child_logprobs [n, V], got "
                         f"{tuple(frontier_scores.shape)} and {tuple(child_logprobs.shape)}")
    if not 1 <= top_k <= child_logprobs.shape[1]:
        raise ValueError(f"top_k must be in [1, V={child_logprobs.shape[1]}], got {top_k}")
    logprobs, tokens = torch.topk(child_logprobs, top_k, dim=-1)             # [n, k]
    return expand_topk(frontier_scores, logprobs, tokens)


def expand_topk(frontier_scores: Tensor, child_logprobs: Tensor,
                child_tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`expand_frontier` from each frontier node's top-k children already chosen (by a fused
    lm_head + log-softmax + top-k): child_logprobs, child_tokens [n, k], each row best first."""
    n, top_k = child_tokens.shape
    if frontier_scores.shape != (n,) or child_logprobs.shape != child_tokens.shape:
        raise ValueError(f"expand_topk: want frontier_scores [n], child_logprobs and child_tokens [n, k], got "
                         f"{tuple(frontier_scores.shape)}, {tuple(child_logprobs.shape)}, {tuple(child_tokens.shape)}")
    scores = frontier_scores.float()[:, None] + child_logprobs.float()      # [n, k]
    slot = torch.arange(n, device=child_tokens.device)[:, None].expand(n, top_k).reshape(-1)  # [n*k]
    scores = scores.reshape(-1)
    order = torch.sort(scores, descending=True, stable=True).indices        # [n*k]
    return child_tokens.reshape(-1), scores, slot, order[:top_k]


def select_tree(root_token: int, candidates: TreeCandidates, total_tokens: int) -> DraftTree:
    """The root + the best `total_tokens - 1` candidates by score (ties: earlier created first;
    NaN ranks first, as in torch.sort), kept in creation order.

    A child's score is its parent's plus a log-prob <= 0 and a parent is created first, so the
    stable ranking never keeps a child without its parent, unless scores are NaN (a broken draft):
    then ValueError, as the CPU's native drafting step reports it.

    The selection runs on host lists: a step's few dozen candidates cost one list conversion per
    level here, where tensor ops cost a dispatch each (CPU draft loop, bfloat16 draft, tree
    (4,1,6): draft() 1361 -> 1223 us).
    """
    if total_tokens < 1:
        raise ValueError(f"total_tokens must be >= 1, got {total_tokens}")
    tokens, scores, parents = candidates.lists()
    n_keep = min(total_tokens - 1, len(scores))
    # Descending and stable: sorted() keeps equal keys in creation order.
    ranked = sorted(range(len(scores)), key=lambda c: -scores[c] if scores[c] == scores[c] else -math.inf)
    keep = sorted(ranked[:n_keep])
    node_of = {c: i for i, c in enumerate(keep, start=1)}
    node_of[-1] = 0                                        # candidate parent -1 -> the root
    node_parents = [-1]
    for c in keep:
        parent = node_of.get(parents[c])
        if parent is None:
            raise ValueError(f"select_tree: candidate {c} was kept without its parent {parents[c]} "
                               f"(scores {scores[c]} and {scores[parents[c]]}; a child must not outscore it)")
        node_parents.append(parent)
    device = candidates.device
    node_tokens = torch.tensor([root_token] + [tokens[c] for c in keep], dtype=torch.int64, device=device)
    return _build(node_tokens, node_parents)


def build_tree(tokens: Tensor, parents: Union[Tensor, list[int]]) -> DraftTree:
    """A DraftTree from tokens [T] and parents [T] (a tensor or a host list; parents[0] = -1,
    0 <= parents[i] < i)."""
    host = parents.tolist() if isinstance(parents, Tensor) else list(parents)
    if tokens.dim() != 1 or len(host) != tokens.shape[0] or tokens.shape[0] < 1:
        raise ValueError(f"build_tree: want tokens [T] and parents [T], T >= 1, got "
                         f"{tuple(tokens.shape)} and {len(host)} parents")
    if host[0] != -1 or not all(0 <= p < i for i, p in enumerate(host[1:], start=1)):
        raise ValueError(f"build_tree: parents must be -1 for node 0 and in [0, i) for node i, got {host}")
    return _build(tokens.long(), host)


def _build(tokens: Tensor, parents: list[int]) -> DraftTree:
    """Plan tensors (on tokens' device) of the tree whose node i has parent parents[i] < i."""
    T = len(parents)
    device = tokens.device
    chains: list[list[int]] = []      # chains[i]: root-to-i node indices
    mask_index: list[int] = []        # flat [T, T] positions of (node, ancestor-or-self)
    for i, parent in enumerate(parents):
        chain = chains[parent] + [i] if i else [0]
        chains.append(chain)
        mask_index += [i * T + a for a in chain]
    has_child = set(parents[1:])
    leaves = [i for i in range(T) if i not in has_child]
    width = max(len(c) for c in chains)
    mask = torch.zeros(T * T, dtype=torch.bool, device=device)
    mask[torch.tensor(mask_index, device=device)] = True
    paths = [chains[leaf] + [-1] * (width - len(chains[leaf])) for leaf in leaves]
    return DraftTree(tokens=tokens,
                     parents=torch.tensor(parents, dtype=torch.int64, device=device),
                     depths=torch.tensor([len(c) - 1 for c in chains], dtype=torch.int64, device=device),
                     mask=mask.view(T, T),
                     paths=torch.tensor(paths, dtype=torch.int64, device=device))
