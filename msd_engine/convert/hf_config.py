"""Reading transformers' config.json dicts (Llama, CLIP, LLaVA) into msd-engine config fields.

Absent keys take transformers' own defaults, hard-coded here (the converters do not import it).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from msd_engine.config import ModelConfig
from msd_engine.convert.common import ConversionError

# transformers' LlamaConfig defaults (checked against transformers by tests/test_convert.py).
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
}
ROPE_THETA_DEFAULT = 10000.0
# transformers' CLIPVisionConfig defaults (ViT-B/32); a config dict that omits a key gets these.
CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}


def hf_get(hf: Mapping[str, Any], key: str, defaults: Mapping[str, Any]) -> Any:
    """`hf[key]`, or the transformers default when the key is absent or null."""
    value = hf.get(key)
    return defaults[key] if value is None else value


def rope_theta(hf: Mapping[str, Any], where: str) -> float:
    """RoPE base from a Llama config of any transformers version; scaled RoPE is refused."""
    # transformers 5 keeps it in `rope_parameters`; 4.x has top-level `rope_theta` and `rope_scaling`
    # (which, when set, takes precedence, as in transformers).
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ConversionError(f"{where}: unsupported rope parameters {params!r} (expected one flat dict)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ConversionError(f"{where}: RoPE scaling type {rope_type!r} is not supported (only plain RoPE, "
                              "rope_type 'default')")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(f"{where}: partial_rotary_factor {params['partial_rotary_factor']} is not supported")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    return float(ROPE_THETA_DEFAULT if theta is None else theta)


def llama_text_fields(hf: Mapping[str, Any], where: str, tie: bool) -> dict[str, Any]:
    """TextConfig keyword arguments from a HF LlamaConfig dict (absent keys take LlamaConfig defaults)."""
    if hf_get(hf, "hidden_act", LLAMA_DEFAULTS) != "silu":
        raise ConversionError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if hf_get(hf, key, LLAMA_DEFAULTS):
            raise ConversionError(f"{where}: {key}=true is not supported (Llama has no projection biases)")
    heads = int(hf_get(hf, "num_attention_heads", LLAMA_DEFAULTS))
    return {
        "vocab_size": int(hf_get(hf, "vocab_size", LLAMA_DEFAULTS)),
        "hidden_size": int(hf_get(hf, "hidden_size", LLAMA_DEFAULTS)),
        "intermediate_size": int(hf_get(hf, "intermediate_size", LLAMA_DEFAULTS)),
        "num_layers": int(hf_get(hf, "num_hidden_layers", LLAMA_DEFAULTS)),
        "num_heads": heads,
        "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": int(hf.get("head_dim") or 0),
        "rms_norm_eps": float(hf_get(hf, "rms_norm_eps", LLAMA_DEFAULTS)),
        "rope_theta": rope_theta(hf, where),
        "max_position_embeddings": int(hf_get(hf, "max_position_embeddings", LLAMA_DEFAULTS)),
        "tie_word_embeddings": bool(tie),
    }


def clip_vision_fields(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """VisionConfig keyword arguments from a HF CLIPVisionConfig dict (absent keys take its defaults)."""
    if hf.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ConversionError(f"{where}: vision model_type {hf.get('model_type')!r} is not 'clip_vision_model'")
    if hf_get(hf, "num_channels", CLIP_VISION_DEFAULTS) != 3:
        raise ConversionError(f"{where}: num_channels {hf['num_channels']} is not supported (only RGB)")
    sizes = {}
    for key in ("image_size", "patch_size"):
        value = hf_get(hf, key, CLIP_VISION_DEFAULTS)
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ConversionError(f"{where}: non-square {key} {value} is not supported")
            value = value[0]
        sizes[key] = int(value)
    return {
        "hidden_size": int(hf_get(hf, "hidden_size", CLIP_VISION_DEFAULTS)),
        "intermediate_size": int(hf_get(hf, "intermediate_size", CLIP_VISION_DEFAULTS)),
        "num_layers": int(hf_get(hf, "num_hidden_layers", CLIP_VISION_DEFAULTS)),
        "num_heads": int(hf_get(hf, "num_attention_heads", CLIP_VISION_DEFAULTS)),
        "layer_norm_eps": float(hf_get(hf, "layer_norm_eps", CLIP_VISION_DEFAULTS)),
        "hidden_act": str(hf_get(hf, "hidden_act", CLIP_VISION_DEFAULTS)),
        **sizes,
    }


def image_norm_fields(preprocessor: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """image_mean / image_std from a preprocessor_config.json, if it has them."""
    fields = {}
    for key in ("image_mean", "image_std"):
        if preprocessor is not None and preprocessor.get(key) is not None:
            fields[key] = tuple(float(x) for x in preprocessor[key])
    return fields


def special_token_ids(*configs: Optional[Mapping[str, Any]]) -> tuple[Optional[int], tuple[int, ...]]:
    """(bos, eos ids) from the first config dict that sets each (generation_config.json first)."""
    def first(key: str) -> Any:
        for hf in configs:
            if hf is not None and hf.get(key) is not None:
                return hf[key]
        return LLAMA_DEFAULTS[key]
    eos = first("eos_token_id")
    return int(first("bos_token_id")), tuple(int(t) for t in (eos if isinstance(eos, list) else [eos]))


def build_config(where: str, **fields: Any) -> ModelConfig:
    """ModelConfig(**fields), with its validation errors reported against `where`."""
    try:
        return ModelConfig(**fields)
    except ValueError as exc:
        raise ConversionError(f"{where}: {exc}") from exc


