"""The draft head's fused input: fc(cat(embedding or image row, target feature)) + bias, per row.

    x_t   = image_rows[t] if is_image[t] (embed[0] when image_rows is None), else embed[token_t]
    out_t = fc_weight[:, :H] @ x_t + fc_weight[:, H:] @ features[t] + fc_bias
    bypass (MSD): rows where is_image take x_t itself, no fc.
This is `DraftModel.fuse` applied to the embedding gather of `TreeDrafter.extend`, without
materialising the [T, 2H] concatenation: the kernel walks the first H input columns through the
gathered rows and the last H through the features.

A draft step has T <= 64 rows (k frontier nodes), so it is bound by reading fc_weight [H, 2H]
(64 MiB for H = 4096 in float16): a program owns BLOCK_N output features for a block of up to 64
rows, so each weight tile is read once for all of them. BLOCK_N = 32 gives 128 programs at
H = 4096, about one per H100 SM. Longer inputs (the prompt's extend) add a grid dim over row
blocks and become compute bound. float32 accumulation, bias added in float32, one rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._checks import check_like, check_tensor, row_stride

BLOCK_T = 64   # rows per program
BLOCK_N = 32   # output features per program
BLOCK_K = 128  # input columns per step


@triton.jit
def _draft_fc_kernel(token_ptr, embed_ptr, feature_ptr, image_ptr, is_image_ptr, weight_ptr,
                     bias_ptr, out_ptr, num_rows, hidden, embed_stride, feature_stride,
                     image_stride, weight_stride, out_stride, HAS_FLAGS: tl.constexpr,
                     HAS_IMAGE_ROWS: tl.constexpr, BYPASS: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_rows
    token = tl.load(token_ptr + rows, mask=row_ok, other=0)
    if HAS_FLAGS:
        image = tl.load(is_image_ptr + rows, mask=row_ok, other=0) != 0
        token = tl.where(image, 0, token)  # as extend(): an image row gathers embed[0]
    else:
        image = rows < 0
    if HAS_IMAGE_ROWS:
        from_image = image & row_ok
    else:
        from_image = rows < 0
    from_embed = row_ok & ~from_image
    embed_rows = embed_ptr + token.to(tl.int64) * embed_stride  # [T] row pointers
    image_rows = image_ptr + rows.to(tl.int64) * image_stride
    feature_rows = feature_ptr + rows.to(tl.int64) * feature_stride
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < hidden
    weight_rows = weight_ptr + n.to(tl.int64) * weight_stride  # [N]

    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):  # first H inputs: the gathered embedding / image row
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < hidden
        x = tl.load(embed_rows[:, None] + k[None, :], mask=from_embed[:, None] & k_ok[None, :],
                    other=0.0)
        if HAS_IMAGE_ROWS:  # exactly one of the two loads is unmasked per row: the sum is exact
            x += tl.load(image_rows[:, None] + k[None, :],
                         mask=from_image[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(weight_rows[:, None] + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [N, K]
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    for k0 in range(0, hidden, BLOCK_K):  # last H inputs: the target feature
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < hidden
        x = tl.load(feature_rows[:, None] + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(weight_rows[:, None] + hidden + k[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")

    y = acc + tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y.to(out_ptr.dtype.element_ty)
    if BYPASS:  # MSD: an image row is the layer input itself
        own = tl.load(embed_rows[:, None] + n[None, :], mask=from_embed[:, None] & n_ok[None, :],
                      other=0.0)
        if HAS_IMAGE_ROWS:
            own += tl.load(image_rows[:, None] + n[None, :],
                           mask=from_image[:, None] & n_ok[None, :], other=0.0)
        y = tl.where(image[:, None], own, y)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * out_stride + n[None, :], y,
             mask=row_ok[:, None] & n_ok[None, :])


def _check_matrix(t: torch.Tensor, name: str, shape: tuple, ref: torch.Tensor) -> None:
    check_like(t, name, ref, "embed")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {list(shape)}")
    if t.dim() and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def _check_rows(token_ids, is_image, image_rows, embed):
    t = token_ids.shape[0] if isinstance(token_ids, torch.Tensor) and token_ids.dim() == 1 else -1
    if t < 0 or token_ids.dtype != torch.int64:
        raise TypeError(f"token_ids must be a 1-D int64 tensor, got "
                        f"{getattr(token_ids, 'dtype', type(token_ids).__name__)} "
                        f"{tuple(getattr(token_ids, 'shape', ()))}")
    if token_ids.device != embed.device:
        raise ValueError(f"token_ids is on {token_ids.device} but embed is on {embed.device}")
    if is_image is not None:
        if is_image.dtype != torch.bool or tuple(is_image.shape) != (t,):
            raise TypeError(f"is_image must be a bool tensor of shape ({t},), got {is_image.dtype} "
                            f"{tuple(is_image.shape)}")
        if is_image.device != embed.device:
            raise ValueError(f"is_image is on {is_image.device} but embed is on {embed.device}")
    if image_rows is not None and is_image is None:
        raise ValueError("image_rows given without is_image: which rows are images?")
    return t


def draft_fc(token_ids: torch.Tensor, embed: torch.Tensor, features: torch.Tensor,
             image_rows: Optional[torch.Tensor], is_image: Optional[torch.Tensor],
             fc_weight: torch.Tensor, fc_bias: torch.Tensor, bypass: bool,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Draft layer inputs [T, H] (see the module docstring); `out` new if None.

    token_ids int64 [T] (ignored where is_image), embed [V, H], features [T, H], image_rows
    [T, H] or None, is_image bool [T] or None, fc_weight [H, 2H], fc_bias [H], all one dtype.
    Token ids are not range-checked (a device sync); torch's gather would raise, this reads out
    of bounds.
    """
    check_tensor(embed, "embed", _draft_fc_kernel)
    if embed.dim() != 2:
        raise ValueError(f"embed has shape {tuple(embed.shape)}; expected [V, H]")
    hidden = embed.shape[1]
    t = _check_rows(token_ids, is_image, image_rows, embed)
    _check_matrix(features, "features", (t, hidden), embed)
    if image_rows is not None:
        _check_matrix(image_rows, "image_rows", (t, hidden), embed)
    _check_matrix(fc_weight, "fc_weight", (hidden, 2 * hidden), embed)
    _check_matrix(fc_bias, "fc_bias", (hidden,), embed)
    if embed.stride(1) != 1 and hidden > 1:
        raise ValueError(f"embed must be contiguous in its last dim, got strides {embed.stride()}")
    if out is None:
        out = torch.empty(t, hidden, dtype=embed.dtype, device=embed.device)
    _check_matrix(out, "out", (t, hidden), embed)
    if t == 0 or hidden == 0:
        return out
    flags = is_image.view(torch.uint8) if is_image is not None else token_ids
    images = image_rows if image_rows is not None else features  # unused without HAS_IMAGE_ROWS
    grid = (triton.cdiv(hidden, BLOCK_N), triton.cdiv(t, BLOCK_T))
    _draft_fc_kernel[grid](
        token_ids, embed, features, images, flags, fc_weight, fc_bias, out, t, hidden,
        row_stride(embed), row_stride(features), row_stride(images), row_stride(fc_weight),
        row_stride(out), HAS_FLAGS=is_image is not None, HAS_IMAGE_ROWS=image_rows is not None,
        BYPASS=bool(bypass) and is_image is not None,
        BLOCK_T=min(BLOCK_T, max(16, triton.next_power_of_2(t))), BLOCK_N=BLOCK_N,
        BLOCK_K=min(BLOCK_K, max(16, triton.next_power_of_2(hidden))), num_warps=4, num_stages=3)
    return out


def draft_fc_ref(token_ids: torch.Tensor, embed: torch.Tensor, features: torch.Tensor,
                 image_rows: Optional[torch.Tensor], is_image: Optional[torch.Tensor],
                 fc_weight: torch.Tensor, fc_bias: torch.Tensor, bypass: bool) -> torch.Tensor:
    """Plain torch: TreeDrafter.extend's gather, then DraftModel.fuse (bypass = MSD mode)."""
    if is_image is None:
        rows = embed[token_ids]
    else:
        rows = embed[torch.where(is_image, torch.zeros_like(token_ids), token_ids)]
        if image_rows is not None:
            rows = torch.where(is_image[:, None], image_rows, rows)
    fused = torch.nn.functional.linear(torch.cat([rows, features], dim=-1), fc_weight, fc_bias)
    if bypass and is_image is not None:
        fused = torch.where(is_image[:, None], rows, fused)
    return fused
