"""The public engine: load a converted model once, then generate or stream for image + prompt."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from msd_engine.config import ModelConfig
from msd_engine.generation import GenerationStats, StopState, check_prompt_fits, decode
from msd_engine.kv_cache import KVCache
from msd_engine.model.llava import LlavaModel
from msd_engine.ops import get_ops
from msd_engine.request import as_image_list, expand_image_tokens, pixel_values_for, prompt_ids
from msd_engine.sampling import Sampler, SamplingParams
from msd_engine.spec.drafter import Drafter
from msd_engine.spec.loader import load_drafter
from msd_engine.spec.pause import PausePolicy
from msd_engine.spec.speculative import SpecStats, speculative_decode
from msd_engine.spec.tree import TreeParams
from msd_engine.spec.tune import draft_key, load_tuned, load_tuned_round_cost
from msd_engine.tokenizer import StreamDecoder, Tokenizer
from msd_engine.weights import CONFIG_FILE, TOKENIZER_FILE, load_weights

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_MAX_SEQ_LEN = 4096


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    speculative: Optional[bool] = None  # None: speculative when a draft is loaded

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        SamplingParams(self.temperature, self.top_p, self.seed)  # validates

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.seed)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "stats": self.stats}


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} requested but torch sees no CUDA device "
                           f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {str(device)!r}; use 'cpu' or 'cuda'")
    return dev


def resolve_dtype(dtype: Union[str, torch.dtype, None], config: ModelConfig) -> torch.dtype:
    if dtype is None:
        return DTYPES[config.dtype]
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class Engine:
    def __init__(self, config: ModelConfig, model: LlavaModel, tokenizer: Tokenizer, cache: KVCache,
                 device: torch.device, backend: str, drafter: Optional[Drafter] = None,
                 tree: TreeParams = TreeParams(), pause: Optional[PausePolicy] = None):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.device = device
        self.backend = backend
        self.drafter = drafter
        self.tree = tree
        self.pause = pause  # when speculation steps aside for plain steps (None: never)

    @classmethod
    def load(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu",
             dtype: Union[str, torch.dtype, None] = None, max_seq_len: Optional[int] = None,
             backend: str = "auto", draft: Union[str, Path, None] = None,
             tree: Optional[TreeParams] = None, draft_dtype: Union[str, torch.dtype, None] = None,
             pause_below: Union[float, str, None] = "auto") -> "Engine":
        """Load a converted model directory (see `msd-engine convert`), and optionally a converted
        draft head (`msd-engine convert msd-draft`) for speculative decoding with tree `tree`.

        draft_dtype: the draft head's precision (default: the target's). A half-precision draft over a
        float32 target halves the draft's memory traffic on the CPU; the output stays the target's,
        exactly, whatever the draft proposes.

        pause_below: a speculative round's cost in plain steps; while the draft's recent rounds emit
        fewer tokens than that, plain steps stand in for them (`spec.pause.PausePolicy`; output
        unchanged). "auto": the cost the tuner measured for this tree on this device (`msd-engine
        tune --draft`), or no pausing when it has none; None: never pause."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: model directory not found")
        config = ModelConfig.load(path / CONFIG_FILE)
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, config)
        ops = get_ops(backend, dev)
        backend = ops.name
        seq_len = max_seq_len or min(config.text.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        if seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {seq_len}")
        weights = load_weights(path, config, torch_dtype, str(dev))
        with torch.inference_mode():
            model = LlavaModel(config, weights, ops, seq_len)
        t = config.text
        cache = KVCache(t.num_layers, t.num_kv_heads, seq_len, t.head_dim, torch_dtype, dev)
        tokenizer = Tokenizer.from_file(path / TOKENIZER_FILE)
        draft_torch_dtype = torch_dtype if draft_dtype is None else resolve_dtype(draft_dtype, config)
        # The draft's cache key hashes its whole file (~1 s per GB): only where the tuning cache is read.
        needs_key = draft is not None and (tree is None or pause_below == "auto")
        key = draft_key(Path(draft), draft_torch_dtype, torch_dtype) if needs_key else None
        if tree is None:
            # A tree size tuned for this device and model (`msd-engine tune`) beats the GPU default.
            tree = load_tuned(dev, config, torch_dtype, key) or TreeParams()
        pause = _pause_policy(pause_below, dev, config, torch_dtype, key, tree)
        drafter = None
        if draft is not None:
            drafter = load_drafter(Path(draft), model, ops, seq_len, tree, draft_torch_dtype, dev)
        return cls(config, model, tokenizer, cache, dev, backend, drafter, tree, pause)

    # ---- public API --------------------------------------------------------------------------
    def generate(self, prompt: Optional[str] = None, image=None, *, input_ids: Optional[Sequence[int]] = None,
                 pixel_values: Optional[torch.Tensor] = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
                 speculative: Optional[bool] = None) -> GenerationResult:
        """Generate for a text prompt (+ images) or token ids (+ pixel values).

        speculative: None = use the draft head when one is loaded; False = plain decoding.
        """
        gen = GenerationConfig(max_new_tokens, temperature, top_p, seed, speculative)
        ids = self._run(prompt, image, input_ids, pixel_values, gen)
        tokens = list(ids)
        text = self.tokenizer.decode(tokens)
        return GenerationResult(text, tokens, ids.stop.finish_reason or "length", ids.stats.to_dict())

    def stream(self, prompt: Optional[str] = None, image=None, *, input_ids: Optional[Sequence[int]] = None,
               pixel_values: Optional[torch.Tensor] = None, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
               speculative: Optional[bool] = None) -> "TextStream":
        """Iterate text pieces as tokens are decided; their concatenation is `generate(...).text`,
        and once the iteration ends the stream's `.result` is what `generate` would have returned."""
        gen = GenerationConfig(max_new_tokens, temperature, top_p, seed, speculative)
        return TextStream(self.tokenizer, self._run(prompt, image, input_ids, pixel_values, gen))

    # ---- pipeline ----------------------------------------------------------------------------
    def _run(self, prompt, image, input_ids, pixel_values, gen: GenerationConfig) -> "_TokenStream":
        if gen.speculative and self.drafter is None:
            raise ValueError("speculative=True but no draft is loaded: Engine.load(..., draft=DRAFT_DIR)")
        ids, pixels = self._prepare(prompt, image, input_ids, pixel_values)
        check_prompt_fits(len(ids), self.cache)
        return _TokenStream(self, ids, pixels, gen)

    def _prepare(self, prompt, image, input_ids, pixel_values) -> tuple[list[int], Optional[torch.Tensor]]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of `prompt` (text) or `input_ids` (token ids)")
        if prompt is not None:
            if pixel_values is not None:
                raise ValueError("with a text `prompt`, pass images as `image=`, not `pixel_values=`")
            images = as_image_list(image)
            ids = prompt_ids(self.config, self.tokenizer, prompt, len(images))
            pixels = pixel_values_for(self.config, images)
        else:
            if image is not None:
                raise ValueError("with `input_ids`, pass preprocessed `pixel_values=`, not `image=`")
            ids, pixels = list(input_ids), pixel_values
            if pixels is not None and (pixels.dim() != 4 or pixels.shape[1] != 3):
                raise ValueError(f"pixel_values must be [num_images, 3, H, W], got {list(pixels.shape)}")
        num_images = 0 if pixels is None else pixels.shape[0]
        if num_images and self.config.vision is None:
            raise ValueError("pixel_values given but this model has no vision tower")
        if self.config.vision is not None:
            ids = expand_image_tokens(ids, self.config.image_token_id, self.config.vision.num_image_tokens, num_images)
        if not ids:
            raise ValueError("empty prompt: no input tokens")
        vocab = self.config.text.vocab_size
        bad = [t for t in ids if (t < 0 or t >= vocab) and t != self.config.image_token_id]
        if bad:
            raise ValueError(f"input_ids contain {bad[0]}, outside the vocabulary of {vocab}")
        return ids, pixels


def _pause_policy(pause_below, device: torch.device, config: ModelConfig, dtype: torch.dtype,
                  draft: Optional[str], tree: TreeParams) -> Optional[PausePolicy]:
    if pause_below is None:
        return None
    if isinstance(pause_below, str):
        if pause_below != "auto":
            raise ValueError(f"pause_below must be a number, 'auto' or None, got {pause_below!r}")
        cost = None if draft is None else load_tuned_round_cost(device, config, dtype, draft, tree)
        return None if cost is None else PausePolicy(break_even=max(cost, 1.0))
    return PausePolicy(break_even=pause_below)


class _TokenStream:
    """Iterates new token ids for one request; keeps stats and the finish reason."""

    def __init__(self, engine: Engine, ids: list[int], pixels: Optional[torch.Tensor], gen: GenerationConfig):
        self.engine, self.ids, self.pixels, self.gen = engine, ids, pixels, gen
        self.speculative = engine.drafter is not None and gen.speculative is not False
        self.stats: GenerationStats = SpecStats() if self.speculative else GenerationStats()
        self.stop = StopState()

    def __iter__(self) -> Iterator[int]:
        eng = self.engine
        t0 = time.perf_counter()
        ids = torch.tensor(self.ids, device=eng.device)
        with torch.inference_mode():
            features = None
            if self.pixels is not None:
                features = eng.model.image_features(self.pixels.to(eng.device))
            embeds = eng.model.input_embeds(ids, features)
        self.stats.vision_ms = (time.perf_counter() - t0) * 1e3
        sampler = Sampler(self.gen.sampling(), eng.device)
        if self.speculative:
            assert eng.drafter is not None and isinstance(self.stats, SpecStats)
            yield from speculative_decode(eng.model, eng.cache, eng.drafter, ids, embeds, sampler, eng.tree,
                                          self.gen.max_new_tokens, eng.config.eos_token_ids, self.stats, self.stop,
                                          eng.pause)
        else:
            yield from decode(eng.model, eng.cache, embeds, sampler, self.gen.max_new_tokens,
                              eng.config.eos_token_ids, self.stats, self.stop)


class TextStream:
    """The text pieces of one request; `.result` (a GenerationResult) once they are all read."""

    def __init__(self, tokenizer: Tokenizer, tokens: _TokenStream):
        self._tokenizer = tokenizer
        self._tokens = tokens
        self.result: Optional[GenerationResult] = None

    def __iter__(self) -> Iterator[str]:
        decoder = StreamDecoder(self._tokenizer)
        ids: list[int] = []
        for token in self._tokens:
            ids.append(token)
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail
        stop = self._tokens.stop
        self.result = GenerationResult(self._tokenizer.decode(ids), ids, stop.finish_reason or "length",
                                       self._tokens.stats.to_dict())
