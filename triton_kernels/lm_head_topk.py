"""The lm_head fused with log-softmax and top-k: the [T, V] logits never reach global memory.

    logits = hidden @ weight.T          (float32 accumulation, rounded to the dtype as F.linear)
    values, indices = topk(log_softmax(logits.float()), k)        k <= 32

Step 1 (the kernel), grid (V tiles, T blocks): a program computes one [BLOCK_T, BLOCK_V] logits
tile in registers, then writes per row only the tile's max m, its sum of exp(logit - m) and its
k best (logit, vocabulary index) candidates, found by k rounds of argmax-and-mask.
Step 2 (torch, on [T, tiles] and [T, tiles * k]): the exact logsumexp of every row from the
tiles' (m, s) pairs, and the best k of the candidates; a row's global top-k is the union of its
tiles' top-k, so nothing is lost.

Order: values descending, equal values by ascending vocabulary index (tl.argmax keeps the first
maximum within a tile, tiles are laid out in index order and the final sort is stable). torch.topk
does not promise this (on CPU it returns ties in no particular order), so a reference comparison
must allow equal values to swap. NaN logits are not handled.

A draft step has T <= 64 rows and H = 4096, V = 32000: the kernel is bound by reading the weight
(256 MiB in 16 bits) once, each tile of it by one program for all T rows (T > 64 adds row blocks
that re-read it). BLOCK_V = 128 gives 250 programs for V = 32000, about two per H100 SM.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_like, check_tensor, row_stride

MAX_K = 32
BLOCK_T = 64   # rows per program
BLOCK_V = 128  # vocabulary entries per program
BLOCK_K = 64   # hidden columns per step


@triton.jit
def _lm_head_topk_kernel(hidden_ptr, weight_ptr, part_max_ptr, part_sum_ptr, cand_val_ptr,
                         cand_idx_ptr, num_rows, vocab, dim, hidden_stride, weight_stride,
                         num_tiles, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_rows
    vocab_ids = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    vocab_ok = vocab_ids < vocab
    hidden_rows = hidden_ptr + rows.to(tl.int64)[:, None] * hidden_stride  # [T, 1]
    weight_rows = weight_ptr + vocab_ids.to(tl.int64)[:, None] * weight_stride  # [V, 1]

    acc = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < dim
        x = tl.load(hidden_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(weight_rows + cols[None, :], mask=vocab_ok[:, None] & col_ok[None, :],
                    other=0.0)  # [V, K]
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    # Rounded like F.linear's output in the dtype, so the ranking is the reference's.
    logits = acc.to(hidden_ptr.dtype.element_ty).to(tl.float32)
    logits = tl.where(vocab_ok[None, :], logits, float("-inf"))

    tile_max = tl.max(logits, axis=1)  # [T]; finite: every tile has a valid column
    tile_sum = tl.sum(tl.exp(logits - tile_max[:, None]), axis=1)
    part = rows.to(tl.int64) * num_tiles + tile
    tl.store(part_max_ptr + part, tile_max, mask=row_ok)
    tl.store(part_sum_ptr + part, tile_sum, mask=row_ok)

    cand = rows.to(tl.int64) * (num_tiles * K) + tile * K
    for i in range(K):
        best = tl.argmax(logits, axis=1, tie_break_left=True)  # [T]: first of equal maxima
        taken = tl.arange(0, BLOCK_V)[None, :] == best[:, None]
        value = tl.max(logits, axis=1)
        # Past a tail tile's valid columns the candidate is -inf, never among the final k.
        tl.store(cand_val_ptr + cand + i, value, mask=row_ok)
        tl.store(cand_idx_ptr + cand + i, tile * BLOCK_V + best, mask=row_ok)
        logits = tl.where(taken, float("-inf"), logits)


def _check_args(hidden: torch.Tensor, weight: torch.Tensor, k, block_v) -> None:
    check_tensor(hidden, "hidden", _lm_head_topk_kernel)
    check_like(weight, "weight", hidden, "hidden")
    if hidden.dim() != 2:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}; expected [T, H]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected [V, "
                         f"{hidden.shape[1]}] with V >= 1 (H from hidden)")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.stride(1) != 1 and t.shape[1] > 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides "
                             f"{t.stride()}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= min(MAX_K, weight.shape[0]):
        raise ValueError(f"k is {k}; expected 1 <= k <= min({MAX_K}, V = {weight.shape[0]})")
    power_of_two = (isinstance(block_v, int) and not isinstance(block_v, bool)
                    and block_v >= 16 and not block_v & (block_v - 1))
    if not power_of_two:
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v!r}")


def logsoftmax_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, *,
                    block_v: int = BLOCK_V) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of log_softmax(hidden @ weight.T) per row: (values [T, k] float32,
    descending; indices [T, k] int64, equal values by ascending index).

    hidden [T, H], weight [V, H] (the lm_head), one dtype, row strides free; 1 <= k <= 32, k <= V.
    `block_v` (a power of two >= 16) sets the vocabulary tile; tests vary it, callers need not.
    """
    _check_args(hidden, weight, k, block_v)
    t, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    if t == 0:
        return (torch.empty(0, k, dtype=torch.float32, device=device),
                torch.empty(0, k, dtype=torch.int64, device=device))
    block_t = min(BLOCK_T, max(16, triton.next_power_of_2(t)))
    block_v = min(block_v, max(16, triton.next_power_of_2(vocab)))
    tiles = triton.cdiv(vocab, block_v)
    part_max = torch.empty(t, tiles, dtype=torch.float32, device=device)
    part_sum = torch.empty(t, tiles, dtype=torch.float32, device=device)
    cand_val = torch.empty(t, tiles * k, dtype=torch.float32, device=device)
    cand_idx = torch.empty(t, tiles * k, dtype=torch.int32, device=device)
    _lm_head_topk_kernel[(tiles, triton.cdiv(t, block_t))](
        hidden, weight, part_max, part_sum, cand_val, cand_idx, t, vocab, dim,
        row_stride(hidden), row_stride(weight), tiles,
        K=k, BLOCK_T=block_t, BLOCK_V=block_v,
        BLOCK_K=min(BLOCK_K, max(16, triton.next_power_of_2(dim))), num_warps=4, num_stages=3)
    return _combine(part_max, part_sum, cand_val, cand_idx, k)


def _combine(part_max: torch.Tensor, part_sum: torch.Tensor, cand_val: torch.Tensor,
             cand_idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: logsumexp from the tiles' (max, sum-exp), the best k of the tiles' candidates."""
    row_max = part_max.max(dim=1, keepdim=True).values  # [T, 1]
    log_sum = torch.log((part_sum * torch.exp(part_max - row_max)).sum(dim=1, keepdim=True))
    # Stable: equal values keep the candidates' order, which is ascending vocabulary index.
    best, order = torch.sort(cand_val, dim=1, descending=True, stable=True)
    values = (best[:, :k] - row_max) - log_sum  # as torch.log_softmax: x - max - log(sum)
    return values, cand_idx.gather(1, order[:, :k]).to(torch.int64)


def logsoftmax_topk_ref(hidden: torch.Tensor, weight: torch.Tensor,
                        k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, as `TorchOps.logsoftmax_topk` (ties in torch.topk's order)."""
    logits = torch.nn.functional.linear(hidden, weight).float()
    return torch.topk(torch.log_softmax(logits, dim=-1), k, dim=-1)
