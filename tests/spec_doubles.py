"""Test doubles of the `Drafter` interface and helpers to build drafts for tests."""
from __future__ import annotations

from pathlib import Path

import torch

from msd_engine.convert.msd_draft import save_draft
from msd_engine.draft.init import draft_config_for, init_draft_weights
from msd_engine.spec.tree import DraftTree, TreeParams, build_tree


class OracleDrafter:
    """Proposes the target's own continuation (known in advance), corrupted at random depths.

    The main chain carries the true next tokens; with probability `corrupt` a chain token is replaced
    by a wrong one (partial acceptance), and every chain node gets a wrong sibling, so verification
    sees branching trees and compaction moves non-contiguous nodes.
    """

    def __init__(self, continuation: list[int], vocab: int, seed: int = 0, corrupt: float = 0.3,
                 hindsight_right: bool = True):
        self.continuation = continuation
        self.vocab = vocab
        self.rng = torch.Generator().manual_seed(seed)
        self.corrupt = corrupt
        self.hindsight_right = hindsight_right  # whether extend_guessing's best guess is the true token
        self.emitted = 0

    def reset(self) -> None:
        self.emitted = 0

    def extend(self, token_ids, image_embeds, is_image, features) -> torch.Tensor:
        # The prefill commit ends with the root (1 emitted token); later commits are all emitted.
        self.emitted += 1 if self.emitted == 0 else token_ids.shape[0]
        return features

    def extend_guessing(self, token_ids, features, k) -> torch.Tensor:
        self.extend(token_ids, None, None, features)
        right = token_ids.tolist()
        return torch.tensor([[t if self.hindsight_right else self._wrong(t)] + [self._wrong(t)] * (k - 1)
                             for t in right])

    def _wrong(self, right: int) -> int:
        return (right + 1 + int(torch.randint(self.vocab - 1, (1,), generator=self.rng))) % self.vocab

    def draft(self, root_token: int, params: TreeParams) -> DraftTree:
        truth = self.continuation[self.emitted:self.emitted + params.depth + 1]
        tokens, parents = [root_token], [-1]
        chain = 0
        for token in truth:
            if len(tokens) + 2 > params.total_tokens:
                break
            if float(torch.rand((), generator=self.rng)) < self.corrupt:
                token = self._wrong(token)
            tokens += [self._wrong(token), token]  # a wrong sibling first, then the chain node
            parents += [chain, chain]
            chain = len(tokens) - 1
        return build_tree(torch.tensor(tokens), torch.tensor(parents))


def write_random_draft(target_engine, directory: Path, mode: str = "msd", seed: int = 0, std: float = 0.1) -> Path:
    """A random-weight draft (mostly rejected) for the target engine's model, in the converted format."""
    config = draft_config_for(target_engine.config, mode)
    save_draft(directory, config, init_draft_weights(config, target_engine.model.text.embed_tokens, seed, std),
               force=True)
    return directory
