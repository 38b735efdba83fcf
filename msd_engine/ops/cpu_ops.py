"""CPU backend: the torch op table with msd_engine._C's hand-written CPU kernels on the hot path.

At batch 1 a decode step streams every weight once; torch's CPU GEMV reaches a fraction of the
memory bandwidth on small M, while `native.linear` reads each weight row once for all (up to
SKINNY_ROWS) query rows at close to the read bandwidth. Larger M (prefill) is compute-bound and
stays with torch's GEMM.

Attention is `native.tree_attention` at every size: in a decode step the torch path (mask
expansion, GQA reshapes, SDPA dispatch) costs several times its few microseconds of arithmetic;
the kernel reads the packed mask and each K/V block once per kv head. Measured on SmolLM2 shapes
(2-core host) 26 -> 10 us per layer at T = 1, P = 200, 81 -> 27 us at T = 8, and still ahead in
prefill (11 -> 4 ms at T = 600). Acceptance compacts the cache with `native.kv_compact`, one
call for all layers. The draft head's input (gather + fc + bias + visual bypass) is one
`native.draft_inputs` call while its fc rows are skinny.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from msd_engine import native
from msd_engine.kv_cache import pack_mask
from msd_engine.native_decoder import DecoderLayerWeights, decoder_layers
from msd_engine.native_draft import MAX_ROWS, DraftHeadWeights, draft_extend, draft_tree
from msd_engine.ops.torch_ops import DecoderBlock, TorchOps

SKINNY_ROWS = 16  # up to this many rows the native kernel streams the weight once


def _skinny(t: torch.Tensor) -> bool:
    """A decode-sized step: at most SKINNY_ROWS rows of t's last dimension."""
    return (t.numel() // t.shape[-1] if t.shape[-1] else 0) <= SKINNY_ROWS


@dataclass(frozen=True)
class CpuDecoderBlock(DecoderBlock):
    native: Optional[DecoderLayerWeights] = None  # None: weights the kernel cannot take


class CpuOps(TorchOps):
    name = "cpu"

    def __init__(self, device: torch.device):
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpu' runs msd_engine._C's CPU kernels and needs device='cpu' (got {device})")
        if not native.is_built():
            raise RuntimeError("backend 'cpu': msd_engine._C is not built; run `pip install -e .` "
                               "or use backend='torch'")

    @contextlib.contextmanager
    def step_scope(self, num_tokens: int) -> Iterator[None]:
        """A skinny step's linears run on msd_engine._C's thread pool, which wants every core; the
        remaining small torch ops go single-threaded meanwhile, so torch's spinning OpenMP workers do
        not fight the pool for the cores (measured: 24.7 -> 22.7 ms per SmolLM2 float32 token)."""
        if num_tokens > SKINNY_ROWS:
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def prepare_decoder_layer(self, layer, next_norm, config):
        block = super().prepare_decoder_layer(layer, next_norm, config)
        try:
            native = DecoderLayerWeights(layer.qkv_proj, layer.o_proj, layer.post_attention_norm,
                                         layer.gate_up_proj, layer.down_proj, next_norm,
                                         num_heads=block.num_heads, num_kv_heads=block.num_kv_heads,
                                         head_dim=block.head_dim, rms_norm_eps=block.rms_norm_eps)
        except (TypeError, ValueError, AttributeError):
            native = None  # e.g. strided weights, or a _C built before the layer call: per-op path
        return CpuDecoderBlock(**vars(block), native=native)

    def decoder_layers(self, blocks, h, residual, step, cache):
        # A skinny step's layers are one native call each: the kernels the per-op path runs, in its
        # order (same bits), without ~10 returns to Python per layer. Those cost ~3 ms of a 15 ms
        # SmolLM2 bfloat16 step, and the gaps they left between linear calls let the pool's
        # workers fall asleep in tree verification (measured: 8-row step 22.6 -> 19.2 ms with
        # workers kept awake). What the layers share is checked once (per layer: ~0.2 ms of
        # Python a 30-layer step). Larger steps (prefill) keep the per-op path and torch's GEMMs.
        if (h.shape[0] > SKINNY_ROWS or h.stride(-1) != 1 or residual.stride(-1) != 1
                or any(block.native is None for block in blocks)):
            return super().decoder_layers(blocks, h, residual, step, cache)
        decoder_layers([block.native for block in blocks], h, residual, step.cos, step.sin,
                       cache.keys[:len(blocks)], cache.values[:len(blocks)], step.start,
                       step.prefix_len, step.mask_bits)
        return (None if blocks and blocks[-1].next_norm is None else h), residual

    def logsoftmax_topk(self, hidden, weight, k):
        # A draft step's few rows: the lm_head on the native linear, then log-softmax and top-k
        # in one native call over the logits (torch's log_softmax, topk and float() took ~155 us
        # for 4 rows of an 8192-token draft vocabulary, the kernel ~20 us).
        if not _skinny(hidden):
            return super().logsoftmax_topk(hidden, weight, k)
        return native.logsoftmax_topk(self.linear(hidden, weight), k)

    def native_draft_head(self, model, cache):
        # The draft head's per-round steps in C (msd_draft_extend_cpu, msd_draft_tree_cpu): the
        # kernels the Python path calls one by one, with the bookkeeping between them, in one call
        # (a drafting step 1117 -> 752 us in a loop, bf16 draft, tree (4,1,6)). Steps wider than
        # SKINNY_ROWS would take torch's GEMMs on the Python path: those stay there.
        native_layer = getattr(model.block, "native", None)
        if native_layer is None:
            return None
        try:
            head = DraftHeadWeights(native_layer, model.embed_tokens, model.fc_weight, model.fc_bias, model.lm_head,
                                    model.vocab_ids, model.cos, model.sin, cache.keys[0], cache.values[0])
        except (TypeError, ValueError):
            return None  # e.g. weights in mixed dtypes: the Python path handles those
        return NativeDraftHead(head)

    def attention(self, q, k_cache, v_cache, step):
        # The step's mask is bit-packed once (StepState.mask_bits) and shared by every layer.
        return native.tree_attention(q, k_cache, v_cache, step.prefix_len, step.mask_bits, step.region)

    def cached_attention(self, q, k_cache, v_cache, prefix_len, mask):
        region = q.shape[0] if mask is None else mask.shape[1]
        bits = None if mask is None else pack_mask(mask)
        return native.tree_attention(q, k_cache, v_cache, prefix_len, bits, region)

    def rope_kv_write(self, q, k, v, cos, sin, k_cache, v_cache, start):
        # One native call per layer in place of four torch ops (SmolLM2 shapes, T = 1: 31 -> 14 us);
        # past SKINNY_ROWS torch's vectorised elementwise ops win for bfloat16.
        if q.shape[0] > SKINNY_ROWS:
            return super().rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, start)
        return native.rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, start)

    def kv_compact(self, arena, start, nodes):
        native.kv_compact(arena, start, nodes)

    def draft_inputs(self, token_ids, embed, features, image_rows, is_image, fc_weight, fc_bias, bypass):
        # As in linear: up to SKINNY_ROWS fc rows the native kernel reads fc_weight once for all of
        # them (and skips bypassed image rows); more rows are a compute-bound GEMM, torch's.
        fc_rows = token_ids.shape[0]
        if bypass and is_image is not None:
            fc_rows -= int(is_image.sum())
        if fc_rows > SKINNY_ROWS:
            return super().draft_inputs(token_ids, embed, features, image_rows, is_image, fc_weight, fc_bias, bypass)
        return native.draft_inputs(token_ids, embed, features, image_rows, is_image, fc_weight, fc_bias, bypass)

    # RMSNorm and SwiGLU's product, one native call each while the step is skinny: as torch ops they
    # are several small kernels and temporaries per call, 90 calls per SmolLM2 token (about 2 ms of
    # a ~30 ms float32 token under cProfile on the earlier AMD host). Larger steps keep torch's
    # vectorised ops.
    def rms_norm(self, x, weight, eps):
        if not _skinny(x):
            return super().rms_norm(x, weight, eps)
        return native.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        if not _skinny(x):
            return super().add_rms_norm(x, residual, weight, eps)
        return native.add_rms_norm(x, residual, weight, eps), residual  # residual += x in place

    def silu_mul(self, gate_up):
        if not _skinny(gate_up):
            return super().silu_mul(gate_up)
        return native.silu_mul(gate_up)

    def linear(self, x, weight, bias=None):
        if not _skinny(x) or weight.stride(-1) != 1:
            return F.linear(x, weight, bias)
        return native.linear(x, weight, bias)


class NativeDraftHead:
    """`TorchOps.native_draft_head`'s steps on msd_engine._C; each returns None for a step it does not take."""

    def __init__(self, head: DraftHeadWeights):
        self.head = head

    # Only steps the Python path runs on the native kernels (SKINNY_ROWS rows or fewer): wider ones
    # take torch's GEMMs there, which would give other bits.
    def extend(self, token_ids, features, committed):
        if not 1 <= token_ids.shape[0] <= min(SKINNY_ROWS, MAX_ROWS):
            return None
        return draft_extend(self.head, token_ids, features.to(self.head.dtype), committed)

    def tree(self, last_hidden, committed, root_token, params):
        if params.top_k > min(SKINNY_ROWS, MAX_ROWS):
            return None
        return draft_tree(self.head, last_hidden, committed, root_token, params.top_k, params.depth,
                          params.total_tokens)
