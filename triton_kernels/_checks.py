"""Argument checks shared by the launchers: each failure names the argument and what is wrong."""
from __future__ import annotations

from typing import Optional

import torch
from triton.runtime.interpreter import InterpretedFunction

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting(kernel) -> bool:
    """Whether `kernel` runs in the Triton interpreter (TRITON_INTERPRET=1 when it was defined)."""
    return isinstance(kernel, InterpretedFunction)


def check_tensor(t: torch.Tensor, name: str, kernel) -> None:
    """`t` has a supported dtype and lives where `kernel` can read it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
    if interpreting(kernel):
        if t.dtype == torch.bfloat16:
            raise TypeError(f"{name} is bfloat16, which the Triton interpreter cannot compute")
    elif t.device.type != "cuda":
        raise ValueError(f"{name} is on {t.device}; Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before importing them)")


def check_like(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def as_rows(t: torch.Tensor, name: str, width: int) -> torch.Tensor:
    """`t [..., width]` as a `[rows, width]` view (no copy), or a ValueError naming `t`."""
    if width < 1:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; the last dim must be non-empty")
    if t.dim() == 0 or t.shape[-1] != width:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected last dim {width}")
    if t.stride(-1) != 1 and width > 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    try:
        return t.view(-1, width)
    except RuntimeError as exc:
        raise ValueError(
            f"{name} (shape {tuple(t.shape)}, strides {t.stride()}) cannot be viewed as "
            f"[rows, {width}] with one row stride; pass {name}.contiguous()") from exc


def row_stride(t2: torch.Tensor) -> int:
    # A single row's stride is meaningless (and may be anything after a transpose).
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def output(out: Optional[torch.Tensor], shape: tuple, ref: torch.Tensor) -> torch.Tensor:
    """`out` checked against the expected shape, or a new tensor like `ref`."""
    if out is None:
        return torch.empty(shape, dtype=ref.dtype, device=ref.device)
    check_like(out, "out", ref, "the input")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}; expected {tuple(shape)}")
    return out
