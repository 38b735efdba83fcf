"""Build a `TreeDrafter` from a converted draft directory, checked against the loaded target."""
from __future__ import annotations

from pathlib import Path

import torch

from msd_engine.draft.config import DraftConfig
from msd_engine.draft.model import DraftModel
from msd_engine.draft.weights import (DRAFT_VOCAB_KEY, check_draft_fits_target, check_draft_vocab,
                                      check_embedding_matches, load_draft_weights)
from msd_engine.model.llava import LlavaModel
from msd_engine.ops import TorchOps
from msd_engine.spec.drafter import TreeDrafter
from msd_engine.spec.tree import TreeParams
from msd_engine.weights import CONFIG_FILE


def load_drafter(draft_dir: Path, target: LlavaModel, ops: TorchOps, max_seq_len: int, tree: TreeParams,
                 dtype: torch.dtype, device: torch.device) -> TreeDrafter:
    if not draft_dir.is_dir():
        raise FileNotFoundError(f"{draft_dir}: draft directory not found")
    config = DraftConfig.load(draft_dir / CONFIG_FILE)
    check_draft_fits_target(config, target.config, str(draft_dir))
    weights = load_draft_weights(draft_dir, config, dtype, str(device))
    check_embedding_matches(weights["embed_tokens.weight"], target.text.embed_tokens, str(draft_dir))
    if DRAFT_VOCAB_KEY in weights:
        check_draft_vocab(weights[DRAFT_VOCAB_KEY], config.vocab_size, str(draft_dir))
        weights[DRAFT_VOCAB_KEY] = weights[DRAFT_VOCAB_KEY].long()
    vocab = config.draft_vocab_size or config.vocab_size
    if tree.top_k > vocab:
        raise ValueError(f"{draft_dir}: tree top_k {tree.top_k} exceeds the draft's vocabulary of {vocab} tokens")
    with torch.inference_mode():
        # Tree nodes sit up to `depth` positions past the committed sequence.
        model = DraftModel(config, weights, target.text.lm_head, ops, max_seq_len + tree.depth)
    return TreeDrafter(model, max_seq_len, tree)
