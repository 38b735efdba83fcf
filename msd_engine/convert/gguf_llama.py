"""Convert a Llama-architecture GGUF file (any quantisation gguf-py can dequantise) to a text-only model.

llama.cpp's converter permutes the rows of the q and k projections to suit its RoPE kernel (pairs
(i, i + d/2) become adjacent rows); `unpermute_rope` undoes it exactly as transformers' GGUF loader
does, giving back the HF (rotate-half) layout the engine uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from msd_engine.config import ModelConfig, TextConfig
from msd_engine.convert.common import ConversionError, check_destination, progress_bar, save_converted
from msd_engine.convert.hf_config import build_config
from msd_engine.convert.tokenizer_files import tokenizer_json_from_gguf

ARCH = "llama"
# GGUF tensor names -> converted names.
GGUF_GLOBAL = {
    "token_embd.weight": "text.embed_tokens.weight",
    "output_norm.weight": "text.norm.weight",
    "output.weight": "text.lm_head.weight",  # absent when the embeddings are tied
}
GGUF_LAYER = {
    "attn_norm.weight": "input_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
_REQUIRED = object()


class _Metadata:
    """Typed access to a GGUF file's key/value fields, with errors naming the file and key."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self.reader, self.path = reader, path

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise ConversionError(f"{self.path}: metadata key {key!r} missing")
            return default
        return field.contents()

    def integer(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.get(key, default)
        if value is not None and not isinstance(value, int):
            raise ConversionError(f"{self.path}: metadata {key} = {value!r} is not supported (expected one integer)")
        return value


def open_gguf(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ConversionError(f"{path}: corrupt or unreadable GGUF file ({exc})") from exc


def gguf_text_config(meta: _Metadata, tied: bool) -> TextConfig:
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise ConversionError(f"{meta.path}: general.architecture is {arch!r}; only {ARCH!r} GGUF files are supported")
    p = ARCH + "."
    if meta.integer(p + "expert_count", 0):
        raise ConversionError(f"{meta.path}: mixture-of-experts GGUF ({p}expert_count) is not supported")
    scaling = meta.get(p + "rope.scaling.type", "none")
    if scaling != "none":
        raise ConversionError(f"{meta.path}: RoPE scaling type {scaling!r} is not supported (only plain RoPE)")
    hidden, heads = meta.integer(p + "embedding_length"), meta.integer(p + "attention.head_count")
    head_dim = meta.integer(p + "attention.key_length", None) or meta.integer(p + "rope.dimension_count", None) \
        or hidden // heads
    rope_dims = meta.integer(p + "rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ConversionError(f"{meta.path}: partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    tokens = meta.get("tokenizer.ggml.tokens", [])
    try:
        return TextConfig(
            vocab_size=meta.integer(p + "vocab_size", None) or len(tokens),
            hidden_size=hidden,
            intermediate_size=meta.integer(p + "feed_forward_length"),
            num_layers=meta.integer(p + "block_count"),
            num_heads=heads,
            num_kv_heads=meta.integer(p + "attention.head_count_kv", heads),
            head_dim=head_dim,
            rms_norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon")),
            rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),  # llama.cpp's default base
            max_position_embeddings=meta.integer(p + "context_length"),
            tie_word_embeddings=tied,
        )
    except ValueError as exc:
        raise ConversionError(f"{meta.path}: {exc}") from exc


def gguf_special_tokens(meta: _Metadata) -> tuple[Optional[int], tuple[int, ...], str]:
    """(bos id or None when the tokenizer adds none, eos ids, prompt template)."""
    tokens = meta.get("tokenizer.ggml.tokens", [])
    eos = [meta.integer("tokenizer.ggml.eos_token_id")]
    template = meta.get("tokenizer.chat_template", "") or ""
    prompt = "vicuna_v1"
    if CHATML_START in template:
        prompt = "chatml"
        # ChatML turns end with <|im_end|>, which is often not the tokenizer's eos.
        if CHATML_END in tokens and tokens.index(CHATML_END) not in eos:
            eos.append(tokens.index(CHATML_END))
    # llama.cpp adds BOS by default only for SentencePiece ("llama") vocabularies.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model", "") == "llama")
    bos = meta.integer("tokenizer.ggml.bos_token_id", None) if add_bos else None
    return bos, tuple(eos), prompt


def unpermute_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's `permute` of a q/k projection ([n_head * head_dim, hidden])."""
    # llama.cpp: w.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2); this is its inverse
    # (transformers' LlamaTensorProcessor._reverse_permute_weights).
    rows = weight.shape[0]
    assert rows % (2 * n_head) == 0, (rows, n_head)
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_name_map(num_layers: int, tied: bool) -> dict[str, str]:
    names = {k: v for k, v in GGUF_GLOBAL.items() if not (tied and k == "output.weight")}
    for i in range(num_layers):
        names.update({f"blk.{i}.{s}": f"text.layers.{i}.{d}" for s, d in GGUF_LAYER.items()})
    return names


def _load_tensors(reader: GGUFReader, path: Path, text: TextConfig, dtype: torch.dtype,
                  progress: bool) -> dict[str, torch.Tensor]:
    names = gguf_name_map(text.num_layers, text.tie_word_embeddings)
    present = {t.name for t in reader.tensors}
    unexpected = sorted(present - set(names))
    if unexpected:
        raise ConversionError(f"{path}: unexpected tensor {unexpected[0]!r} (not part of a plain Llama model)")
    missing = [name for name in names if name not in present]
    if missing:
        raise ConversionError(f"{path}: missing tensor {missing[0]!r}")
    tensors = {}
    for t in progress_bar(reader.tensors, len(reader.tensors), "dequantising", progress):
        shape = tuple(int(n) for n in reversed(t.shape))  # numpy order is ggml's ne reversed
        try:
            # np.array copies: F32 tensors come back as views of the read-only file mapping.
            values = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError as exc:
            raise ConversionError(f"{path}: tensor {t.name!r}: {exc}") from exc
        weight = torch.from_numpy(values).reshape(shape)
        if t.name.endswith(".attn_q.weight"):
            weight = unpermute_rope(weight, text.num_heads)
        elif t.name.endswith(".attn_k.weight"):
            weight = unpermute_rope(weight, text.num_kv_heads)
        tensors[names[t.name]] = weight.to(dtype)  # cast now: float32 copies of a big model do not fit
    return tensors


def convert_gguf(src: Path, dst: Path, dtype: str = "float16", force: bool = False,
                 progress: bool = True) -> ModelConfig:
    """Convert Llama GGUF file `src` into a text-only msd-engine model directory `dst`."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file (GGUF model)")
    check_destination(dst, force, sources=[src])
    reader = open_gguf(src)
    meta = _Metadata(reader, src)
    tied = all(t.name != "output.weight" for t in reader.tensors)
    text = gguf_text_config(meta, tied)
    bos, eos, template = gguf_special_tokens(meta)
    config = build_config(str(src), text=text, bos_token_id=bos, eos_token_ids=eos, prompt_template=template,
                          dtype=dtype, name=src.stem)
    tensors = _load_tensors(reader, src, text, getattr(torch, dtype), progress)
    tokenizer_json = tokenizer_json_from_gguf(src)
    save_converted(dst, config, tensors, tokenizer_json, force, progress)
    return config
