"""CLIP ViT vision tower (features of `feature_layer`) and the LLaVA `mlp2x_gelu` projector."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from msd_engine.config import ProjectorConfig, VisionConfig
from msd_engine.ops import TorchOps


@dataclass
class ClipLayer:
    norm1: tuple[torch.Tensor, torch.Tensor]
    qkv_proj: tuple[torch.Tensor, torch.Tensor]  # fused q|k|v weight [3D, D] and bias [3D]
    o_proj: tuple[torch.Tensor, torch.Tensor]
    norm2: tuple[torch.Tensor, torch.Tensor]
    fc1: tuple[torch.Tensor, torch.Tensor]
    fc2: tuple[torch.Tensor, torch.Tensor]


def _pair(weights: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    return weights[prefix + ".weight"], weights[prefix + ".bias"]


class ClipVisionTower:
    def __init__(self, config: VisionConfig, weights: dict[str, torch.Tensor], ops: TorchOps):
        self.config = config
        self.ops = ops
        self.patch_embed = weights["vision.patch_embed.weight"]  # [D, 3, p, p]
        self.class_embed = weights["vision.class_embed"]         # [D]
        self.pos_embed = weights["vision.pos_embed"]             # [N + 1, D]
        self.pre_norm = _pair(weights, "vision.pre_norm")
        # Only the layers up to feature_layer run; later layers' weights are never read.
        self.layers = [self._layer(weights, i) for i in range(config.layers_used)]

    @staticmethod
    def _layer(weights: dict[str, torch.Tensor], i: int) -> ClipLayer:
        p = f"vision.layers.{i}."
        qkv_w = torch.cat([weights[p + f"attn.{n}_proj.weight"] for n in "qkv"])
        qkv_b = torch.cat([weights[p + f"attn.{n}_proj.bias"] for n in "qkv"])
        return ClipLayer(_pair(weights, p + "norm1"), (qkv_w, qkv_b), _pair(weights, p + "attn.o_proj"),
                         _pair(weights, p + "norm2"), _pair(weights, p + "mlp.fc1"), _pair(weights, p + "mlp.fc2"))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, num_image_tokens, D] features of `feature_layer`."""
        cfg, ops = self.config, self.ops
        x = pixel_values.to(self.patch_embed.dtype)
        patches = F.conv2d(x, self.patch_embed, stride=cfg.patch_size)  # [B, D, g, g]
        patches = patches.flatten(2).transpose(1, 2)                     # [B, N, D]
        cls = self.class_embed.expand(patches.shape[0], 1, -1)
        h = torch.cat([cls, patches], dim=1) + self.pos_embed
        h = ops.layer_norm(h, *self.pre_norm, cfg.layer_norm_eps)
        for layer in self.layers:
            h = h + self._attention(ops.layer_norm(h, *layer.norm1, cfg.layer_norm_eps), layer)
            h = h + self._mlp(ops.layer_norm(h, *layer.norm2, cfg.layer_norm_eps), layer)
        return h[:, 1:] if cfg.feature_select == "patch" else h

    def _attention(self, h: torch.Tensor, layer: ClipLayer) -> torch.Tensor:
        b, n, d = h.shape
        heads = self.config.num_heads
        qkv = self.ops.linear(h, *layer.qkv_proj).view(b, n, 3, heads, d // heads)
        out = self.ops.dense_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # [B, N, heads, hd]
        return self.ops.linear(out.reshape(b, n, d), *layer.o_proj)

    def _mlp(self, h: torch.Tensor, layer: ClipLayer) -> torch.Tensor:
        act = self.ops.quick_gelu if self.config.hidden_act == "quick_gelu" else self.ops.gelu
        return self.ops.linear(act(self.ops.linear(h, *layer.fc1)), *layer.fc2)


class Projector:
    def __init__(self, config: ProjectorConfig, weights: dict[str, torch.Tensor], ops: TorchOps):
        self.ops = ops
        self.linear1 = _pair(weights, "projector.linear1")
        self.linear2 = _pair(weights, "projector.linear2")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[..., vision D] -> [..., text H]."""
        return self.ops.linear(self.ops.gelu(self.ops.linear(features, *self.linear1)), *self.linear2)
