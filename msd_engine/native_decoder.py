"""A whole Llama decoder layer as one CPU kernel call (`msd_decoder_layer_cpu`, csrc/).

`DecoderLayerWeights` checks a layer's weights once (at model load) and keeps them alive;
`decoder_layer` then runs the layer for a decode-sized step with a few cheap checks per call. The
results are those of the per-op calls in `msd_engine.native` (linear, rope_kv_write,
tree_attention, add_rms_norm, silu_mul) bit for bit: the kernel runs exactly those, in order,
without returning to Python between them.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from msd_engine import native
from msd_engine.native import _DTYPE_CODES, _cache_strides, _check_index, _lib


def _check_matrix(t: torch.Tensor, name: str, shape: tuple, ref: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_cpu:
        raise ValueError(f"decoder_layer runs on CPU tensors; {name} is on {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but qkv_weight has {ref.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {list(shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


class DecoderLayerWeights:
    """One layer's weights for `decoder_layer`, checked once; holds the tensors (their pointers
    are what the kernel reads). qkv_weight [(Hq + 2 Hkv) D, H] (q rows, k rows, v rows), o_weight
    [H, Hq D], gate_up_weight [2F, H] (gate rows, then up rows), down_weight [H, F], norms [H]
    (`next_norm`: the next layer's input norm or the final norm; None: none, as the draft head's
    layer). All CPU, one dtype, contiguous."""

    def __init__(self, qkv_weight: torch.Tensor, o_weight: torch.Tensor,
                 post_attention_norm: torch.Tensor, gate_up_weight: torch.Tensor,
                 down_weight: torch.Tensor, next_norm: Optional[torch.Tensor], *, num_heads: int,
                 num_kv_heads: int, head_dim: int, rms_norm_eps: float,
                 sm_scale: Optional[float] = None):
        lib = _lib()
        if qkv_weight.dtype not in _DTYPE_CODES:
            raise TypeError(f"qkv_weight has dtype {qkv_weight.dtype}; expected float32, float16 "
                            "or bfloat16")
        if qkv_weight.dim() != 2:
            raise ValueError(f"qkv_weight has shape {tuple(qkv_weight.shape)}; expected "
                             "[(Hq + 2 Hkv) * D, H]")
        for value, name in ((num_heads, "num_heads"), (num_kv_heads, "num_kv_heads"),
                            (head_dim, "head_dim")):
            _check_index(value, name, 1)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) is not a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary halves), got {head_dim}")
        if not math.isfinite(rms_norm_eps) or rms_norm_eps < 0:
            raise ValueError(f"rms_norm_eps must be finite and >= 0, got {rms_norm_eps}")
        if sm_scale is not None and not math.isfinite(sm_scale):
            raise ValueError(f"sm_scale must be finite, got {sm_scale}")
        hidden = qkv_weight.shape[1]
        inter = down_weight.shape[-1] if down_weight.dim() == 2 else -1
        expected = {"qkv_weight": (qkv_weight, ((num_heads + 2 * num_kv_heads) * head_dim, hidden)),
                    "o_weight": (o_weight, (hidden, num_heads * head_dim)),
                    "post_attention_norm": (post_attention_norm, (hidden,)),
                    "gate_up_weight": (gate_up_weight, (2 * inter, hidden)),
                    "down_weight": (down_weight, (hidden, inter))}
        if next_norm is not None:
            expected["next_norm"] = (next_norm, (hidden,))
        for name, (tensor, shape) in expected.items():
            _check_matrix(tensor, name, shape, qkv_weight)
        self.tensors = (qkv_weight, o_weight, post_attention_norm, gate_up_weight, down_weight,
                        next_norm)
        self.dtype, self.code = qkv_weight.dtype, _DTYPE_CODES[qkv_weight.dtype]
        self.hidden, self.head_dim, self.num_kv_heads = hidden, head_dim, num_kv_heads
        scale = head_dim ** -0.5 if sm_scale is None else float(sm_scale)  # as tree_attention's
        # The C side checks the sizes again on every call (cheaply); here a bad layer fails at load.
        self.layer = lib.DecoderLayer(*(0 if t is None else t.data_ptr() for t in self.tensors),
                                      hidden, num_heads, num_kv_heads, head_dim, inter,
                                      float(rms_norm_eps), scale)


def _check_rows(t: torch.Tensor, name: str, rows: int, width: int, dtype: torch.dtype) -> int:
    """Row stride of `t [rows, width]` (CPU, dtype, contiguous rows)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype or not t.is_cpu:
        raise TypeError(f"{name} is {t.dtype} on {t.device}; the layer's weights are {dtype} on cpu")
    if t.dim() != 2 or t.shape[0] != rows or t.shape[1] != width:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{rows}, {width}]")
    if t.stride(1) != 1 and width > 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    return t.stride(0) if rows > 1 else width


def decoder_layer(weights: DecoderLayerWeights, h: torch.Tensor, residual: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, start: int, prefix_len: int,
                  mask_bits: Optional[torch.Tensor] = None, num_threads: int = 0) -> None:
    """In place: `h [T, H]` (the layer's normed input) becomes the next layer's normed input
    (or, without next_norm, is left holding the MLP's input) and `residual [T, H]` the residual
    stream after the layer; the layer's K/V go to slots [start, start + T) of `k_cache` /
    `v_cache [Hkv, S, D]` (equal strides). Attention sees slots [0, prefix_len) and, through
    `mask_bits` (int32 [T, ceil(region / 32)] from `pack_mask`, region = start + T - prefix_len;
    None: all), the rest up to start + T. cos / sin [T, D] at the tokens' positions."""
    decoder_layers([weights], h, residual, cos, sin, [k_cache], [v_cache], start, prefix_len,
                   mask_bits, num_threads)


def _check_layers(layers: Sequence[DecoderLayerWeights], k_caches: Sequence[torch.Tensor],
                  v_caches: Sequence[torch.Tensor]) -> None:
    """One model's layers (dtype, sizes as layers[0]'s), a cache pair for each."""
    if len(k_caches) != len(layers) or len(v_caches) != len(layers):
        raise ValueError(f"{len(layers)} layers need as many k_caches and v_caches, got "
                         f"{len(k_caches)} and {len(v_caches)}")
    first = layers[0]
    for i, w in enumerate(layers):
        if not isinstance(w, DecoderLayerWeights):
            raise TypeError(f"layers[{i}] must be DecoderLayerWeights, got {type(w).__name__}")
        if (w.dtype, w.hidden, w.head_dim, w.num_kv_heads) != (first.dtype, first.hidden, first.head_dim,
                                                                first.num_kv_heads):
            raise ValueError(f"layers[{i}] ({w.dtype}, hidden {w.hidden}, head_dim {w.head_dim}, "
                             f"{w.num_kv_heads} kv heads) differs from layers[0] ({first.dtype}, hidden "
                             f"{first.hidden}, head_dim {first.head_dim}, {first.num_kv_heads} kv heads)")


def _check_cache_type(cache, name: str, layer: int, dtype: torch.dtype) -> None:
    if not isinstance(cache, torch.Tensor) or cache.dtype != dtype or not cache.is_cpu:
        raise TypeError(f"{name} of layer {layer} must be a {dtype} CPU tensor, got "
                        f"{getattr(cache, 'dtype', type(cache).__name__)}"
                        f"{' on ' + str(cache.device) if isinstance(cache, torch.Tensor) else ''}")


def _check_caches(first: DecoderLayerWeights, k_caches: Sequence[torch.Tensor],
                  v_caches: Sequence[torch.Tensor]) -> tuple[int, int, int]:
    """(slots, head stride, slot stride) of layer 0's k_cache, which every cache must share.
    Views of one arena (KVCache's) match layer 0's shape and strides exactly, which is all the
    loop compares; anything else gets the full checks (measured: 67 -> 29 us for 60 caches)."""
    dtype, k_cache = first.dtype, k_caches[0]
    _check_cache_type(k_cache, "k_cache", 0, dtype)
    if k_cache.dim() != 3 or k_cache.shape[0] != first.num_kv_heads or k_cache.shape[2] != first.head_dim \
            or k_cache.stride(2) != 1:
        raise ValueError(f"k_cache has shape {tuple(k_cache.shape)} strides {k_cache.stride()}; expected "
                         f"[{first.num_kv_heads}, S, {first.head_dim}] contiguous in the last dim")
    shape, raw_strides, strides = k_cache.shape, k_cache.stride(), _cache_strides(k_cache)
    for i, pair in enumerate(zip(k_caches, v_caches)):
        for cache, name in zip(pair, ("k_cache", "v_cache")):
            if (isinstance(cache, torch.Tensor) and cache.dtype == dtype and cache.shape == shape
                    and cache.stride() == raw_strides and cache.is_cpu):
                continue
            _check_cache_type(cache, name, i, dtype)
            if cache.shape != shape or cache.stride(2) != 1 or _cache_strides(cache) != strides:
                raise ValueError(f"{name} of layer {i} (shape {tuple(cache.shape)}, strides {cache.stride()}) "
                                 f"must match k_cache of layer 0 (shape {tuple(shape)}, strides "
                                 f"{k_cache.stride()})")
    return shape[1], *strides


def _check_mask(mask_bits: Optional[torch.Tensor], t: int, start: int, prefix_len: int) -> int:
    """The mask's pointer (0 for None) after checking start / prefix_len and its shape."""
    _check_index(start, "start", 0)
    if _check_index(prefix_len, "prefix_len", 0) > start:  # before mask_bits, whose shape needs it
        raise ValueError(f"prefix_len ({prefix_len}) must be in [0, start = {start}]")
    if mask_bits is None:
        return 0
    words = (start + t - prefix_len + 31) // 32
    if (not isinstance(mask_bits, torch.Tensor) or mask_bits.dtype != torch.int32
            or tuple(mask_bits.shape) != (t, words) or not mask_bits.is_contiguous()
            or not mask_bits.is_cpu):
        raise ValueError(f"mask_bits must be a contiguous int32 CPU tensor [{t}, {words}] "
                         f"(pack_mask), got {getattr(mask_bits, 'dtype', type(mask_bits))} "
                         f"{tuple(getattr(mask_bits, 'shape', ()))}")
    return mask_bits.data_ptr()


def decoder_layers(layers: Sequence[DecoderLayerWeights], h: torch.Tensor, residual: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, k_caches: Sequence[torch.Tensor],
                   v_caches: Sequence[torch.Tensor], start: int, prefix_len: int,
                   mask_bits: Optional[torch.Tensor] = None, num_threads: int = 0) -> None:
    """`decoder_layer` for each of `layers` in turn, layer i on `k_caches[i]` / `v_caches[i]`, h and
    residual carried from one to the next. What is the same for every layer of the step (h,
    residual, the tables, the mask, start / prefix_len) is checked once; each layer's caches must
    have the first layer's shape and strides. Per layer this costs one native call and a few
    attribute reads (checking each layer in full cost ~7 us a layer, ~0.2 ms a 30-layer step).
    The native call's own argument checks depend only on what every layer shares, so an argument
    it refuses is refused at layer 0, before anything is written; a failure to grow its scratch
    (out of memory) can still come after earlier layers were written."""
    if not layers:
        if k_caches or v_caches:
            raise ValueError(f"0 layers need as many k_caches and v_caches, got {len(k_caches)} and "
                             f"{len(v_caches)}")
        return
    _check_layers(layers, k_caches, v_caches)
    first = layers[0]
    dtype = first.dtype
    if not isinstance(h, torch.Tensor) or h.dim() != 2:
        raise ValueError(f"h must be a [T, {first.hidden}] tensor, got "
                         f"{tuple(getattr(h, 'shape', ())) or type(h).__name__}")
    t = h.shape[0]
    h_stride = _check_rows(h, "h", t, first.hidden, dtype)
    r_stride = _check_rows(residual, "residual", t, first.hidden, dtype)
    table_stride = _check_rows(cos, "cos", t, first.head_dim, dtype)
    if _check_rows(sin, "sin", t, first.head_dim, dtype) != table_stride:
        cos, sin = cos.contiguous(), sin.contiguous()
        table_stride = first.head_dim
    slots, head_stride, slot_stride = _check_caches(first, k_caches, v_caches)
    mask_ptr = _check_mask(mask_bits, t, start, prefix_len)
    if t == 0:
        return
    run = native._C.decoder_layer_cpu
    h_ptr, r_ptr, cos_ptr, sin_ptr = h.data_ptr(), residual.data_ptr(), cos.data_ptr(), sin.data_ptr()
    for w, k, v in zip(layers, k_caches, v_caches):
        run(w.layer, h_ptr, r_ptr, t, h_stride, r_stride, cos_ptr, sin_ptr, table_stride, k.data_ptr(),
            v.data_ptr(), slots, head_stride, slot_stride, start, prefix_len, mask_ptr, w.code, num_threads)
