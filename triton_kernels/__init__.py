"""Triton kernels, installed as `msd_engine.triton_kernels` (from the top-level triton_kernels/).

One module per op: a private `@triton.jit` kernel, a public launcher that checks its arguments,
and a pure-torch `*_ref` that tests hold the kernel to. Import the functions from the modules
(`from msd_engine.triton_kernels.rms_norm import rms_norm`); this package only exposes the
modules, so `triton_kernels.rms_norm` is never ambiguous between a module and a function.
On a CPU machine the kernels run in the Triton interpreter only if TRITON_INTERPRET=1 is set
before this package is imported (float16 / float32 only: it cannot compute bfloat16).
"""
from . import draft_fc, kv_compact, lm_head_topk, rms_norm, rope_kv_write, silu_mul, tree_attention

__all__ = ["draft_fc", "kv_compact", "lm_head_topk", "rms_norm", "rope_kv_write", "silu_mul", "tree_attention"]
