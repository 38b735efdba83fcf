"""The draft head: fc over [embedding, target feature] (or the visual bypass), one Llama layer.

Layer without input norm and without a final norm: x = x + attn(x); x = x + mlp(post_norm(x)).
Its logits come from the TARGET's lm_head, or from the rows of it that the draft's reduced
vocabulary keeps (`draft_vocab`: target token ids; the draft then proposes only those tokens).
"""
from __future__ import annotations

from typing import Optional

import torch

from msd_engine.draft.config import DraftConfig
from msd_engine.draft.weights import DRAFT_VOCAB_KEY
from msd_engine.kv_cache import KVCache, StepState
from msd_engine.model.llama import LlamaLayer, rotary_tables
from msd_engine.ops import TorchOps


class DraftModel:
    def __init__(self, config: DraftConfig, weights: dict[str, torch.Tensor], target_lm_head: torch.Tensor,
                 ops: TorchOps, max_seq_len: int):
        self.config = config
        self.ops = ops
        self.embed_tokens = weights["embed_tokens.weight"]  # [V, H], a frozen copy of the target's
        self.fc_weight = weights["fc.weight"]                # [H, 2H]: embedding columns first, then feature
        self.fc_bias = weights["fc.bias"]
        p = "layers.0."
        qkv = torch.cat([weights[p + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")])
        gate_up = torch.cat([weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]])
        self.layer = LlamaLayer(input_norm=torch.empty(0), qkv_proj=qkv, o_proj=weights[p + "self_attn.o_proj.weight"],
                                post_attention_norm=weights[p + "post_attention_layernorm.weight"],
                                gate_up_proj=gate_up, down_proj=weights[p + "mlp.down_proj.weight"])
        self.block = ops.prepare_decoder_layer(self.layer, None, config)  # no input norm, no final norm
        self.vocab_ids: Optional[torch.Tensor] = weights.get(DRAFT_VOCAB_KEY)  # [Vd] int64 target ids, or None
        lm_head = target_lm_head if self.vocab_ids is None else target_lm_head[self.vocab_ids].contiguous()
        self.lm_head = lm_head.to(self.fc_weight.dtype)  # no copy when the draft runs in the target's dtype
        self.cos, self.sin = rotary_tables(config, max_seq_len, self.fc_weight.dtype, self.fc_weight.device)

    def plan_step(self, positions: torch.Tensor, start: int, mask: Optional[torch.Tensor],
                  prefix_len: Optional[int] = None) -> StepState:
        return StepState(positions=positions, start=start, prefix_len=start if prefix_len is None else prefix_len,
                         mask=mask, cos=self.cos[positions], sin=self.sin[positions])

    def inputs(self, token_ids: torch.Tensor, features: torch.Tensor, image_rows: Optional[torch.Tensor] = None,
               is_image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Layer inputs [T, H]: fc(cat(embed(token), feature)) + bias. Where `is_image`, the token is
        an image patch whose embedding is its projector output `image_rows`; in `msd` mode those rows
        bypass fc entirely (the decoupling), in `eagle` mode they go through fc like text."""
        return self.ops.draft_inputs(token_ids, self.embed_tokens, features.to(self.fc_weight.dtype),
                                     None if image_rows is None else image_rows.to(self.fc_weight.dtype),
                                     is_image, self.fc_weight, self.fc_bias, bypass=self.config.mode == "msd")

    def forward(self, x: torch.Tensor, step: StepState, cache: KVCache) -> torch.Tensor:
        """x [T, H] fused inputs -> [T, H] predicted next features (no final norm)."""
        with self.ops.step_scope(step.num_tokens):
            return self._forward(x, step, cache)

    def _forward(self, x: torch.Tensor, step: StepState, cache: KVCache) -> torch.Tensor:
        # x = x + attn(x); x = x + mlp(post_norm(x)): the decoder layer with x as both its input
        # and its residual, and no norm after it.
        _, out = self.ops.decoder_layers([self.block], x.clone(), x.clone(), step, cache)
        return out

    def top_k(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, H] -> the k most likely next tokens per row: (log-probs [T, k] float32, best first;
        target token ids [T, k]). One fused lm_head + log-softmax + top-k where the backend has it."""
        if not 1 <= k <= self.lm_head.shape[0]:
            raise ValueError(f"top_k {k} outside 1..{self.lm_head.shape[0]} (the draft's vocabulary)")
        with self.ops.step_scope(hidden.shape[0]):
            values, index = self.ops.logsoftmax_topk(hidden, self.lm_head, k)
        return values, index if self.vocab_ids is None else self.vocab_ids[index]
