"""The static KV cache: one arena allocated at load, per-layer views, slots addressed by position.

Nothing here allocates per step. A step writes its T new entries into slots
[start, start + T) and attends to slots [0, start + T); the caller guarantees the bound,
and `check_fits` turns a would-be overflow into a clear error before any write.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import numpy as np
import torch


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [T, R] -> int32 [T, ceil(R / 32)]: bit j % 32 of word j // 32 is mask[:, j] (the kernels' format)."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a 2-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    t, r = mask.shape
    words = (r + 31) // 32
    if mask.device.type == "cpu" and sys.byteorder == "little":
        # Packed by numpy (~5 us; the torch ops below take ~70 us, and a CPU step packs a mask per
        # draft level and per verification): bytes in bit order make little-endian int32 words.
        packed = np.zeros((t, words * 4), dtype=np.uint8)
        packed[:, :(r + 7) // 8] = np.packbits(mask.numpy(), axis=1, bitorder="little")
        return torch.from_numpy(packed.view(np.int32))
    return _pack_mask_torch(mask, words)


def _pack_mask_torch(mask: torch.Tensor, words: int) -> torch.Tensor:
    """pack_mask in torch ops, on any device."""
    t, r = mask.shape
    padded = torch.zeros(t, words * 32, dtype=torch.int64, device=mask.device)
    padded[:, :r] = mask
    weights = torch.ones(32, dtype=torch.int64, device=mask.device) << torch.arange(32, device=mask.device)
    packed = (padded.view(t, words, 32) * weights).sum(-1)  # [T, W] in [0, 2**32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


class CacheCapacityError(ValueError):
    """A request or step needs more cache slots than the arena has."""


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        # [2 (k, v), layers, Hkv, S, D]: one allocation; per-layer views below.
        self.arena = torch.zeros(2, num_layers, num_kv_heads, max_seq_len, head_dim, dtype=dtype, device=device)
        self.keys = list(self.arena[0].unbind(0))    # each [Hkv, S, D]
        self.values = list(self.arena[1].unbind(0))
        self.length = 0  # slots [0, length) hold the committed sequence

    @property
    def nbytes(self) -> int:
        return self.arena.numel() * self.arena.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]

    def check_fits(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_seq_len:
            raise CacheCapacityError(
                f"KV cache full: {self.length} slots used + {new_tokens} new > max_seq_len {self.max_seq_len}")

    def reset(self) -> None:
        self.length = 0

    def compact(self, start: int, nodes: torch.Tensor, ops=None) -> None:
        """Make the accepted tree nodes contiguous: slot start + nodes[j] -> start + j, all layers.

        After verification `nodes` are the accepted nodes (ascending, node 0 = the root); rejected
        entries are left behind. One launch for every layer (`ops.kv_compact`; torch by default).
        """
        assert start + int(nodes.shape[0]) <= self.max_seq_len
        if ops is None:
            from msd_engine.ops.torch_ops import TorchOps
            ops = TorchOps()
        ops.kv_compact(self.arena, start, nodes)

    def advance(self, new_tokens: int) -> None:
        self.check_fits(new_tokens)
        self.length += new_tokens


@dataclass(frozen=True)
class StepState:
    """What every layer of one forward step needs, built once per step (plan), used by all (run).

    The step writes its T new entries into cache slots [start, start + T) and attends to slots
    [0, start + T): slots [0, prefix_len) are fully visible; the rest (earlier scratch entries of a
    draft tree, then the T new entries) are visible through `mask`.

    positions: [T] RoPE positions of the new tokens (a tree node's = prefix position + depth).
    mask: [T, start + T - prefix_len] bool, True = visible; None means all visible.
    cos/sin: [T, D] rotary tables gathered at `positions`.
    """

    positions: torch.Tensor
    start: int
    prefix_len: int
    mask: Optional[torch.Tensor]
    cos: torch.Tensor
    sin: torch.Tensor

    def __post_init__(self) -> None:
        assert 0 <= self.prefix_len <= self.start
        if self.mask is not None:
            assert tuple(self.mask.shape) == (self.num_tokens, self.start + self.num_tokens - self.prefix_len), \
                (tuple(self.mask.shape), self.num_tokens, self.start, self.prefix_len)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def region(self) -> int:
        """Slots after the fully visible prefix that the step attends to through the mask."""
        return self.start + self.num_tokens - self.prefix_len

    @cached_property
    def mask_bits(self) -> Optional[torch.Tensor]:
        """The mask bit-packed for the kernels: int32 [T, ceil(region / 32)], bit j%32 of word j//32.

        Packed once per step (on first use) and shared by every layer.
        """
        return None if self.mask is None else pack_mask(self.mask)
