"""DraftConfig: the one-layer EAGLE-style draft head, and the mode that decides its image handling.

mode "msd": image-span positions take the raw projector output and bypass `fc` (decoupled).
mode "eagle": every position goes through `fc`, image positions included (the baseline).
draft_vocab_size > 0: the draft proposes only tokens of its reduced vocabulary (see `DraftConfig`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DRAFT_FORMAT = "msd-engine-draft"
DRAFT_FORMAT_VERSION = 1
DRAFT_MODES = ("msd", "eagle")


@dataclass(frozen=True)
class DraftConfig:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    head_dim: int = 0  # 0 = hidden_size // num_heads
    mode: str = "msd"
    dtype: str = "float16"
    # Reduced draft vocabulary: 0 drafts over the whole vocabulary; N > 0 drafts over the N target
    # token ids in the checkpoint's `draft_vocab` tensor (the target still verifies over all of them,
    # so the output is unchanged; only the draft's lm_head shrinks).
    draft_vocab_size: int = 0

    def __post_init__(self) -> None:
        if self.mode not in DRAFT_MODES:
            raise ValueError(f"draft mode {self.mode!r} not one of {DRAFT_MODES}")
        for name in ("hidden_size", "intermediate_size", "vocab_size", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"draft {name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft draft_vocab_size {self.draft_vocab_size} outside 0..vocab_size {self.vocab_size} "
                             "(0 = the whole vocabulary)")
        if self.head_dim < 0:
            raise ValueError(f"draft head_dim must be >= 0 (0 = hidden_size // num_heads), got {self.head_dim}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"draft hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"draft head_dim {self.head_dim} must be even for RoPE")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"draft num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": DRAFT_FORMAT, "format_version": DRAFT_FORMAT_VERSION, **dataclasses.asdict(self)}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "DraftConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json; is this a converted draft (msd-engine convert msd-draft)?")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if data.get("format") != DRAFT_FORMAT:
            raise ValueError(f"{path}: not a converted msd-engine draft (format={data.get('format')!r}); "
                             "convert it with `msd-engine convert msd-draft`")
        if data.get("format_version") != DRAFT_FORMAT_VERSION:
            raise ValueError(f"{path}: draft format_version {data.get('format_version')!r} unsupported")
        body = {k: v for k, v in data.items() if k not in ("format", "format_version")}
        try:
            return cls(**body)
        except TypeError as exc:
            raise ValueError(f"{path}: malformed draft config: {exc}") from exc
