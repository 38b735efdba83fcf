"""Convert an original LLaVA release (`LlavaLlamaForCausalLM`) plus its CLIP vision tower directory.

The release holds the Llama model (`model.*`, `lm_head.weight`) and the projector
(`model.mm_projector.{0,2}.*`); the tower comes from a separate `clip-vit-large-patch14-336`
directory (a CLIPModel, keys `vision_model.*` next to the unused text half, or a CLIPVisionModel,
keys `vision_model.*` or, as transformers 5 saves it, bare). The release's vocabulary has no
`<image>` token: it gets the id just past the embedding table, and the engine replaces it with
image features before embedding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from msd_engine.config import ModelConfig, ProjectorConfig, TextConfig, VisionConfig
from msd_engine.convert.common import ConversionError, check_destination, clip_name_map, clip_unused, llama_name_map, llama_unused, load_tokenizer_json, read_checkpoint, read_json, read_optional_json, rename_tensors, require_dir, save_converted
from msd_engine.convert.hf_config import build_config, clip_vision_fields, image_norm_fields, llama_text_fields, special_token_ids
from msd_engine.weights import expected_shapes

TEXT_PREFIX = "model."
LM_HEAD = "lm_head.weight"
PROJECTOR = {
    "model.mm_projector.0.weight": "projector.linear1.weight", "model.mm_projector.0.bias": "projector.linear1.bias",
    "model.mm_projector.2.weight": "projector.linear2.weight", "model.mm_projector.2.bias": "projector.linear2.bias",
}
SUPPORTED_PROJECTOR = "mlp2x_gelu"
# mm_vision_select_feature -> VisionConfig.feature_select
FEATURE_SELECT = {"patch": "patch", "cls_patch": "full"}
# Checkpoints saved with the tower unfrozen carry a copy of it under this prefix. The tower is
# always taken from CLIP_DIR (a required argument), so this copy is ignored.
TOWER_COPY_PREFIX = "model.vision_tower."
CLIP_INNER = "vision_model."
# The text half and projection heads of a full CLIPModel: not part of LLaVA.
CLIP_TEXT_PARTS = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")


def _check_llava_flags(hf: dict[str, Any], where: str) -> None:
    if "text_config" in hf:
        raise ConversionError(f"{where}: this is a llava-hf checkpoint (LlavaForConditionalGeneration); convert "
                              "it with `msd-engine convert llava-hf SRC DST`")
    # The reference code treats a missing mm_projector_type as 'linear' (LLaVA-1.0).
    projector = hf.get("mm_projector_type", "linear")
    if projector != SUPPORTED_PROJECTOR:
        raise ConversionError(f"{where}: mm_projector_type {projector!r} is not supported "
                              f"(only {SUPPORTED_PROJECTOR!r}, the LLaVA-1.5 projector)")
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if hf.get(flag):
            raise ConversionError(f"{where}: {flag}=true is not supported (LLaVA-1.5 uses a single <image> token)")
    # The engine always pads images to a square with the mean colour, as LLaVA-1.5's "pad" does.
    if hf.get("image_aspect_ratio") != "pad":
        raise ConversionError(f"{where}: image_aspect_ratio {hf.get('image_aspect_ratio')!r} is not supported "
                              "(only 'pad', LLaVA-1.5)")
    for key in ("mm_hidden_size", "mm_vision_select_layer"):
        if not isinstance(hf.get(key), int):
            raise ConversionError(f"{where}: {key} missing or not an integer ({hf.get(key)!r})")


def _clip_vision_hf(clip_dir: Path) -> dict[str, Any]:
    where = str(clip_dir / "config.json")
    hf = read_json(clip_dir / "config.json")
    if hf.get("model_type") == "clip":
        return hf.get("vision_config") or {}
    if hf.get("model_type") == "clip_vision_model":
        return hf
    raise ConversionError(f"{where}: model_type {hf.get('model_type')!r} is neither 'clip' nor 'clip_vision_model'")


def llava_original_model_config(src: Path, clip_dir: Path, dtype: str) -> ModelConfig:
    where = str(src / "config.json")
    hf = read_json(src / "config.json")
    _check_llava_flags(hf, where)
    feature = hf.get("mm_vision_select_feature", "patch")
    if feature not in FEATURE_SELECT:
        raise ConversionError(f"{where}: mm_vision_select_feature {feature!r} not one of {list(FEATURE_SELECT)}")
    clip_where = str(clip_dir / "config.json")
    text_fields = llama_text_fields(hf, where, bool(hf.get("tie_word_embeddings")))
    vision_fields = clip_vision_fields(_clip_vision_hf(clip_dir), clip_where)
    norm_fields = image_norm_fields(read_optional_json(clip_dir / "preprocessor_config.json"))
    try:
        text = TextConfig(**text_fields)
        vision = VisionConfig(**vision_fields, feature_layer=hf["mm_vision_select_layer"],
                              feature_select=FEATURE_SELECT[feature], **norm_fields)
    except ValueError as exc:
        raise ConversionError(f"{where}: {exc}") from exc
    if hf["mm_hidden_size"] != vision.hidden_size:
        raise ConversionError(f"{where}: mm_hidden_size {hf['mm_hidden_size']} != hidden_size "
                              f"{vision.hidden_size} of the CLIP tower in {clip_where}")
    bos, eos = special_token_ids(read_optional_json(src / "generation_config.json"), hf)
    return build_config(
        where, text=text, vision=vision,
        projector=ProjectorConfig(vision_hidden_size=vision.hidden_size, text_hidden_size=text.hidden_size),
        image_token_id=text.vocab_size, bos_token_id=bos, eos_token_ids=eos,
        prompt_template="vicuna_v1", dtype=dtype, name=src.resolve().name)


def _llava_tensors(src: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    text = config.text
    names = {**llama_name_map(TEXT_PREFIX, text.num_layers), **PROJECTOR}
    unused = llama_unused(TEXT_PREFIX, text.num_layers)
    if text.tie_word_embeddings:
        unused.add(LM_HEAD)
    else:
        names[LM_HEAD] = "text.lm_head.weight"
    return rename_tensors(read_checkpoint(src), names, expected_shapes(config), str(src), unused,
                          unused_prefixes=(TOWER_COPY_PREFIX,))


def _clip_tensors(clip_dir: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    assert config.vision is not None
    source = read_checkpoint(clip_dir)
    prefix = CLIP_INNER if any(k.startswith(CLIP_INNER) for k in source) else ""
    return rename_tensors(source, clip_name_map(prefix, config.vision.num_layers), expected_shapes(config),
                          str(clip_dir), clip_unused(prefix), unused_prefixes=CLIP_TEXT_PARTS if prefix else ())


def convert_llava_original(src: Path, clip_dir: Path, dst: Path, dtype: str = "float16", force: bool = False,
                           progress: bool = True) -> ModelConfig:
    """Convert original LLaVA release `src` with CLIP tower `clip_dir` into msd-engine directory `dst`."""
    src = require_dir(Path(src), "original LLaVA model directory")
    clip_dir = require_dir(Path(clip_dir), "CLIP vision tower directory (--clip)")
    dst = Path(dst)
    check_destination(dst, force, sources=[src, clip_dir])
    config = llava_original_model_config(src, clip_dir, dtype)
    tensors = {**_llava_tensors(src, config), **_clip_tensors(clip_dir, config)}
    tokenizer_json = load_tokenizer_json(src, config.image_token, config.image_token_id)
    save_converted(dst, config, tensors, tokenizer_json, force, progress)
    return config
