"""Cache compaction after acceptance: slot start + nodes[j] -> start + j, every layer, K and V.

`arena [2, L, Hkv, S, D]` is the KV cache's single allocation; one launch moves the accepted tree
entries of all 2 * L * Hkv (kv, layer, head) rows, one program per row.

In place, and safe because `nodes` is strictly ascending, so nodes[j] >= j: the entries are
moved in chunks of BLOCK_M destinations in increasing j. A chunk reads all its sources into
registers, then a barrier, then writes. A write of chunk c goes to slots [c * BLOCK_M,
(c + 1) * BLOCK_M); every source of a later chunk is nodes[j] >= j >= (c + 1) * BLOCK_M, so no
write can clobber a source not yet read, and within a chunk the barrier orders every thread's
reads before any thread's writes (a destination j of a chunk may be the source of an earlier j).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_tensor

BLOCK_M = 64  # destination slots per chunk
MAX_HEAD_DIM = 1024


@triton.jit
def _kv_compact_kernel(arena_ptr, nodes_ptr, start, num_nodes, head_dim, kv_stride, layer_stride,
                       head_stride, slot_stride, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    base = (arena_ptr + tl.program_id(2).to(tl.int64) * kv_stride
            + tl.program_id(1).to(tl.int64) * layer_stride
            + tl.program_id(0).to(tl.int64) * head_stride)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < head_dim
    for first in range(0, num_nodes, BLOCK_M):
        dst = first + tl.arange(0, BLOCK_M)
        ok = dst < num_nodes
        src = tl.load(nodes_ptr + dst, mask=ok, other=0)  # int64
        mask = ok[:, None] & col_ok[None, :]
        rows = tl.load(base + (start + src)[:, None] * slot_stride + cols[None, :], mask=mask)
        tl.debug_barrier()  # every read of this chunk before any write (see the module docstring)
        tl.store(base + (start + dst.to(tl.int64))[:, None] * slot_stride + cols[None, :], rows,
                 mask=mask)


def kv_compact(arena: torch.Tensor, start: int, nodes: torch.Tensor) -> None:
    """In place: arena[:, :, :, start + j] = arena[:, :, :, start + nodes[j]] for every j.

    nodes: int64 [m], strictly ascending, start + nodes[-1] < S. Not checked here: that would
    need the values on the host (a device sync, and no CUDA-graph capture).
    """
    check_tensor(arena, "arena", _kv_compact_kernel)
    if arena.dim() != 5 or arena.shape[0] != 2:
        raise ValueError(f"arena has shape {tuple(arena.shape)}; expected [2, L, Hkv, S, D]")
    head_dim = arena.shape[4]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"arena has head dim {head_dim}; this kernel handles at most "
                         f"{MAX_HEAD_DIM}")
    if arena.stride(4) != 1 and head_dim > 1:
        raise ValueError(f"arena must be contiguous in its last dim, got strides {arena.stride()}")
    if not isinstance(nodes, torch.Tensor) or nodes.dtype != torch.int64 or nodes.dim() != 1:
        raise TypeError(f"nodes must be a 1-D int64 tensor, got "
                        f"{getattr(nodes, 'dtype', type(nodes).__name__)} "
                        f"{tuple(getattr(nodes, 'shape', ()))}")
    if nodes.device != arena.device:
        raise ValueError(f"nodes is on {nodes.device} but arena is on {arena.device}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    num_nodes = nodes.shape[0]
    if start + num_nodes > arena.shape[3]:
        raise ValueError(f"start {start} + {num_nodes} nodes exceeds the arena's "
                         f"{arena.shape[3]} slots")
    if num_nodes == 0 or arena.numel() == 0:
        return
    nodes = nodes.contiguous()
    grid = (arena.shape[2], arena.shape[1], 2)  # (head, layer, kv)
    _kv_compact_kernel[grid](
        arena, nodes, start, num_nodes, head_dim, arena.stride(0), arena.stride(1),
        arena.stride(2), arena.stride(3), BLOCK_M=min(BLOCK_M, triton.next_power_of_2(num_nodes)),
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4, num_stages=1)


def kv_compact_ref(arena: torch.Tensor, start: int, nodes: torch.Tensor) -> None:
    """In place, plain torch (the gather copies before the write, so any `nodes` is fine)."""
    m = nodes.shape[0]
    arena[:, :, :, start:start + m] = arena[:, :, :, start + nodes]
