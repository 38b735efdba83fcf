"""CUDA backend: the torch op table with the hand-written kernels of `msd_engine._C` swapped in.

Tree attention (flash-decoding split-KV) is compiled for the head dims in
`native.CUDA_ATTENTION_HEAD_DIMS` (LLaVA's 128, 64); a model with another head dim (the tiny test
models) runs the torch reference attention instead: a property of the model, so one model
runs one or the other throughout.

RoPE of q and k fused with the KV-cache write is one `native.rope_kv_write` launch per layer. The
draft head's input (embedding gather, fc over [row, feature] + bias, MSD's visual bypass) is
one `native.draft_inputs` launch that reads fc_weight once per block of rows.
"""
from __future__ import annotations

import torch

from msd_engine import native
from msd_engine.kv_cache import pack_mask
from msd_engine.ops.torch_ops import TorchOps


class CudaOps(TorchOps):
    name = "cuda"

    def __init__(self, device: torch.device):
        if device.type != "cuda":
            raise RuntimeError(f"backend 'cuda' runs the CUDA kernels of msd_engine._C and needs device='cuda' "
                               f"(got {device})")
        if not native.cuda_compiled():
            raise RuntimeError("backend 'cuda': msd_engine._C was built without CUDA (no nvcc at build time); "
                               "reinstall with MSD_ENGINE_CUDA=1 pip install -e .")

    def rope_kv_write(self, q, k, v, cos, sin, k_cache, v_cache, start):
        # One launch for rope(q), rope(k) into the cache and v into the cache (bit-identical to torch).
        return native.rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, start)

    def rms_norm(self, x, weight, eps):
        return native.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        # The kernel adds into `residual` in place; callers own that buffer (see LlamaModel.forward).
        return native.add_rms_norm(x, residual, weight, eps), residual

    def silu_mul(self, gate_up):
        return native.silu_mul(gate_up)

    def attention(self, q, k_cache, v_cache, step):
        if q.shape[-1] not in native.CUDA_ATTENTION_HEAD_DIMS:
            return super().attention(q, k_cache, v_cache, step)
        # The step's mask is bit-packed once (StepState.mask_bits) and shared by every layer.
        return native.tree_attention(q, k_cache, v_cache, step.prefix_len, step.mask_bits, step.region)

    def cached_attention(self, q, k_cache, v_cache, prefix_len, mask):
        if q.shape[-1] not in native.CUDA_ATTENTION_HEAD_DIMS:
            return super().cached_attention(q, k_cache, v_cache, prefix_len, mask)
        region = q.shape[0] if mask is None else mask.shape[1]
        bits = None if mask is None else pack_mask(mask)
        return native.tree_attention(q, k_cache, v_cache, prefix_len, bits, region)

    def kv_compact(self, arena, start, nodes):
        native.kv_compact(arena, start, nodes)

    def draft_inputs(self, token_ids, embed, features, image_rows, is_image, fc_weight, fc_bias, bypass):
        return native.draft_inputs(token_ids, embed, features, image_rows, is_image, fc_weight, fc_bias, bypass)
