"""Draft checkpoint tensors (the released MSD key names) and strict loading."""
from __future__ import annotations

from pathlib import Path

import torch

from msd_engine.config import ModelConfig
from msd_engine.draft.config import DraftConfig
from msd_engine.weights import read_checked

Shape = tuple[int, ...]
DRAFT_WEIGHTS_FILE = "model.safetensors"
DRAFT_VOCAB_KEY = "draft_vocab"  # int64 [draft_vocab_size]: the target token ids the draft proposes


def draft_expected_shapes(config: DraftConfig) -> dict[str, Shape]:
    """The released MSD draft checkpoint, name -> shape (no lm_head: the target's is used)."""
    h, f, d = config.hidden_size, config.intermediate_size, config.head_dim
    p = "layers.0."
    shapes = {
        "embed_tokens.weight": (config.vocab_size, h),
        "fc.weight": (h, 2 * h),
        "fc.bias": (h,),
        p + "self_attn.q_proj.weight": (config.num_heads * d, h),
        p + "self_attn.k_proj.weight": (config.num_kv_heads * d, h),
        p + "self_attn.v_proj.weight": (config.num_kv_heads * d, h),
        p + "self_attn.o_proj.weight": (h, config.num_heads * d),
        p + "mlp.gate_proj.weight": (f, h),
        p + "mlp.up_proj.weight": (f, h),
        p + "mlp.down_proj.weight": (h, f),
        p + "post_attention_layernorm.weight": (h,),
    }
    if config.draft_vocab_size:
        shapes[DRAFT_VOCAB_KEY] = (config.draft_vocab_size,)
    return shapes


def check_draft_tensors(shapes: dict[str, Shape], config: DraftConfig, source: str) -> None:
    expected = draft_expected_shapes(config)
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise ValueError(f"{source}: missing draft tensor {missing[0]!r}")
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: unexpected draft tensor {unexpected[0]!r}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(f"{source}: draft tensor {name!r} has shape {list(shapes[name])}, expected {list(shape)}")


def check_draft_fits_target(draft: DraftConfig, target: ModelConfig, source: str) -> None:
    """A draft is usable with a target only if it reads the target's features and vocabulary."""
    text = target.text
    problems = []
    if draft.hidden_size != text.hidden_size:
        problems.append(f"hidden size {draft.hidden_size} != target's {text.hidden_size}")
    if draft.vocab_size != text.vocab_size:
        problems.append(f"vocab size {draft.vocab_size} != target's {text.vocab_size}")
    if problems:
        raise ValueError(f"{source}: draft does not fit the target: " + "; ".join(problems))


def load_draft_weights(draft_dir: Path, config: DraftConfig, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    path = Path(draft_dir) / DRAFT_WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no draft weights file")
    return read_checked(path, lambda shapes, source: check_draft_tensors(shapes, config, source), dtype, device)


def check_embedding_matches(draft_embed: torch.Tensor, target_embed: torch.Tensor, source: str) -> None:
    """The draft's embedding is a frozen copy of the target's; a different one means a mismatched pair."""
    if draft_embed.shape != target_embed.shape:
        raise ValueError(f"{source}: draft embedding {list(draft_embed.shape)} != target's {list(target_embed.shape)}")
    rows = torch.linspace(0, target_embed.shape[0] - 1, steps=min(64, target_embed.shape[0])).long()
    a, b = draft_embed[rows].float(), target_embed[rows].float()
    tol = 1e-2 * b.abs().max().clamp_min(1e-6)
    if (a - b).abs().max() > tol:
        raise ValueError(f"{source}: draft embed_tokens differ from the target's embedding: "
                         "this draft was trained for another target")


def check_draft_vocab(ids: torch.Tensor, vocab_size: int, source: str) -> None:
    """A reduced draft vocabulary is strictly ascending target token ids in [0, vocab_size)."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{source}: {DRAFT_VOCAB_KEY!r} must hold integer token ids, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{source}: {DRAFT_VOCAB_KEY!r} has token ids outside 0..{vocab_size - 1}")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError(f"{source}: {DRAFT_VOCAB_KEY!r} must be strictly ascending (sorted, no repeats)")
