"""The MSD/EAGLE draft loss and training-time input noise.

Alignment (all tensors indexed by draft position i = target position i, see `records.py`):
draft position i reads token i+1 and the target feature at i, so its output `pred[i]` is compared
with `target_features[i+1]`, the target's feature one step later. Prediction i is weighted by
`loss_mask[i+1]`, the mask of the position whose feature it predicts: it is 1 only where that
feature belongs to an assistant (response) token, so the draft is never trained to predict
features of the BOS, the image span or the instructions (which the target reads, not generates).
The last prediction (i = N-1) has no next feature and is always excluded.

Reduced draft vocabulary (`draft_vocab`, see `vocab.py`): the soft cross-entropy and the top-1
accuracy run over the reduced head `lm_head[draft_vocab]` only. The target's next-token
distribution is restricted to the draft vocabulary and renormalised (which is the softmax of the
target's logits at those ids; EAGLE-3 trains its reduced head the same way), and the draft's
log-softmax is taken over the draft vocabulary. The accuracy is then agreement within the draft
vocabulary (the target's top-1 there). The feature regression (SmoothL1) is unchanged.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

CE_WEIGHT = 0.1        # soft cross-entropy weight beside the feature regression (MSD / EAGLE)
NOISE_SCALE = 0.2      # uniform noise width at the reference length
NOISE_REF_LEN = 512    # ... scaled by NOISE_REF_LEN / seq_len
UNROLL_DECAY = 0.8     # weight of unrolled draft step k relative to step k-1


def check_ce_weight(value, name: str = "ce_weight") -> float:
    """`value` as a float after checking it is a finite number >= 0 (not a bool); else a ValueError
    naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def draft_loss(pred: torch.Tensor, target_features: torch.Tensor, loss_mask: torch.Tensor, lm_head: torch.Tensor,
               draft_vocab: Optional[torch.Tensor] = None, ce_weight: float = CE_WEIGHT
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """pred, target_features [B, N, H], loss_mask [B, N], lm_head [V, H] (frozen) -> (loss, stats).

    loss = mean over weighted positions of SmoothL1(pred[i], target[i+1]) (mean over H)
           + ce_weight * soft-CE(softmax(lm_head(target[i+1])), log_softmax(lm_head(pred[i]))).
    draft_vocab [K] int64 (optional): both logits use only the rows `lm_head[draft_vocab]`.
    stats: loss, feature_loss, ce_loss, acc (top-1 agreement of the two logits), positions."""
    if pred.shape != target_features.shape or loss_mask.shape != pred.shape[:2]:
        raise ValueError(f"pred {list(pred.shape)}, target_features {list(target_features.shape)} and "
                         f"loss_mask {list(loss_mask.shape)} disagree (expected [B, N, H], [B, N, H], [B, N])")
    if draft_vocab is not None:
        if draft_vocab.dim() != 1 or draft_vocab.dtype != torch.int64:
            raise ValueError(f"draft_vocab must be int64 [K], got {draft_vocab.dtype} {list(draft_vocab.shape)}")
        lm_head = lm_head[draft_vocab]                     # [K, H] the reduced head
    p = pred[:, :-1]                                      # [B, N-1, H] predictions with a next feature
    # targets stay float32 even when pred is bf16 (autocast): rounding them would bias the regression
    t = target_features[:, 1:].float()                    # [B, N-1, H]
    w = loss_mask[:, 1:].to(torch.float32)                # [B, N-1] mask of the NEXT position
    denom = w.sum().clamp_min(1.0)
    # Selecting (not multiplying) keeps masked positions out of the graph: a NaN there cannot leak.
    sel = w > 0
    lm_head = lm_head.detach()  # the target's head is frozen: no gradient ever reaches it
    p, t, w = p[sel], t[sel], w[sel]                      # [M, H], [M, H], [M]
    feature = F.smooth_l1_loss(p.float(), t, reduction="none").mean(-1)          # [M]
    with torch.no_grad():
        target_logits = (t @ lm_head.float().T).float()                           # [M, V] (or [M, K])
        target_p = target_logits.softmax(-1)
    pred_logits = (p @ lm_head.to(p.dtype).T).float()                             # [M, V]
    ce = -(target_p * pred_logits.log_softmax(-1)).sum(-1)                        # [M]
    feature_loss = (feature * w).sum() / denom
    ce_loss = (ce * w).sum() / denom
    loss = feature_loss + ce_weight * ce_loss
    with torch.no_grad():
        agree = (pred_logits.argmax(-1) == target_logits.argmax(-1)).float()
        acc = (agree * w).sum() / denom
    stats = {"loss": float(loss.detach()), "feature_loss": float(feature_loss.detach()),
             "ce_loss": float(ce_loss.detach()),
             "acc": float(acc), "positions": int(sel.sum())}
    return loss, stats


def input_noise(features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """features [..., N, H] + (U - 0.5) * 0.2 * 512 / N, U ~ Uniform[0, 1) (the reference's
    AddUniformNoise, applied to the draft's input features only, never to the targets)."""
    n = features.shape[-2]
    u = torch.rand(features.shape, generator=generator, dtype=torch.float32).to(features.device, features.dtype)
    return features + (u - 0.5) * NOISE_SCALE * NOISE_REF_LEN / n


def unrolled_loss(preds: Sequence[torch.Tensor], target_features: torch.Tensor, loss_mask: torch.Tensor,
                  lm_head: torch.Tensor, draft_vocab: Optional[torch.Tensor] = None,
                  ce_weight: float = CE_WEIGHT) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of an unrolled draft (`DraftModule.forward_unrolled`): every step's prediction at
    position i is compared, as in `draft_loss`, with feature i+1 (a draft k steps deep still predicts
    the next feature of its own position), weighted UNROLL_DECAY**(k-1), normalised by the weights'
    sum so that the scale matches one step's. All steps use `unrolled_mask(loss_mask, K)`.
    stats: loss (the combined one), feature_loss, ce_loss and acc of step 1, acc_k (top-1 agreement)
    of each step k >= 2."""
    if not preds:
        raise ValueError("unrolled_loss needs at least one step's predictions")
    loss_mask = unrolled_mask(loss_mask, len(preds))
    weights = [UNROLL_DECAY ** k for k in range(len(preds))]
    total = None
    stats: dict[str, float] = {}
    for k, (pred, w) in enumerate(zip(preds, weights), start=1):
        loss, step_stats = draft_loss(pred, target_features, loss_mask, lm_head, draft_vocab, ce_weight)
        total = loss * w if total is None else total + loss * w
        if k == 1:
            stats = dict(step_stats)
        else:
            stats[f"acc_{k}"] = step_stats["acc"]
    total = total / sum(weights)
    stats["loss"] = float(total.detach())
    return total, stats


def unrolled_mask(loss_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """loss_mask [B, N] with predictions 0..steps-2 left out (mask[1 .. steps-1] zeroed): at step
    k > 1 prediction i < k-1 has no drafter state behind it (its context would be empty). Every step
    drops the same positions, so all share one denominator. In chat records those positions are
    the prompt's and carry no weight anyway."""
    out = loss_mask.clone()
    out[:, 1:steps] = 0
    return out
