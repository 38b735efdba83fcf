"""`DraftModule`: the draft head as a differentiable torch module over whole sequences (no KV cache).

Same computation as `msd_engine.draft.model.DraftModel` (fc fusion or the MSD visual bypass, one
Llama layer without input norm, causal MHA with RoPE, post-attention RMSNorm, SwiGLU, no final
norm), batched. Its parameter names are the released checkpoint keys, so `state_dict()` is the
released format (`embed_tokens.weight` frozen). With a reduced draft vocabulary
(`config.draft_vocab_size > 0`) it also holds the non-trainable int64 buffer `draft_vocab` (the
target token ids the draft proposes), which the checkpoint stores under that key.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from msd_engine.draft.config import DraftConfig
from msd_engine.draft.weights import DRAFT_VOCAB_KEY, check_draft_tensors
from msd_engine.train.vocab import check_draft_vocab


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics, as the inference ops compute them
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.config = config
        self.q_proj = nn.Linear(h, config.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                earlier: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> tuple[torch.Tensor, tuple]:
        """x [B, N, H] -> (output [B, N, H], this call's (keys, values) [B, Hkv, N, D] after RoPE).

        earlier: the (keys, values) of the unrolled draft steps before this one (see
        `DraftModule.forward_unrolled`); empty: plain causal attention over x itself under `mask`
        [B, N, N]. Given k-1 earlier steps, this is step k: the main keys are step 1's under `mask`
        [B, N, N], and query i also reads, for each later step m = 2..k, the single key of step m at
        position i-(k-m) (its own key for m = k), where that position exists."""
        cfg = self.config
        b, n, _ = x.shape
        d = cfg.head_dim
        q = self.q_proj(x).view(b, n, cfg.num_heads, d).transpose(1, 2)      # [B, Hq, N, D]
        k = self.k_proj(x).view(b, n, cfg.num_kv_heads, d).transpose(1, 2)   # [B, Hkv, N, D]
        v = self.v_proj(x).view(b, n, cfg.num_kv_heads, d).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        groups = cfg.num_heads // cfg.num_kv_heads
        main_k, main_v = earlier[0] if earlier else (k, v)
        main_k, main_v = main_k.repeat_interleave(groups, dim=1), main_v.repeat_interleave(groups, dim=1)
        scores = q @ main_k.transpose(-1, -2) / math.sqrt(d)                    # [B, Hq, N, N]
        scores = scores.float().masked_fill(~mask[:, None], float("-inf"))
        if not earlier:
            attn = scores.softmax(-1).to(v.dtype) @ main_v                      # [B, Hq, N, D]
        else:
            steps = len(earlier) + 1
            later = list(earlier[1:]) + [(k, v)]                                # steps 2..k
            shifts = [steps - m for m in range(2, steps + 1)]                   # step m sits k-m back
            diag_k = torch.stack([_shift(t, s) for (t, _), s in zip(later, shifts)], dim=3)   # [B, Hkv, N, S, D]
            diag_v = torch.stack([_shift(t, s) for (_, t), s in zip(later, shifts)], dim=3)
            diag_k, diag_v = diag_k.repeat_interleave(groups, dim=1), diag_v.repeat_interleave(groups, dim=1)
            diag = (q[:, :, :, None, :] * diag_k).sum(-1).float() / math.sqrt(d)  # [B, Hq, N, S]
            exists = torch.arange(n, device=x.device)[:, None] >= torch.tensor(shifts, device=x.device)[None]
            diag = diag.masked_fill(~exists, float("-inf"))
            weights = torch.cat([scores, diag], dim=-1).softmax(-1).to(v.dtype)
            attn = weights[..., :n] @ main_v + (weights[..., n:, None] * diag_v).sum(3)
        return self.o_proj(attn.transpose(1, 2).reshape(b, n, cfg.num_heads * d)), (k, v)


def _shift(t: torch.Tensor, by: int) -> torch.Tensor:
    """[B, H, N, D] -> row i holds row i-by (zeros where i < by)."""
    if by == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[:2] + (by,) + t.shape[3:]), t[:, :, :-by]], dim=2)


class MLP(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    """x = x + attn(x); x = x + mlp(post_attention_layernorm(x)): no input norm."""

    def __init__(self, config: DraftConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, earlier=()):
        """-> (output, this call's attention (keys, values)); see `Attention.forward`."""
        attn, kv = self.self_attn(x, cos, sin, mask, earlier)
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h)), kv


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, N, D]; cos/sin [N, D] (transformers' rotate_half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotary(config: DraftConfig, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, D] for positions 0..n-1, computed in float32 like `rotary_tables`, then cast."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1).to(device)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class DraftModule(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        h = config.hidden_size
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)  # a frozen copy of the target's embedding
        self.fc = nn.Linear(2 * h, h, bias=True)         # columns: embedding first, then the feature
        self.layers = nn.ModuleList([DraftLayer(config)])
        if config.draft_vocab_size:
            # a buffer, not a parameter: saved in state_dict() (hence the checkpoint), never trained
            self.register_buffer(DRAFT_VOCAB_KEY, torch.arange(config.draft_vocab_size, dtype=torch.int64))

    @classmethod
    def from_config(cls, config: DraftConfig, target_embed: torch.Tensor, seed: int = 0, std: float = 0.02,
                    draft_vocab: Optional[torch.Tensor] = None) -> "DraftModule":
        """Random layer weights (training's start), embedding copied from the target's; `draft_vocab`
        (required exactly when config.draft_vocab_size > 0) the reduced vocabulary."""
        from msd_engine.draft.init import init_draft_weights

        module = cls(config)
        module.load_weights(init_draft_weights(config, target_embed, seed, std, draft_vocab))
        return module

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Strict: exactly the released keys with the config's shapes (plus `draft_vocab`, a valid
        int64 id list, when the config has a reduced draft vocabulary)."""
        source = "DraftModule.load_weights"
        check_draft_tensors({k: tuple(v.shape) for k, v in weights.items()}, self.config, source)
        if self.config.draft_vocab_size:
            check_draft_vocab(weights[DRAFT_VOCAB_KEY], self.config.draft_vocab_size, self.config.vocab_size, source)
        with torch.no_grad():
            for name, param in self.state_dict(keep_vars=True).items():
                param.copy_(weights[name])

    def inputs(self, token_ids: torch.Tensor, features: torch.Tensor, image_rows: Optional[torch.Tensor],
               is_image: Optional[torch.Tensor]) -> torch.Tensor:
        """[B, N, H] layer inputs: fc(cat(embed(token) or image row, feature)); in `msd` mode image
        rows bypass fc (the decoupling), in `eagle` mode they go through it."""
        if is_image is None:
            rows = self.embed_tokens(token_ids)
        else:
            rows = self.embed_tokens(torch.where(is_image, torch.zeros_like(token_ids), token_ids))
            if image_rows is not None:
                rows = torch.where(is_image[..., None], image_rows.to(rows.dtype), rows)
        fused = self.fc(torch.cat([rows, features.to(rows.dtype)], dim=-1))
        if self.config.mode == "msd" and is_image is not None:
            fused = torch.where(is_image[..., None], rows, fused)
        return fused

    def forward(self, token_ids: torch.Tensor, features: torch.Tensor, image_rows: Optional[torch.Tensor] = None,
                is_image: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                steps: Optional[int] = None):
        """token_ids [B, N], features [B, N, H] -> predicted next features [B, N, H].

        attention_mask [B, N] (1 = real token) masks right padding out of the keys; positions are
        0..N-1 per row (left-aligned sequences). steps (an int): `forward_unrolled`'s list instead
        (through forward, so that a DistributedDataParallel wrapper can run it)."""
        if steps is not None:
            return self.forward_unrolled(token_ids, features, image_rows, is_image, attention_mask, steps)
        return self.forward_unrolled(token_ids, features, image_rows, is_image, attention_mask, steps=1)[0]

    def forward_unrolled(self, token_ids: torch.Tensor, features: torch.Tensor,
                         image_rows: Optional[torch.Tensor] = None, is_image: Optional[torch.Tensor] = None,
                         attention_mask: Optional[torch.Tensor] = None, steps: int = 1) -> list[torch.Tensor]:
        """The draft run `steps` times the way drafting runs it (training-time test, as HASS and
        EAGLE-3 train): a list of [B, N, H] predictions, one per step.

        Step 1 is `forward`. At step k > 1, position i takes token i+1 with step k-1's prediction at
        position i-1 (what the draft predicted for feature i, in place of the target's) and attends
        to step 1's keys up to position i-k+1 (the context: target features) and to one key of each
        step m = 2..k, at position i-(k-m): exactly the keys a draft at depth k-1 sees when the
        context ends at position i-k+1. Its prediction is compared, like step 1's, with feature i+1.
        Position 0 of a later step has no earlier prediction and keeps its input feature; positions
        i < k-1 of step k match no drafter state (`losses.unrolled_mask` leaves them out)."""
        if token_ids.dim() != 2 or features.shape[:2] != token_ids.shape:
            raise ValueError(f"token_ids [B, N] and features [B, N, H] expected, got {list(token_ids.shape)} "
                             f"and {list(features.shape)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        b, n = token_ids.shape
        device = token_ids.device
        real = (torch.ones(b, n, dtype=torch.bool, device=device) if attention_mask is None
                else attention_mask.bool())
        # keep the diagonal so padded queries never see an all -inf row (their outputs are ignored)
        first = torch.ones(n, n, dtype=torch.bool, device=device).tril() & (
            real[:, None, :] | torch.eye(n, dtype=torch.bool, device=device))   # [B, N, N]
        cos = sin = None
        kv: list[list] = [[] for _ in self.layers]
        preds = []
        inputs = features
        for step in range(1, steps + 1):
            x = self.inputs(token_ids, inputs, image_rows, is_image)
            if cos is None:
                cos, sin = rotary(self.config, n, x.dtype, x.device)
            # step k > 1: step 1's keys up to i-k+1 only (later steps' keys come one per position)
            mask = first if step == 1 else first & torch.ones(n, n, dtype=torch.bool, device=device).tril(1 - step)
            for layer, earlier in zip(self.layers, kv):
                x, keys = layer(x, cos, sin, mask, earlier)
                earlier.append(keys)
            preds.append(x)
            inputs = torch.cat([features[:, :1], x[:, :-1].to(features.dtype)], dim=1)
        return preds
