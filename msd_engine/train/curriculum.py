"""The two-stage curriculum: text-only epochs, then a ramp of visual samples, then all visual.

Epochs are numbered from 1, as in the MSD paper. With the defaults: epochs 1-20 text only,
epochs 21-39 keep each visual sample with probability (epoch - 20) / 20, epoch 40 all visual.
Generally: p = 0 for epoch <= text_epochs; (epoch - text_epochs) / (ramp_epochs + 1) during the
ramp; 1 afterwards. Text samples are used in every epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Curriculum:
    text_epochs: int = 20
    ramp_epochs: int = 19
    total_epochs: int = 40

    def __post_init__(self) -> None:
        if self.text_epochs < 0 or self.ramp_epochs < 0:
            raise ValueError(f"text_epochs {self.text_epochs} and ramp_epochs {self.ramp_epochs} must be >= 0")
        if self.total_epochs <= 0:
            raise ValueError(f"total_epochs must be positive, got {self.total_epochs}")
        if self.text_epochs + self.ramp_epochs > self.total_epochs:
            raise ValueError(f"text_epochs {self.text_epochs} + ramp_epochs {self.ramp_epochs} exceed "
                             f"total_epochs {self.total_epochs}")

    def visual_probability(self, epoch: int) -> float:
        """Probability that a visual sample is used in `epoch` (1-based)."""
        if not 1 <= epoch <= self.total_epochs:
            raise ValueError(f"epoch {epoch} outside 1..{self.total_epochs} (epochs are 1-based)")
        if epoch <= self.text_epochs:
            return 0.0
        if epoch <= self.text_epochs + self.ramp_epochs:
            return (epoch - self.text_epochs) / (self.ramp_epochs + 1)
        return 1.0

    def select(self, epoch: int, is_visual_flags: list[bool], generator: torch.Generator) -> list[int]:
        """Indices (ascending) of the samples used in `epoch`: every text sample, and each visual one
        with probability `visual_probability(epoch)` (one uniform draw per sample, in order)."""
        p = self.visual_probability(epoch)
        draws = torch.rand(len(is_visual_flags), generator=generator, dtype=torch.float64).tolist()
        return [i for i, (visual, u) in enumerate(zip(is_visual_flags, draws)) if not visual or u < p]
