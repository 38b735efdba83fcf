"""The Llama language model (RMSNorm, RoPE, SwiGLU, MHA or GQA) over the static KV cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from msd_engine.config import TextConfig
from msd_engine.kv_cache import KVCache, StepState
from msd_engine.ops import TorchOps


def rotary_tables(config: TextConfig, max_seq_len: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, D] for every position, computed in float32 as transformers does, then cast."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    positions = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype=dtype, device=device), emb.sin().to(dtype=dtype, device=device)


@dataclass
class LlamaLayer:
    input_norm: torch.Tensor
    qkv_proj: torch.Tensor      # [(Hq + 2 Hkv) * D, H]: q, k, v fused so a step reads them in one GEMV
    o_proj: torch.Tensor
    post_attention_norm: torch.Tensor
    gate_up_proj: torch.Tensor  # [2F, H]: gate rows then up rows
    down_proj: torch.Tensor


class LlamaModel:
    def __init__(self, config: TextConfig, weights: dict[str, torch.Tensor], ops: TorchOps,
                 max_seq_len: int):
        self.config = config
        self.ops = ops
        self.embed_tokens = weights["text.embed_tokens.weight"]  # [V, H]
        self.norm = weights["text.norm.weight"]
        self.lm_head = self.embed_tokens if config.tie_word_embeddings else weights["text.lm_head.weight"]
        self.layers = [self._layer(weights, i) for i in range(config.num_layers)]
        next_norms = [layer.input_norm for layer in self.layers[1:]] + [self.norm]
        self.blocks = [ops.prepare_decoder_layer(layer, norm, config) for layer, norm in zip(self.layers, next_norms)]
        self.cos, self.sin = rotary_tables(config, max_seq_len, self.embed_tokens.dtype, self.embed_tokens.device)

    @staticmethod
    def _layer(weights: dict[str, torch.Tensor], i: int) -> LlamaLayer:
        p = f"text.layers.{i}."
        qkv = torch.cat([weights[p + f"attn.{n}_proj.weight"] for n in ("q", "k", "v")])
        gate_up = torch.cat([weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]])
        return LlamaLayer(weights[p + "input_norm.weight"], qkv, weights[p + "attn.o_proj.weight"],
                          weights[p + "post_attention_norm.weight"], gate_up, weights[p + "mlp.down_proj.weight"])

    # ---- plan --------------------------------------------------------------------------------
    def plan_step(self, positions: torch.Tensor, start: int, mask: Optional[torch.Tensor],
                  prefix_len: Optional[int] = None) -> StepState:
        """prefix_len defaults to `start`: everything already in the cache is fully visible."""
        return StepState(positions=positions, start=start, prefix_len=start if prefix_len is None else prefix_len,
                         mask=mask, cos=self.cos[positions], sin=self.sin[positions])

    # ---- run ---------------------------------------------------------------------------------
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens[token_ids]  # [T, H]

    def forward(self, x: torch.Tensor, step: StepState, cache: KVCache) -> torch.Tensor:
        """x [T, H] input embeddings -> [T, H] final-normed hidden states; writes T cache slots."""
        with self.ops.step_scope(step.num_tokens):
            return self._forward(x, step, cache)

    def _forward(self, x: torch.Tensor, step: StepState, cache: KVCache) -> torch.Tensor:
        ops, cfg = self.ops, self.config
        residual = x.clone()  # backends may accumulate into the residual in place; x stays the caller's
        h = ops.rms_norm(x, self.layers[0].input_norm, cfg.rms_norm_eps)
        h, _ = ops.decoder_layers(self.blocks, h, residual, step, cache)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, V] in float32 (sampling and comparisons are done in float32)."""
        with self.ops.step_scope(hidden.shape[0]):
            return self.ops.linear(hidden, self.lm_head).float()
