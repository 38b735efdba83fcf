"""transformers' `LlavaForConditionalGeneration` holding a converted msd-engine model's weights, built
from the same files the engine loads: the reference the end-to-end benchmark times, and the batched
generator `train-data --regenerate --batch-size` records the target's answers with.

The key mapping is the converter's (`msd_engine.convert.llava_hf`), inverted. The demo target keeps
its <image> id outside the vocabulary (as the original LLaVA release), which transformers' LLaVA
cannot embed; `generate` below therefore builds the input embeddings with transformers' own
embedding, vision tower and projector (`input_embeds` below) and hands them to `generate(inputs_embeds=...)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from msd_engine.config import ModelConfig
from msd_engine.convert.common import clip_name_map, llama_name_map
from msd_engine.convert.llava_hf import PROJECTOR, detect_layout
from msd_engine.weights import CONFIG_FILE, WEIGHTS_FILE


def build_hf_llava(model_dir: Path, dtype: torch.dtype = torch.float32):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = ModelConfig.load(Path(model_dir) / CONFIG_FILE)
    t, v = cfg.text, cfg.vision
    assert v is not None and cfg.image_token_id is not None
    text = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                       num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                       num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps,
                       rope_theta=t.rope_theta, max_position_embeddings=t.max_position_embeddings,
                       tie_word_embeddings=t.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
                       eos_token_id=list(cfg.eos_token_ids), pad_token_id=cfg.eos_token_ids[0])
    vision = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                              num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                              image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps,
                              hidden_act=v.hidden_act)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=cfg.image_token_id,
                         vision_feature_layer=v.feature_layer,
                         vision_feature_select_strategy="default" if v.feature_select == "patch" else "full",
                         projector_hidden_act="gelu", tie_word_embeddings=t.tie_word_embeddings)
    model = LlavaForConditionalGeneration(config).eval()
    ours = load_file(str(Path(model_dir) / WEIGHTS_FILE))
    state = model.state_dict()
    layout = detect_layout(state.keys(), "transformers LLaVA")
    names = {d: s for s, d in llama_name_map(layout.text, t.num_layers).items()}
    names.update({d: s for s, d in clip_name_map(layout.vision, v.num_layers).items()})
    names.update({d: layout.projector + s for s, d in PROJECTOR.items()})
    if not t.tie_word_embeddings:
        names["text.lm_head.weight"] = layout.lm_head
    hf = {names[k]: w.to(dtype) for k, w in ours.items()}
    if t.tie_word_embeddings:
        hf[layout.lm_head] = hf[layout.text + "embed_tokens.weight"]
    # CLIP's post_layernorm is not used by LLaVA (it reads a hidden state before it)
    missing = [k for k in state if k not in hf and "post_layernorm" not in k]
    if missing:
        raise ValueError(f"no msd-engine tensor for transformers key {missing[0]!r}")
    model.load_state_dict(hf, strict=False)
    return model.to(dtype), cfg


def input_embeds(model, cfg: ModelConfig, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, T] expanded ids (each image patch as the image token) -> [B, T, H] input embeddings: the
    text embedding, with image positions replaced by the projector's output (one image per row)."""
    is_image = input_ids == cfg.image_token_id
    embeds = model.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
    if pixel_values is not None:
        features = model.get_image_features(pixel_values=pixel_values.to(embeds.dtype))
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        if isinstance(features, (list, tuple)):
            features = torch.cat(list(features))
        embeds[is_image] = features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
    return embeds
