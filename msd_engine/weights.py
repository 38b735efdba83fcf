"""The converted checkpoint: expected tensor names and shapes, and strict loading.

Every converter produces exactly `expected_shapes(config)`; loading checks the file against it and
names the first missing, unexpected or mis-shaped tensor.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import SafetensorError, safe_open

from msd_engine.config import ModelConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"

Shape = tuple[int, ...]


def hash_file(path: Path, digest: Optional["hashlib._Hash"] = None) -> "hashlib._Hash":
    """`digest` (a new sha256 if None) updated with the bytes of the file at `path`, read in blocks."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest


def _vision_shapes(config: ModelConfig) -> dict[str, Shape]:
    v = config.vision
    assert v is not None
    d, f = v.hidden_size, v.intermediate_size
    shapes: dict[str, Shape] = {
        "vision.patch_embed.weight": (d, 3, v.patch_size, v.patch_size),
        "vision.class_embed": (d,),
        "vision.pos_embed": (v.num_patches + 1, d),
        "vision.pre_norm.weight": (d,),
        "vision.pre_norm.bias": (d,),
    }
    for i in range(v.num_layers):
        p = f"vision.layers.{i}."
        for norm in ("norm1", "norm2"):
            shapes[p + norm + ".weight"] = (d,)
            shapes[p + norm + ".bias"] = (d,)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"attn.{proj}.weight"] = (d, d)
            shapes[p + f"attn.{proj}.bias"] = (d,)
        shapes[p + "mlp.fc1.weight"] = (f, d)
        shapes[p + "mlp.fc1.bias"] = (f,)
        shapes[p + "mlp.fc2.weight"] = (d, f)
        shapes[p + "mlp.fc2.bias"] = (d,)
    pr = config.projector
    assert pr is not None
    shapes["projector.linear1.weight"] = (pr.text_hidden_size, pr.vision_hidden_size)
    shapes["projector.linear1.bias"] = (pr.text_hidden_size,)
    shapes["projector.linear2.weight"] = (pr.text_hidden_size, pr.text_hidden_size)
    shapes["projector.linear2.bias"] = (pr.text_hidden_size,)
    return shapes


def _text_shapes(config: ModelConfig) -> dict[str, Shape]:
    t = config.text
    h, hd = t.hidden_size, t.head_dim
    shapes: dict[str, Shape] = {"text.embed_tokens.weight": (t.vocab_size, h), "text.norm.weight": (h,)}
    if not t.tie_word_embeddings:
        shapes["text.lm_head.weight"] = (t.vocab_size, h)
    for i in range(t.num_layers):
        p = f"text.layers.{i}."
        shapes[p + "input_norm.weight"] = (h,)
        shapes[p + "post_attention_norm.weight"] = (h,)
        shapes[p + "attn.q_proj.weight"] = (t.num_heads * hd, h)
        shapes[p + "attn.k_proj.weight"] = (t.num_kv_heads * hd, h)
        shapes[p + "attn.v_proj.weight"] = (t.num_kv_heads * hd, h)
        shapes[p + "attn.o_proj.weight"] = (h, t.num_heads * hd)
        shapes[p + "mlp.gate_proj.weight"] = (t.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (t.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, t.intermediate_size)
    return shapes


def expected_shapes(config: ModelConfig) -> dict[str, Shape]:
    """Every tensor of the converted format for `config`, name -> shape."""
    shapes = _text_shapes(config)
    if config.has_vision:
        shapes.update(_vision_shapes(config))
    return shapes


def check_tensor_set(names_and_shapes: dict[str, Shape], config: ModelConfig, source: str) -> None:
    """Raise ValueError naming the first missing, unexpected or mis-shaped tensor."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(names_and_shapes))
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r}" + _more(missing))
    unexpected = sorted(set(names_and_shapes) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor {unexpected[0]!r}" + _more(unexpected))
    for name, shape in expected.items():
        got = tuple(names_and_shapes[name])
        if got != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _cast(tensor: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)


def read_checked(path: Path, check: Callable[[dict[str, Shape], str], None], dtype: torch.dtype,
                 device: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file after `check(names_and_shapes, source)` has accepted its header."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            check(shapes, str(path))
            # floating tensors take the load dtype; integer ones (a draft's token-id list) keep theirs
            return {name: _cast(f.get_tensor(name), device, dtype) for name in shapes}
    except SafetensorError as exc:
        raise ValueError(f"{path}: corrupt or unreadable safetensors file ({exc})") from exc


def load_weights(model_dir: Path, config: ModelConfig, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Read `model.safetensors` strictly: all names and shapes must match `config`."""
    path = Path(model_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no weights file; is this a converted msd-engine model directory?")
    return read_checked(path, lambda shapes, source: check_tensor_set(shapes, config, source), dtype, device)
