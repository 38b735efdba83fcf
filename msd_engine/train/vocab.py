"""The reduced draft vocabulary: the target tokens the draft is trained (and allowed) to propose.

Which tokens the draft must predict follows the loss alignment (`losses.py`): draft prediction i is
weighted by `loss_mask[i+1]` and its soft target is the target's next-token distribution at target
position i+1, whose realised token is the one at target position i+2, i.e. `token_ids[i+1]` (the
records shift tokens by one, see `records.py`). So the counted tokens are `token_ids[j]` for every
j >= 1 with `loss_mask[j] > 0`: the token the target emits after each assistant token (for the last
position, the target's own greedy choice recorded in the record).
"""
from __future__ import annotations

from typing import Iterable, Optional, Protocol, Sequence

import torch


class HasTargets(Protocol):
    token_ids: torch.Tensor  # [N] long, the record convention (records.py)
    loss_mask: torch.Tensor  # [N]


def draft_targets(token_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The tokens the loss asks the draft to predict in one record: token_ids[j], j >= 1, mask[j] > 0."""
    if token_ids.dim() != 1 or loss_mask.shape != token_ids.shape:
        raise ValueError(f"token_ids [N] and loss_mask [N] expected, got {list(token_ids.shape)} and "
                         f"{list(loss_mask.shape)}")
    return token_ids[1:][loss_mask[1:] > 0]


def count_targets(records: Iterable[HasTargets], vocab_size: Optional[int] = None) -> torch.Tensor:
    """[vocab_size] int64: how often each token is a draft target over all records (vocab_size None:
    up to the largest target id)."""
    counts = torch.zeros(vocab_size or 0, dtype=torch.int64)
    for n, r in enumerate(records):
        targets = draft_targets(r.token_ids, r.loss_mask).long()
        if not targets.numel():
            continue
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or (vocab_size is not None and high >= vocab_size):
            bad = low if low < 0 else high
            raise ValueError(f"record {n}: target token {bad} outside the vocabulary of {vocab_size}")
        found = torch.bincount(targets, minlength=counts.shape[0])
        if found.shape[0] > counts.shape[0]:
            counts = torch.cat([counts, counts.new_zeros(found.shape[0] - counts.shape[0])])
        counts += found
    return counts


def top_tokens(counts: torch.Tensor, size: int, always: Sequence[int] = ()) -> torch.Tensor:
    """The `size` most counted ids (ties: lower id first), `always` included, sorted ascending."""
    n = counts.shape[0]
    if not 1 <= size <= n:
        raise ValueError(f"draft vocabulary size {size} outside 1..{n} (the vocabulary)")
    forced = sorted({int(t) for t in always})
    if forced and not (0 <= forced[0] and forced[-1] < n):
        raise ValueError(f"always-included tokens {forced} outside the vocabulary of {n}")
    if len(forced) > size:
        raise ValueError(f"draft vocabulary size {size} cannot hold the {len(forced)} always-included tokens {forced}")
    key = counts.to(torch.float64).clone()
    key[forced] = float("inf")  # forced ids rank first, whatever their counts
    # a stable descending sort keeps equal counts in ascending id order
    order = torch.sort(key, descending=True, stable=True).indices
    return order[:size].sort().values.to(torch.int64)


def frequent_tokens(records: Iterable[HasTargets], size: int, always: Sequence[int] = (),
                    vocab_size: Optional[int] = None) -> torch.Tensor:
    """[size] int64, sorted: the draft vocabulary of `size` ids for training on `records`: the most
    frequent draft targets (ties by lower id, unseen ids last), always including `always` (the EOS
    ids). vocab_size: the target's vocabulary; None counts up to the largest target or `always` id,
    so `size` can be at most that id + 1."""
    if size < 1 or (vocab_size is not None and size > vocab_size):
        # checked before the (possibly long) counting pass
        raise ValueError(f"draft vocabulary size {size} outside 1..{vocab_size or 'the vocabulary size'}")
    counts = count_targets(records, vocab_size)
    top = max([int(t) + 1 for t in always] + [counts.shape[0]])
    if vocab_size is None and top > counts.shape[0]:
        counts = torch.cat([counts, counts.new_zeros(top - counts.shape[0])])
    if size > counts.shape[0]:
        raise ValueError(f"draft vocabulary size {size} exceeds the {counts.shape[0]} ids up to the largest "
                         "counted token; pass vocab_size to fill it with unseen ids")
    return top_tokens(counts, size, always)


def check_draft_vocab(vocab: torch.Tensor, size: int, vocab_size: int, source: str) -> None:
    """A draft vocabulary is an int64 [size] tensor of strictly ascending ids in 0..vocab_size-1."""
    if vocab.dtype != torch.int64 or vocab.shape != (size,):
        raise ValueError(f"{source}: draft vocabulary must be int64 [{size}], got {vocab.dtype} {list(vocab.shape)}")
    if size and (int(vocab.min()) < 0 or int(vocab.max()) >= vocab_size):
        raise ValueError(f"{source}: draft vocabulary ids outside 0..{vocab_size - 1}")
    if size > 1 and not bool((vocab[1:] > vocab[:-1]).all()):
        raise ValueError(f"{source}: draft vocabulary ids must be sorted ascending and unique")
