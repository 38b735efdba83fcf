"""The plain-torch backend: the reference every other backend is held to.

The arithmetic follows transformers' Llama/CLIP code step for step (same dtype casts, same order),
so float32 logits agree with `LlavaForConditionalGeneration` to rounding.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DecoderBlock:
    """One Llama decoder layer as the op table runs it (`TorchOps.decoder_layer`), built once at
    load: the layer's weights (a model.llama.LlamaLayer), the norm that follows it (the next
    layer's input norm, the final norm, or None for the draft head's layer) and its sizes."""

    layer: Any
    next_norm: Optional[torch.Tensor]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float


class TorchOps:
    """Op table over plain torch. Subclasses replace single ops with hand-written kernels."""

    name = "torch"

    def step_scope(self, num_tokens: int) -> ContextManager:
        """Entered around one forward step of `num_tokens` rows (a backend may set threading)."""
        return contextlib.nullcontext()

    # ---- elementwise and normalisation -------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Llama RMSNorm: normalise in float32, round to the input dtype, then scale.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """residual + x, and its RMSNorm: returns (normed, new_residual).

        Kernel backends update `residual` in place and return it; callers must own that buffer.
        """
        residual = residual + x
        return self.rms_norm(residual, weight, eps), residual

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[..., 2F] (gate | up) -> silu(gate) * up, [..., F]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)  # exact erf, as LLaVA's projector

    def quick_gelu(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    # ---- a whole decoder layer ----------------------------------------------------------------
    def prepare_decoder_layer(self, layer, next_norm: Optional[torch.Tensor], config) -> DecoderBlock:
        """What `decoder_layer` needs for `layer` (a LlamaLayer), built once at load; `config`
        gives num_heads, num_kv_heads, head_dim and rms_norm_eps."""
        return DecoderBlock(layer, next_norm, config.num_heads, config.num_kv_heads, config.head_dim,
                            config.rms_norm_eps)

    def decoder_layer(self, block: DecoderBlock, h: torch.Tensor, residual: torch.Tensor, step,
                      k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """One layer of a step (`step`: a kv_cache.StepState): `h [T, H]` is its normed input,
        `residual` the residual stream. Returns (the next normed input, or None when the block has
        no next_norm; the residual after the layer). Kernel backends may update h and residual in
        place: callers must own both."""
        layer, eps, t = block.layer, block.rms_norm_eps, h.shape[0]
        qkv = self.linear(h, layer.qkv_proj)  # [T, (Hq + 2 Hkv) * D]
        q, k, v = qkv.view(t, -1, block.head_dim).split([block.num_heads, block.num_kv_heads, block.num_kv_heads], dim=1)
        q = self.rope_kv_write(q, k, v, step.cos, step.sin, k_cache, v_cache, step.start)  # rope(k), v cached
        out = self.attention(q, k_cache, v_cache, step)  # [T, Hq, D]
        attn_out = self.linear(out.reshape(t, block.num_heads * block.head_dim), layer.o_proj)
        h, residual = self.add_rms_norm(attn_out, residual, layer.post_attention_norm, eps)
        mlp_out = self.linear(self.silu_mul(self.linear(h, layer.gate_up_proj)), layer.down_proj)
        if block.next_norm is None:
            return None, residual + mlp_out
        return self.add_rms_norm(mlp_out, residual, block.next_norm, eps)

    def decoder_layers(self, blocks, h: torch.Tensor, residual: torch.Tensor, step,
                       cache) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """`decoder_layer` for every block in order, block i on `cache.layer(i)` (a KVCache):
        returns what the last one returns. Kernel backends may run the layers in one go."""
        for i, block in enumerate(blocks):
            h, residual = self.decoder_layer(block, h, residual, step, *cache.layer(i))
        return h, residual

    # ---- rotary embedding and cache ----------------------------------------------------------
    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D]; cos/sin [T, D] (halves duplicated, transformers' rotate_half layout)."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]

    def kv_write(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 start: int) -> None:
        """Write k/v [T, Hkv, D] into cache slots start..start+T of [Hkv, S, D] views."""
        t = k.shape[0]
        k_cache[:, start:start + t].copy_(k.transpose(0, 1))
        v_cache[:, start:start + t].copy_(v.transpose(0, 1))

    def rope_kv_write(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int) -> torch.Tensor:
        """rope(k) and v into cache slots start..start+T; returns rope(q). q [T, Hq, D], k/v [T, Hkv, D]."""
        q_rot = self.rope(q, cos, sin)
        self.kv_write(k_cache, v_cache, self.rope(k, cos, sin), v, start)
        return q_rot

    def kv_compact(self, arena: torch.Tensor, start: int, nodes: torch.Tensor) -> None:
        """Move slot start + nodes[j] to start + j in every layer, K and V: arena [2, L, Hkv, S, D].

        `nodes` ascending (accepted tree nodes, root first). The gather copies before the write, so
        overlapping ranges are safe.
        """
        m = int(nodes.shape[0])
        arena[:, :, :, start:start + m] = arena[:, :, :, nodes + start]

    # ---- lm_head ---------------------------------------------------------------------------------
    def logsoftmax_topk(self, hidden: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most likely tokens per row of log_softmax(hidden [T, H] @ weight [V, H].T): (log-probs
        [T, k] float32, descending; indices [T, k] int64). Equal values come in torch.topk's order."""
        return torch.topk(torch.log_softmax(self.linear(hidden, weight).float(), dim=-1), k, dim=-1)

    # ---- draft head ----------------------------------------------------------------------------
    def draft_inputs(self, token_ids: torch.Tensor, embed: torch.Tensor, features: torch.Tensor,
                     image_rows: Optional[torch.Tensor], is_image: Optional[torch.Tensor], fc_weight: torch.Tensor,
                     fc_bias: torch.Tensor, bypass: bool) -> torch.Tensor:
        """The draft layer's inputs [T, H]: fc(cat(embed[token] or image row, feature)) + bias; with
        `bypass` (MSD), image rows skip fc and are the projector output itself."""
        if is_image is None:
            rows = embed[token_ids]
        else:
            rows = embed[torch.where(is_image, torch.zeros_like(token_ids), token_ids)]
            if image_rows is not None:
                rows = torch.where(is_image[:, None], image_rows, rows)
        fused = self.linear(torch.cat([rows, features], dim=-1), fc_weight, fc_bias)
        if bypass and is_image is not None:
            fused = torch.where(is_image[:, None], rows, fused)
        return fused

    def native_draft_head(self, model, cache):
        """The draft head's per-round steps as one kernel call each, where the backend has them: an
        object with `extend(token_ids [m], features [m, H], committed) -> hidden [m, H]` (text tokens)
        and `tree(last_hidden [H], committed, root_token, TreeParams) -> (node tokens [T], node parents)`,
        computing what the drafter's Python path computes, each returning None for a step it does not
        take; None here."""
        return None

    # ---- attention ---------------------------------------------------------------------------
    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, step) -> torch.Tensor:
        """The step's attention (`step`: a kv_cache.StepState); kernel backends read its packed mask."""
        return self.cached_attention(q, k_cache, v_cache, step.prefix_len, step.mask)

    def cached_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         prefix_len: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Tree-masked attention over the cache. q [T, Hq, D]; caches [Hkv, S, D] (new entries written).

        Keys are slots [0, prefix_len + R) with R = mask.shape[1] (R = T when mask is None): the
        prefix is fully visible, the R slots after it through `mask` [T, R] (bool, True = visible).
        The queries' own entries are the last T of those R. Returns [T, Hq, D].
        """
        t, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[0]
        group = num_heads // num_kv_heads
        region = t if mask is None else mask.shape[1]
        keys = k_cache[None, :, :prefix_len + region]  # [1, Hkv, L, D]
        values = v_cache[None, :, :prefix_len + region]
        # Fold the query heads of one KV group into the query axis: no K/V repeat needed.
        q_grouped = q.transpose(0, 1).reshape(1, num_kv_heads, group * t, head_dim)
        attn_mask = None
        if mask is not None:
            full = torch.ones(t, prefix_len + region, dtype=torch.bool, device=q.device)
            full[:, prefix_len:] = mask
            attn_mask = full.repeat(group, 1)  # [G*T, L]: row g*T + i is query i of head g
        out = F.scaled_dot_product_attention(q_grouped, keys, values, attn_mask=attn_mask)
        return out.reshape(num_heads, t, head_dim).transpose(0, 1)

    def dense_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Bidirectional attention without cache (vision tower): [B, N, H, D] -> [B, N, H, D]."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
