"""CUDA backend: the torch op table with the hand-written kernels of `msd_engine._C` swapped in."""
from __future__ import annotations

import torch

from msd_engine import native
from msd_engine.ops.torch_ops import TorchOps


class CudaOps(TorchOps):
    name = "cuda"

    def __init__(self, device: torch.device):
        if device.type != "cuda":
            raise RuntimeError(f"backend 'cuda' runs the CUDA kernels of msd_engine._C and needs device='cuda' "
                               f"(got {device})")
        if not native.cuda_compiled():
            raise RuntimeError("backend 'cuda': msd_engine._C was built without CUDA (no nvcc at build time); "
                               "reinstall with MSD_ENGINE_CUDA=1 pip install -e .")

    def rms_norm(self, x, weight, eps):
        return native.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        # The kernel adds into `residual` in place; callers own that buffer (see LlamaModel.forward).
        return native.add_rms_norm(x, residual, weight, eps), residual

    def silu_mul(self, gate_up):
        return native.silu_mul(gate_up)
