"""Model configs: one validated dataclass per part, named presets, and the converted-format header.

The converted format is a directory with `config.json` (this module's `ModelConfig.to_dict()`,
which carries `format` and `format_version`), `model.safetensors` (tensor names in
`msd_engine.weights`) and `tokenizer.json`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

FORMAT_NAME = "msd-engine"
FORMAT_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16")
PROMPT_TEMPLATES = ("vicuna_v1", "chatml", "plain")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP ViT vision tower (pre-LN, class token, learned positions, quick_gelu)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # hidden_states index whose output feeds the projector; -2 = second-to-last layer.
    feature_layer: int = -2
    # "patch" drops the class token (LLaVA-1.5), "full" keeps it.
    feature_select: str = "patch"
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        _require(self.hidden_size % self.num_heads == 0,
                 f"vision hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        _require(self.image_size % self.patch_size == 0,
                 f"vision image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        _require(self.hidden_act in ("quick_gelu", "gelu"), f"unsupported vision hidden_act {self.hidden_act!r}")
        _require(self.feature_select in ("patch", "full"), f"unsupported feature_select {self.feature_select!r}")
        _require(-self.num_layers <= self.feature_layer <= self.num_layers and self.feature_layer != 0,
                 f"vision feature_layer {self.feature_layer} outside 1..{self.num_layers} / -{self.num_layers}..-1")
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image contributes to the language model's sequence."""
        return self.num_patches + (1 if self.feature_select == "full" else 0)

    @property
    def layers_used(self) -> int:
        """Encoder layers that must run to produce hidden_states[feature_layer]."""
        # hidden_states has num_layers + 1 entries (embeddings first).
        return self.feature_layer if self.feature_layer > 0 else self.num_layers + 1 + self.feature_layer


@dataclass(frozen=True)
class ProjectorConfig:
    """LLaVA `mlp2x_gelu`: Linear(vision -> text), GELU (erf), Linear(text -> text)."""

    vision_hidden_size: int = 1024
    text_hidden_size: int = 4096
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        _require(self.hidden_act == "gelu", f"unsupported projector hidden_act {self.hidden_act!r}")


@dataclass(frozen=True)
class TextConfig:
    """A Llama decoder (RMSNorm, RoPE, SwiGLU), MHA or GQA, tied or untied lm_head."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0 = hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_kv_heads"):
            _require(getattr(self, name) > 0, f"text {name} must be positive, got {getattr(self, name)}")
        if self.head_dim == 0:
            _require(self.hidden_size % self.num_heads == 0,
                     f"text hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")
        _require(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for RoPE")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "max_position_embeddings"):
            _require(getattr(self, name) > 0, f"text {name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class ModelConfig:
    """A whole model: a text decoder, optionally with a vision tower and projector (LLaVA)."""

    text: TextConfig
    vision: Optional[VisionConfig] = None
    projector: Optional[ProjectorConfig] = None
    image_token_id: Optional[int] = None
    image_token: str = "<image>"
    bos_token_id: Optional[int] = 1
    eos_token_ids: tuple[int, ...] = (2,)
    prompt_template: str = "vicuna_v1"
    dtype: str = "float16"
    name: str = ""

    def __post_init__(self) -> None:
        _require((self.vision is None) == (self.projector is None),
                 "vision and projector configs must both be present (LLaVA) or both absent (text-only)")
        _require(self.dtype in DTYPES, f"dtype {self.dtype!r} not one of {DTYPES}")
        _require(self.prompt_template in PROMPT_TEMPLATES,
                 f"prompt_template {self.prompt_template!r} not one of {PROMPT_TEMPLATES}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        if self.vision is not None:
            assert self.projector is not None
            _require(self.projector.vision_hidden_size == self.vision.hidden_size,
                     f"projector input {self.projector.vision_hidden_size} != vision hidden {self.vision.hidden_size}")
            _require(self.projector.text_hidden_size == self.text.hidden_size,
                     f"projector output {self.projector.text_hidden_size} != text hidden {self.text.hidden_size}")
            _require(self.image_token_id is not None, "a LLaVA model needs image_token_id")
            assert self.image_token_id is not None
            # The original LLaVA release keeps <image> outside the embedding table (its features
            # replace it before embedding), so the id may be >= vocab_size; it must not be negative.
            _require(self.image_token_id >= 0, f"image_token_id {self.image_token_id} must be >= 0")

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    def to_dict(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **body}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"{source}: not an msd-engine converted model (format={data.get('format')!r}); "
                             "convert it first with `msd-engine convert`")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{source}: format_version {data.get('format_version')!r} unsupported "
                             f"(this engine reads version {FORMAT_VERSION})")
        body = {k: v for k, v in data.items() if k not in ("format", "format_version")}
        try:
            text = TextConfig(**body.pop("text"))
            vision = body.pop("vision", None)
            projector = body.pop("projector", None)
            return cls(text=text,
                       vision=VisionConfig(**vision) if vision else None,
                       projector=ProjectorConfig(**projector) if projector else None,
                       **body)
        except (TypeError, KeyError) as exc:
            raise ValueError(f"{source}: malformed config: {exc}") from exc

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json; is this a converted msd-engine model directory?")
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, source=str(path))


def _llava_preset(text: TextConfig, name: str) -> ModelConfig:
    vision = VisionConfig()
    return ModelConfig(
        text=text, vision=vision,
        projector=ProjectorConfig(vision_hidden_size=vision.hidden_size, text_hidden_size=text.hidden_size),
        image_token_id=32000, name=name, dtype="float16",
    )


PRESETS: dict[str, ModelConfig] = {
    # llava-hf vocabulary: 32000 Llama tokens + <image> (32000) + padding to 32064.
    "llava-1.5-7b": _llava_preset(TextConfig(vocab_size=32064), "llava-1.5-7b"),
    "llava-1.5-13b": _llava_preset(
        TextConfig(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_layers=40,
                   num_heads=40, num_kv_heads=40), "llava-1.5-13b"),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
