"""Triton backend: the torch op table with the Triton kernels of `msd_engine.triton_kernels` swapped in.

Replaced: RMSNorm (+ residual), SwiGLU, tree-masked attention (split-KV, one pass over each K/V
block for all T queries of a KV group), all-layer KV compaction, the fused draft-head input, RoPE
fused with the KV-cache write, and the lm_head fused with log-softmax + top-k.
"""
from __future__ import annotations

import os

import torch

from msd_engine.kv_cache import pack_mask
from msd_engine.ops.torch_ops import TorchOps


class TritonOps(TorchOps):
    name = "triton"

    def __init__(self, device: torch.device):
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"backend 'triton' needs a CUDA device (got {device}); on a CPU it runs only "
                               "under the Triton interpreter (TRITON_INTERPRET=1, slow, for tests)")
        # modules, not functions
        from msd_engine.triton_kernels import (draft_fc, kv_compact, lm_head_topk, rms_norm, rope_kv_write,
                                               silu_mul, tree_attention)
        self._rms_norm = rms_norm
        self._silu_mul = silu_mul
        self._tree_attention = tree_attention
        self._kv_compact = kv_compact
        self._draft_fc = draft_fc
        self._rope_kv_write = rope_kv_write
        self._lm_head_topk = lm_head_topk

    def rms_norm(self, x, weight, eps):
        return self._rms_norm.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        # The kernel adds into `residual` in place; callers own that buffer (see LlamaModel.forward).
        return self._rms_norm.add_rms_norm(x, residual, weight, eps), residual

    def silu_mul(self, gate_up):
        return self._silu_mul.silu_mul(gate_up)

    def attention(self, q, k_cache, v_cache, step):
        # The step's mask is bit-packed once (StepState.mask_bits) and shared by every layer.
        return self._tree_attention.tree_attention(q, k_cache, v_cache, step.prefix_len, step.mask_bits, step.region)

    def cached_attention(self, q, k_cache, v_cache, prefix_len, mask):
        region = q.shape[0] if mask is None else mask.shape[1]
        bits = None if mask is None else pack_mask(mask)
        return self._tree_attention.tree_attention(q, k_cache, v_cache, prefix_len, bits, region)

    def kv_compact(self, arena, start, nodes):
        self._kv_compact.kv_compact(arena, start, nodes)

    def draft_inputs(self, token_ids, embed, features, image_rows, is_image, fc_weight, fc_bias, bypass):
        return self._draft_fc.draft_fc(token_ids, embed, features, image_rows, is_image, fc_weight, fc_bias, bypass)

    def rope_kv_write(self, q, k, v, cos, sin, k_cache, v_cache, start):
        return self._rope_kv_write.rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, start)

    def logsoftmax_topk(self, hidden, weight, k):
        return self._lm_head_topk.logsoftmax_topk(hidden, weight, k)
