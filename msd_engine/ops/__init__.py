"""Op dispatch: the model code calls `ops.<name>(...)`; a backend is one op table.

`torch` is the reference. `triton`, `cuda` (GPU kernels) and `cpu` (C++ CPU kernels) subclass it and replace the ops they have
hand-written kernels for; every op they do not replace is the torch reference op, by inheritance,
so results differ only by the kernels' own rounding.
"""
from __future__ import annotations

import torch

from msd_engine.ops.torch_ops import TorchOps

BACKENDS = ("torch", "triton", "cuda", "cpu")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> the fastest measured backend for the device: 'cpu' (C++ kernels) on a CPU; on a
    GPU 'torch' until the GPU benchmarks (bench/) show a kernel backend ahead."""
    if backend != "auto":
        return backend
    return "cpu" if device.type == "cpu" else "torch"


def get_ops(backend: str, device: torch.device) -> TorchOps:
    """The op table for `backend` on `device`; a clear error where it cannot run."""
    backend = resolve_backend(backend, device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS + ('auto',)}")
    if backend == "torch":
        return TorchOps()
    if backend == "cpu":
        from msd_engine.ops.cpu_ops import CpuOps
        return CpuOps(device)
    if backend == "triton":
        from msd_engine.ops.triton_ops import TritonOps
        return TritonOps(device)
    from msd_engine.ops.cuda_ops import CudaOps
    return CudaOps(device)


__all__ = ["BACKENDS", "TorchOps", "get_ops"]
