"""The draft head's per-round steps as one CPU kernel call each (`msd_draft_extend_cpu`,
`msd_draft_tree_cpu`).

`DraftHeadWeights` checks the draft head's tensors and its KV cache once (when the drafter is
built) and keeps them alive; `draft_extend` and `draft_tree` then run with a few cheap checks. They
compute what `TreeDrafter.extend` and `TreeDrafter.draft` compute from the per-call kernels
(`native.draft_inputs`, `native_decoder.decoder_layers`, `native.linear`, `native.logsoftmax_topk`):
the C code runs those kernels on the same operands and ranks candidates the same way, without the
Python between them (~0.4 ms a drafting step, ~0.2 ms a commit).
"""
from __future__ import annotations

from typing import Optional

import torch

from msd_engine.native import _DTYPE_CODES, _cache_strides, _check_index, _lib
from msd_engine.native_decoder import DecoderLayerWeights

MAX_ROWS = 16  # the most rows (top_k, committed tokens) the C steps take


def _check(t: Optional[torch.Tensor], name: str, shape: tuple, dtype: torch.dtype) -> int:
    """t's data pointer (0 for None) after checking it is a contiguous CPU `dtype` tensor of `shape`."""
    if t is None:
        return 0
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype or not t.is_cpu:
        raise TypeError(f"{name} is {t.dtype} on {t.device}; expected {dtype} on cpu")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {list(shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    return t.data_ptr()


class DraftHeadWeights:
    """The draft head's tensors for `draft_tree`, checked once: its layer (`DecoderLayerWeights`
    without a next norm), embed [V, H] (the target's), fc_weight [H, 2H], fc_bias [H] or None,
    lm_head [Vd, H] and vocab_ids [Vd] (int64 target ids of lm_head's rows, or None when Vd = V),
    the rotary tables cos / sin [P, D], and the draft's one-layer KV cache k_cache / v_cache
    [Hkv, S, D] (views of one arena, as KVCache gives). All CPU, one dtype, contiguous rows."""

    def __init__(self, layer: DecoderLayerWeights, embed: torch.Tensor, fc_weight: torch.Tensor,
                 fc_bias: Optional[torch.Tensor], lm_head: torch.Tensor, vocab_ids: Optional[torch.Tensor],
                 cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        lib = _lib()
        if not isinstance(layer, DecoderLayerWeights):
            raise TypeError(f"layer must be DecoderLayerWeights, got {type(layer).__name__}")
        if layer.tensors[-1] is not None:
            raise ValueError("the draft layer must have no next_norm (the draft head ends without a norm)")
        dtype, hidden, head_dim = layer.dtype, layer.hidden, layer.head_dim
        if not isinstance(embed, torch.Tensor) or embed.dim() != 2 or embed.shape[1] != hidden:
            raise ValueError(f"embed has shape {tuple(getattr(embed, 'shape', ()))}; expected [V, {hidden}]")
        if not isinstance(lm_head, torch.Tensor) or lm_head.dim() != 2 or lm_head.shape[1] != hidden:
            raise ValueError(f"lm_head has shape {tuple(getattr(lm_head, 'shape', ()))}; expected [Vd, {hidden}]")
        if not isinstance(cos, torch.Tensor) or cos.dim() != 2:
            raise ValueError(f"cos has shape {tuple(getattr(cos, 'shape', ()))}; expected [P, {head_dim}]")
        vocab, draft_vocab, positions = embed.shape[0], lm_head.shape[0], cos.shape[0]
        if vocab_ids is None and draft_vocab != vocab:
            raise ValueError(f"lm_head has {draft_vocab} rows but embed {vocab}: pass the rows' vocab_ids")
        if vocab_ids is not None:
            _check(vocab_ids, "vocab_ids", (draft_vocab,), torch.int64)
            if draft_vocab and not (0 <= int(vocab_ids.min()) and int(vocab_ids.max()) < vocab):
                raise ValueError(f"vocab_ids must lie in [0, {vocab}) (the embedding's rows)")
        pointers = [_check(t, name, shape, dtype) for t, name, shape in (
            (embed, "embed", (vocab, hidden)), (fc_weight, "fc_weight", (hidden, 2 * hidden)),
            (fc_bias, "fc_bias", (hidden,)), (lm_head, "lm_head", (draft_vocab, hidden)),
            (cos, "cos", (positions, head_dim)), (sin, "sin", (positions, head_dim)))]
        for cache, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
            if not isinstance(cache, torch.Tensor) or cache.dtype != dtype or not cache.is_cpu:
                raise TypeError(f"{name} must be a {dtype} CPU tensor")
            if (cache.dim() != 3 or cache.shape[0] != layer.num_kv_heads or cache.shape[2] != head_dim
                    or cache.stride(2) != 1 or cache.shape != k_cache.shape or cache.stride() != k_cache.stride()):
                raise ValueError(f"{name} has shape {tuple(cache.shape)} strides {cache.stride()}; expected "
                                 f"[{layer.num_kv_heads}, S, {head_dim}], contiguous rows, k_cache's strides")
        self.tensors = (layer, embed, fc_weight, fc_bias, lm_head, vocab_ids, cos, sin, k_cache, v_cache)
        self.dtype, self.code, self.hidden = dtype, _DTYPE_CODES[dtype], hidden
        self.num_slots = k_cache.shape[1]
        self.head = lib.DraftHead(layer.layer, pointers[0], vocab, pointers[1], pointers[2], pointers[3],
                                  0 if vocab_ids is None else vocab_ids.data_ptr(), draft_vocab,
                                  pointers[4], pointers[5], positions, k_cache.data_ptr(), v_cache.data_ptr(),
                                  self.num_slots, *_cache_strides(k_cache), self.code)


def draft_tree(head: DraftHeadWeights, last_hidden: torch.Tensor, committed: int, root_token: int,
               top_k: int, depth: int, total_tokens: int, num_threads: int = 0) -> tuple[torch.Tensor, list[int]]:
    """One drafting step: (node tokens [T] int64; node parents, -1 for the root), the
    tree `TreeDrafter.draft` builds for these parameters. last_hidden [H] is the draft's output at the
    last committed position; scratch KV slots committed .. committed + depth * top_k are written."""
    if not isinstance(last_hidden, torch.Tensor) or last_hidden.dtype != head.dtype or not last_hidden.is_cpu \
            or tuple(last_hidden.shape) != (head.hidden,) or not last_hidden.is_contiguous():
        raise ValueError(f"last_hidden must be a contiguous {head.dtype} CPU tensor [{head.hidden}], got "
                         f"{getattr(last_hidden, 'dtype', type(last_hidden).__name__)} "
                         f"{tuple(getattr(last_hidden, 'shape', ()))}")
    for value, name, low in ((committed, "committed", 0), (top_k, "top_k", 1), (depth, "depth", 0),
                             (total_tokens, "total_tokens", 1), (root_token, "root_token", 0)):
        _check_index(value, name, low)
    if top_k > MAX_ROWS:
        raise ValueError(f"top_k must be <= {MAX_ROWS} for the native drafting step, got {top_k}")
    most = min(total_tokens, 1 + top_k + depth * top_k * top_k)
    out = torch.empty(2 * most + 1, dtype=torch.int64)  # tokens | parents | node count
    tokens, parents = out[:most], out[most:2 * most]
    _lib().draft_tree_cpu(head.head, last_hidden.data_ptr(), committed, root_token, top_k, depth, total_tokens,
                          tokens.data_ptr(), parents.data_ptr(), out[-1:].data_ptr(), num_threads)
    n = int(out[-1])
    return tokens[:n], parents[:n].tolist()


def draft_extend(head: DraftHeadWeights, token_ids: torch.Tensor, features: torch.Tensor, committed: int,
                 num_threads: int = 0) -> torch.Tensor:
    """Commit m (1..16) text tokens at positions committed.. (cache slots committed..committed + m):
    token_ids int64 [m], features [m, H] in the head's dtype (contiguous rows) -> the draft's hidden
    [m, H], as `TreeDrafter.extend` computes them."""
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype != torch.int64 or token_ids.dim() != 1 \
            or not token_ids.is_cpu:
        raise TypeError(f"token_ids must be a 1-D int64 CPU tensor, got "
                        f"{getattr(token_ids, 'dtype', type(token_ids).__name__)}")
    m = token_ids.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"draft_extend commits 1..{MAX_ROWS} tokens, got {m}")
    if not isinstance(features, torch.Tensor) or features.dtype != head.dtype or not features.is_cpu \
            or tuple(features.shape) != (m, head.hidden) or features.stride(1) != 1:
        raise ValueError(f"features must be {head.dtype} CPU [{m}, {head.hidden}] with contiguous rows, got "
                         f"{getattr(features, 'dtype', type(features).__name__)} "
                         f"{tuple(getattr(features, 'shape', ()))}")
    _check_index(committed, "committed", 0)
    token_ids = token_ids.contiguous()
    hidden = torch.empty(m, head.hidden, dtype=head.dtype)
    _lib().draft_extend_cpu(head.head, token_ids.data_ptr(), features.data_ptr(), m,
                            features.stride(0) if m > 1 else head.hidden, committed, hidden.data_ptr(), head.hidden,
                            num_threads)
    return hidden
