"""`msd-engine convert msd-draft SRC DST`: a released MSD/EAGLE draft checkpoint -> converted draft.

SRC = `config.json` (Llama-style keys, num_hidden_layers 1) + `model.safetensors` or
`pytorch_model.bin` (read with weights_only=True: a pickle that wants to run code is refused), with
the released key names (`embed_tokens.weight`, `fc.{weight,bias}`, `layers.0.*`). The converted
draft keeps those names; its config records the mode (`msd` decoupled, or `eagle`).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from msd_engine.config import DTYPES
from msd_engine.convert.common import ConversionError, atomic_output_dir, check_destination, progress_bar, read_checkpoint, read_json, require_dir
from msd_engine.convert.hf_config import LLAMA_DEFAULTS, hf_get, rope_theta
from msd_engine.draft.config import DraftConfig
from msd_engine.draft.weights import DRAFT_WEIGHTS_FILE, check_draft_tensors, draft_expected_shapes
from msd_engine.weights import CONFIG_FILE

# Keys some EAGLE-style checkpoints carry that the draft does not use.
IGNORED_KEYS = {"layers.0.self_attn.rotary_emb.inv_freq"}


def draft_config_from_hf(hf: Mapping, where: str, mode: str, dtype: str) -> DraftConfig:
    layers = hf.get("num_hidden_layers", 1)
    if layers != 1:
        raise ConversionError(f"{where}: num_hidden_layers={layers}; an MSD/EAGLE draft has exactly 1 layer")
    if hf_get(hf, "hidden_act", LLAMA_DEFAULTS) != "silu":
        raise ConversionError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    heads = int(hf_get(hf, "num_attention_heads", LLAMA_DEFAULTS))
    try:
        return DraftConfig(hidden_size=int(hf_get(hf, "hidden_size", LLAMA_DEFAULTS)),
                           intermediate_size=int(hf_get(hf, "intermediate_size", LLAMA_DEFAULTS)),
                           num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                           vocab_size=int(hf_get(hf, "vocab_size", LLAMA_DEFAULTS)),
                           rms_norm_eps=float(hf_get(hf, "rms_norm_eps", LLAMA_DEFAULTS)),
                           rope_theta=rope_theta(hf, where), head_dim=int(hf.get("head_dim") or 0),
                           mode=mode, dtype=dtype, draft_vocab_size=int(hf.get("draft_vocab_size") or 0))
    except ValueError as exc:
        raise ConversionError(f"{where}: {exc}") from exc


def save_draft(dst: Path, config: DraftConfig, tensors: Mapping[str, torch.Tensor], force: bool,
               progress: bool = False) -> None:
    """Validate, cast to config.dtype and write a converted draft directory atomically."""
    check_draft_tensors({k: tuple(v.shape) for k, v in tensors.items()}, config, str(dst))
    dtype = getattr(torch, config.dtype)
    # floating tensors take config.dtype; the int64 draft vocabulary (token ids) stays as it is
    out = {name: (tensors[name].to(dtype) if tensors[name].is_floating_point() else tensors[name]).contiguous()
           for name in progress_bar(draft_expected_shapes(config), len(tensors), "draft", progress)}
    with atomic_output_dir(dst, force) as tmp:
        config.save(tmp / CONFIG_FILE)
        save_file(out, str(tmp / DRAFT_WEIGHTS_FILE), metadata={"format": "msd-engine-draft"})
        shutil.copymode(tmp / CONFIG_FILE, tmp / DRAFT_WEIGHTS_FILE)  # safetensors writes 0600


def convert_msd_draft(src: Path, dst: Path, mode: str = "msd", dtype: str = "float16", force: bool = False,
                      progress: bool = True) -> DraftConfig:
    src = require_dir(src, "draft checkpoint")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} not one of {DTYPES}")
    check_destination(dst, force, sources=[src])
    config = draft_config_from_hf(read_json(src / CONFIG_FILE), str(src / CONFIG_FILE), mode, dtype)
    tensors = {k: v for k, v in read_checkpoint(src).items() if k not in IGNORED_KEYS}
    try:
        check_draft_tensors({k: tuple(v.shape) for k, v in tensors.items()}, config, str(src))
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    save_draft(dst, config, tensors, force, progress)
    return config
