"""Shared pieces of the offline converters: errors, atomic output, source readers, HF name maps.

Every converter reads a source checkpoint, renames its tensors with an explicit map (unknown or
missing names are errors naming the key), builds a `ModelConfig`, and hands both to
`save_converted`, which validates them against `msd_engine.weights` before writing anything.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from msd_engine.config import FORMAT_NAME, ModelConfig
from msd_engine.convert.tokenizer_files import ensure_added_token, tokenizer_json_from_sentencepiece
from msd_engine.weights import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, Shape, check_tensor_set

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

T = TypeVar("T")


class ConversionError(ValueError):
    """A source or destination that cannot be converted; the message names the file or key."""


# ----------------------------------------------------------------------------- destination

def check_destination(dst: Path, force: bool, sources: Iterable[Path] = ()) -> None:
    """Refuse a non-empty DST without `force`, and a DST that would swallow a source."""
    dst = Path(dst)
    for src in sources:
        s, d = Path(src).resolve(), dst.resolve()
        if d == s or d in s.parents:
            raise ConversionError(f"{dst}: destination contains the source {src}; choose another directory")
    occupied = dst.is_symlink() or (dst.exists() and (not dst.is_dir() or any(dst.iterdir())))
    if occupied and not force:
        raise ConversionError(f"{dst}: destination exists and is not empty; use --force to replace it")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


@contextlib.contextmanager
def atomic_output_dir(dst: Path, force: bool) -> Iterator[Path]:
    """Yield an empty temporary sibling of `dst`; move it into place on success, delete it on failure.

    An existing `dst` is only touched once everything is written, and then only by renames: it is
    moved aside, the new directory renamed into place, and the old one deleted. Any exception
    (KeyboardInterrupt included) before that leaves `dst` as it was and no temporary directory.
    """
    dst = Path(dst)
    check_destination(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    _remove(tmp)  # left by a killed run that had the same pid
    tmp.mkdir()
    try:
        yield tmp
        _commit(tmp, dst)
    except BaseException:
        _remove(tmp)
        raise


def _commit(tmp: Path, dst: Path) -> None:
    if not (dst.exists() or dst.is_symlink()):
        os.rename(tmp, dst)
        return
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    _remove(old)
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    _remove(old)


def progress_bar(items: Iterable[T], total: int, desc: str, enabled: bool) -> Iterable[T]:
    """A tqdm bar on stderr, shown only when asked for and stderr is a terminal."""
    return tqdm(items, total=total, desc=desc, unit="tensor", leave=False,
                disable=not (enabled and sys.stderr.isatty()))


# ----------------------------------------------------------------------------- source files

def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory ({what})")
    return path


def read_json(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from exc
    except OSError as exc:
        raise ConversionError(f"{path}: unreadable ({exc.strerror or exc})") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_optional_json(path: Path) -> Optional[dict[str, Any]]:
    return read_json(path) if Path(path).is_file() else None


def read_checkpoint(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF-style checkpoint directory, memory-mapped (read from disk when used).

    Safetensors (sharded through its index, or one file) is preferred over pytorch_model*.bin.
    """
    src = Path(src)
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS_FILE), (BIN_INDEX, BIN_FILE)):
        if (src / index_name).is_file():
            return _read_sharded(src / index_name)
        if (src / single_name).is_file():
            return read_weights_file(src / single_name)
    raise FileNotFoundError(f"{src}: no weights found (expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, "
                            f"{BIN_FILE} or {BIN_INDEX})")


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index_path}: no 'weight_map' in the shard index")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise ConversionError(f"{index_path}: names shard {shard!r}, which does not exist")
        for name, tensor in read_weights_file(shard_path).items():
            if name in tensors:
                raise ConversionError(f"{shard_path}: tensor {name!r} also appears in another shard")
            tensors[name] = tensor
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ConversionError(f"{index_path}: tensor {missing[0]!r} is listed in the index but in none of its shards")
    return tensors


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return _read_torch_pickle(path)
    raise ConversionError(f"{path}: unknown weights file type {path.suffix!r}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ConversionError(f"{path}: corrupt or unreadable safetensors file ({exc})") from exc


def _read_torch_pickle(path: Path) -> dict[str, torch.Tensor]:
    # Legacy (pre-1.6, non-zip) checkpoints cannot be memory-mapped; they load fully instead.
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise ConversionError(
            f"{path}: refused to unpickle: not a plain weights file (it is corrupt, or holds objects that "
            f"would run code when loaded: {_unpickling_reason(exc)}); convert it to safetensors from a "
            "trusted environment") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ConversionError(f"{path}: corrupt or unreadable PyTorch checkpoint ({exc})") from exc
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise ConversionError(f"{path}: expected a flat dict of name -> tensor, got {type(obj).__name__}")
    return obj


def _unpickling_reason(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # torch's message opens with advice to retry with weights_only=False; keep only the cause.
    return next((line for line in lines if "GLOBAL" in line), lines[-1] if lines else type(exc).__name__)


def load_tokenizer_json(src: Path, image_token: Optional[str], image_token_id: Optional[int]) -> str:
    """tokenizer.json (copied) or tokenizer.model (converted) of `src`, with the image token added."""
    src = Path(src)
    json_path, spm_path = src / TOKENIZER_FILE, src / "tokenizer.model"
    try:
        if json_path.is_file():
            text = json_path.read_text(encoding="utf-8")
        elif spm_path.is_file():
            text = tokenizer_json_from_sentencepiece(spm_path)
        else:
            raise FileNotFoundError(f"{src}: no {TOKENIZER_FILE} or tokenizer.model")
        if image_token is not None and image_token_id is not None:
            text = ensure_added_token(text, image_token, image_token_id)
    except (OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ConversionError(f"{src}: tokenizer: {exc}") from exc
    return text


# ----------------------------------------------------------------------------- name maps

# One HF Llama decoder layer: source suffix -> converted suffix (under text.layers.{i}.).
HF_LLAMA_LAYER = {
    "input_layernorm.weight": "input_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
# The HF CLIP vision tower outside its layers: source suffix -> converted name.
HF_CLIP_EMBED = {
    "embeddings.patch_embedding.weight": "vision.patch_embed.weight",
    "embeddings.class_embedding": "vision.class_embed",
    "embeddings.position_embedding.weight": "vision.pos_embed",
    "pre_layrnorm.weight": "vision.pre_norm.weight",
    "pre_layrnorm.bias": "vision.pre_norm.bias",
}
# One HF CLIP encoder layer: source suffix -> converted suffix (under vision.layers.{i}.).
HF_CLIP_LAYER = {
    **{f"layer_norm{n}.{p}": f"norm{n}.{p}" for n in (1, 2) for p in ("weight", "bias")},
    **{f"self_attn.{s}_proj.{p}": f"attn.{s}_proj.{p}" for s in "qkv" for p in ("weight", "bias")},
    **{f"self_attn.out_proj.{p}": f"attn.o_proj.{p}" for p in ("weight", "bias")},
    **{f"mlp.fc{n}.{p}": f"mlp.fc{n}.{p}" for n in (1, 2) for p in ("weight", "bias")},
}
# Present in CLIP checkpoints but unused: LLaVA reads a hidden state before post_layernorm, and
# position_ids is a buffer (arange) that older transformers saved.
HF_CLIP_UNUSED = ("embeddings.position_ids", "post_layernorm.weight", "post_layernorm.bias")


def llama_name_map(prefix: str, num_layers: int) -> dict[str, str]:
    """HF Llama body under `prefix` (embeddings, layers, final norm; not lm_head) -> converted names."""
    names = {prefix + "embed_tokens.weight": "text.embed_tokens.weight", prefix + "norm.weight": "text.norm.weight"}
    for i in range(num_layers):
        names.update({f"{prefix}layers.{i}.{s}": f"text.layers.{i}.{d}" for s, d in HF_LLAMA_LAYER.items()})
    return names


def llama_unused(prefix: str, num_layers: int) -> set[str]:
    # RoPE inverse-frequency buffers that transformers 4.3x saved; recomputed from rope_theta.
    return {prefix + "rotary_emb.inv_freq"} | {f"{prefix}layers.{i}.self_attn.rotary_emb.inv_freq"
                                               for i in range(num_layers)}


def clip_name_map(prefix: str, num_layers: int) -> dict[str, str]:
    """HF CLIP vision tower under `prefix` -> converted names."""
    names = {prefix + s: d for s, d in HF_CLIP_EMBED.items()}
    for i in range(num_layers):
        names.update({f"{prefix}encoder.layers.{i}.{s}": f"vision.layers.{i}.{d}" for s, d in HF_CLIP_LAYER.items()})
    return names


def clip_unused(prefix: str) -> set[str]:
    return {prefix + s for s in HF_CLIP_UNUSED}


def rename_tensors(source: Mapping[str, torch.Tensor], name_map: Mapping[str, str], expected: Mapping[str, Shape],
                   where: str, unused: Iterable[str] = (),
                   unused_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Apply `name_map` (source -> converted name); every source tensor must be mapped or listed unused.

    Shapes are checked against `expected` (converted name -> shape) so errors name the source key.
    """
    unused = set(unused)
    missing = [name for name in name_map if name not in source]
    if missing:
        raise ConversionError(f"{where}: missing tensor {missing[0]!r}" + _more(missing))
    unexpected = sorted(name for name in source
                        if name not in name_map and name not in unused and not name.startswith(unused_prefixes))
    if unexpected:
        raise ConversionError(f"{where}: unexpected tensor {unexpected[0]!r}" + _more(unexpected))
    for src_name, dst_name in name_map.items():
        got, want = tuple(source[src_name].shape), expected.get(dst_name)
        if got != want:
            raise ConversionError(f"{where}: tensor {src_name!r} has shape {list(got)}, expected "
                                  f"{list(want) if want is not None else None} from the config (-> {dst_name})")
    return {dst_name: source[src_name] for src_name, dst_name in name_map.items()}


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


# ----------------------------------------------------------------------------- output

def save_converted(dst: Path, config: ModelConfig, tensors: Mapping[str, torch.Tensor], tokenizer_json: str,
                   force: bool, progress: bool = True) -> Path:
    """Validate, cast to `config.dtype` and write config.json, model.safetensors and tokenizer.json."""
    try:
        check_tensor_set({name: tuple(t.shape) for name, t in tensors.items()}, config, "converted weights")
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    dtype = getattr(torch, config.dtype)
    with atomic_output_dir(dst, force) as tmp:
        out: dict[str, torch.Tensor] = {}
        # Source tensors are memory-mapped: this loop is where they are read from disk.
        for name in progress_bar(sorted(tensors), len(tensors), f"converting to {config.dtype}", progress):
            out[name] = tensors[name].to(dtype).contiguous()
        config.save(tmp / CONFIG_FILE)
        save_file(out, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        # safetensors creates its file 0600; give it the umask-default mode config.json got.
        shutil.copymode(tmp / CONFIG_FILE, tmp / WEIGHTS_FILE)
        (tmp / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
    return Path(dst)
