"""Convert a llava-hf `LlavaForConditionalGeneration` directory, whatever transformers version saved it.

Key naming differs by writer; each part's prefix is detected from the keys present, and a part
whose keys use two namings at once is an error:
- text:      `language_model.model.*` + `language_model.lm_head.weight` (hub files; what
             transformers 4.x and 5.x `save_pretrained` write), or `model.language_model.*` +
             `lm_head.weight` (in-memory names of transformers >= 4.52 and 5.x),
- vision:    `[model.]vision_tower.[vision_model.]*` (the hub files have `vision_model.`;
             transformers 5.x drops it both in memory and when saving),
- projector: `[model.]multi_modal_projector.linear_{1,2}.*`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Optional

from msd_engine.config import ModelConfig, ProjectorConfig, TextConfig, VisionConfig
from msd_engine.convert.common import ConversionError, check_destination, clip_name_map, clip_unused, llama_name_map, llama_unused, load_tokenizer_json, read_checkpoint, read_json, read_optional_json, rename_tensors, require_dir, save_converted
from msd_engine.convert.hf_config import build_config, clip_vision_fields, image_norm_fields, llama_text_fields, special_token_ids
from msd_engine.weights import expected_shapes

TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
LM_HEAD_NAMES = ("language_model.lm_head.weight", "lm_head.weight")
VISION_ROOTS = ("vision_tower.", "model.vision_tower.")
CLIP_INNER = "vision_model."
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
PROJECTOR = {
    "linear_1.weight": "projector.linear1.weight", "linear_1.bias": "projector.linear1.bias",
    "linear_2.weight": "projector.linear2.weight", "linear_2.bias": "projector.linear2.bias",
}
# LlavaConfig's vision_config when config.json has none (CLIP ViT-L/14-336).
LLAVA_VISION_DEFAULTS = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                         "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
FEATURE_SELECT = {"default": "patch", "full": "full"}
IMAGE_TOKEN_DEFAULT = 32000  # LlavaConfig.image_token_index


@dataclass(frozen=True)
class KeyLayout:
    """Where each part of the model lives in one checkpoint's key names."""

    text: str
    lm_head: str
    vision: str
    projector: str


def _pick_prefix(keys: Collection[str], candidates: tuple[str, ...], what: str, where: str) -> str:
    found = [p for p in candidates if any(k.startswith(p) for k in keys)]
    if not found:
        raise ConversionError(f"{where}: no {what} tensors (expected names starting with "
                              f"{' or '.join(repr(c) for c in candidates)})")
    if len(found) > 1:
        example = next(k for k in sorted(keys) if k.startswith(found[1]))
        raise ConversionError(f"{where}: mixed key naming: {what} tensors under both {found[0]!r} and "
                              f"{found[1]!r} (e.g. {example!r})")
    return found[0]


def detect_layout(keys: Collection[str], where: str) -> KeyLayout:
    text = _pick_prefix(keys, TEXT_PREFIXES, "language model", where)
    heads = [name for name in LM_HEAD_NAMES if name in keys]
    if len(heads) > 1:
        raise ConversionError(f"{where}: mixed key naming: both {heads[0]!r} and {heads[1]!r} present")
    # Without any lm_head (tied embeddings), name the one that goes with the text naming in errors.
    lm_head = heads[0] if heads else LM_HEAD_NAMES[TEXT_PREFIXES.index(text)]
    root = _pick_prefix(keys, VISION_ROOTS, "vision tower", where)
    vision = root + CLIP_INNER if any(k.startswith(root + CLIP_INNER) for k in keys) else root
    projector = _pick_prefix(keys, PROJECTOR_PREFIXES, "projector", where)
    return KeyLayout(text=text, lm_head=lm_head, vision=vision, projector=projector)


def _image_token_id(hf: dict[str, Any], where: str) -> int:
    # transformers 4.x writes image_token_index; 5.x maps image_token_id onto it (both may appear).
    ids = {hf[k] for k in ("image_token_index", "image_token_id") if hf.get(k) is not None}
    if len(ids) > 1:
        raise ConversionError(f"{where}: image_token_index and image_token_id disagree ({sorted(ids)})")
    return int(ids.pop()) if ids else IMAGE_TOKEN_DEFAULT


def _vision_config(hf: dict[str, Any], where: str, preprocessor: Optional[dict[str, Any]]) -> VisionConfig:
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConversionError(f"{where}: vision_feature_layer {layer!r} is not supported (one layer index only)")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in FEATURE_SELECT:
        raise ConversionError(f"{where}: vision_feature_select_strategy {strategy!r} not one of {list(FEATURE_SELECT)}")
    vision_hf = hf.get("vision_config")
    fields = clip_vision_fields(LLAVA_VISION_DEFAULTS if vision_hf is None else vision_hf, f"{where} vision_config")
    try:
        return VisionConfig(**fields, feature_layer=layer, feature_select=FEATURE_SELECT[strategy],
                            **image_norm_fields(preprocessor))
    except ValueError as exc:
        raise ConversionError(f"{where}: {exc}") from exc


def llava_hf_model_config(src: Path, dtype: str) -> ModelConfig:
    """ModelConfig from a llava-hf directory's config.json (+ generation / preprocessor configs)."""
    where = str(src / "config.json")
    hf = read_json(src / "config.json")
    if "mm_projector_type" in hf or "LlavaLlamaForCausalLM" in (hf.get("architectures") or []):
        raise ConversionError(f"{where}: this is an original LLaVA release (LlavaLlamaForCausalLM); convert it "
                              "with `msd-engine convert llava SRC --clip CLIP_DIR DST`")
    if hf.get("model_type") != "llava":
        raise ConversionError(f"{where}: model_type {hf.get('model_type')!r} is not 'llava' "
                              "(LlavaForConditionalGeneration)")
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{where}: projector_hidden_act {hf['projector_hidden_act']!r} is not supported "
                              "(only 'gelu')")
    if not hf.get("multimodal_projector_bias", True):
        raise ConversionError(f"{where}: multimodal_projector_bias=false is not supported")
    text_hf = hf.get("text_config") or {}
    # As LlavaConfig: tied if either the top level or the text config says so.
    tie = bool(hf.get("tie_word_embeddings") or text_hf.get("tie_word_embeddings"))
    if text_hf.get("model_type", "llama") != "llama":
        raise ConversionError(f"{where}: text_config model_type {text_hf['model_type']!r} is not 'llama'")
    fields = llama_text_fields(text_hf, f"{where} text_config", tie)
    try:
        text = TextConfig(**fields)
    except ValueError as exc:
        raise ConversionError(f"{where}: {exc}") from exc
    vision = _vision_config(hf, where, read_optional_json(src / "preprocessor_config.json"))
    bos, eos = special_token_ids(read_optional_json(src / "generation_config.json"), text_hf, hf)
    return build_config(
        where, text=text, vision=vision,
        projector=ProjectorConfig(vision_hidden_size=vision.hidden_size, text_hidden_size=text.hidden_size),
        image_token_id=_image_token_id(hf, where), bos_token_id=bos, eos_token_ids=eos,
        prompt_template="vicuna_v1", dtype=dtype, name=src.resolve().name)


def llava_hf_name_map(config: ModelConfig, layout: KeyLayout) -> tuple[dict[str, str], set[str]]:
    """(source name -> converted name, source names deliberately dropped) for one key layout."""
    assert config.vision is not None
    names = llama_name_map(layout.text, config.text.num_layers)
    unused = llama_unused(layout.text, config.text.num_layers)
    if config.text.tie_word_embeddings:
        unused |= set(LM_HEAD_NAMES)  # a saved copy of the tied embedding
    else:
        names[layout.lm_head] = "text.lm_head.weight"
    names.update(clip_name_map(layout.vision, config.vision.num_layers))
    unused |= clip_unused(layout.vision)
    names.update({layout.projector + s: d for s, d in PROJECTOR.items()})
    return names, unused


def convert_llava_hf(src: Path, dst: Path, dtype: str = "float16", force: bool = False,
                     progress: bool = True) -> ModelConfig:
    """Convert llava-hf directory `src` into an msd-engine model directory `dst`."""
    src, dst = require_dir(Path(src), "llava-hf model directory"), Path(dst)
    check_destination(dst, force, sources=[src])
    config = llava_hf_model_config(src, dtype)
    source = read_checkpoint(src)
    layout = detect_layout(source.keys(), str(src))
    names, unused = llava_hf_name_map(config, layout)
    tensors = rename_tensors(source, names, expected_shapes(config), str(src), unused)
    tokenizer_json = load_tokenizer_json(src, config.image_token, config.image_token_id)
    save_converted(dst, config, tensors, tokenizer_json, force, progress)
    return config
