"""Triton backend: the torch op table with the Triton kernels of `msd_engine.triton_kernels` swapped in."""
from __future__ import annotations

import os

import torch

from msd_engine.ops.torch_ops import TorchOps


class TritonOps(TorchOps):
    name = "triton"

    def __init__(self, device: torch.device):
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"backend 'triton' needs a CUDA device (got {device}); on a CPU it runs only "
                               "under the Triton interpreter (TRITON_INTERPRET=1, slow, for tests)")
        from msd_engine.triton_kernels import rms_norm, silu_mul  # modules, not functions
        self._rms_norm = rms_norm
        self._silu_mul = silu_mul

    def rms_norm(self, x, weight, eps):
        return self._rms_norm.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        # The kernel adds into `residual` in place; callers own that buffer (see LlamaModel.forward).
        return self._rms_norm.add_rms_norm(x, residual, weight, eps), residual

    def silu_mul(self, gate_up):
        return self._silu_mul.silu_mul(gate_up)
