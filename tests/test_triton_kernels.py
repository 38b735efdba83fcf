"""The Triton kernels against their `*_ref`s and float64, on CUDA or in the interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 unless already set, so on a CPU machine these run in
the interpreter (float32 / float16 only: it cannot compute bfloat16). With TRITON_INTERPRET=0
and a GPU they run compiled, bfloat16 included. Tolerances as in test_native_kernels.py, except
float32 against torch: 16 ulps, since compiled tl.exp (ex2.approx of x * log2(e)) has a relative
error near |x| * 2^-24, about 10 ulps for the |gate| ~ 15 these inputs reach.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from msd_engine.triton_kernels.rms_norm import (add_rms_norm, add_rms_norm_ref, rms_norm,
                                                rms_norm_ref)
from msd_engine.triton_kernels.silu_mul import silu_mul, silu_mul_ref
from tests.kernel_checks import (DIMS, EPS, ROWS, assert_error_bounded, max_ulps, random_weight,
                                 rms_norm_exact, silu_mul_exact, strided)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = (torch.float32, torch.float16) + (() if INTERPRET else (torch.bfloat16,))
MAX_ULPS = {torch.float32: 16.0, torch.float16: 2.0, torch.bfloat16: 2.0}


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, device=DEVICE)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm(rows, dim, dtype):
    torch.manual_seed(rows * 7919 + dim)
    x, weight = randn(rows, dim, dtype=dtype), random_weight(dim, dtype, DEVICE)
    out = torch.full_like(x, float("nan"))
    assert rms_norm(x, weight, EPS, out=out) is out
    expected = rms_norm_ref(x, weight, EPS)
    assert max_ulps(out, expected) <= MAX_ULPS[dtype]
    assert_error_bounded(out, expected, rms_norm_exact(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("rows", ROWS)
def test_add_rms_norm(rows, dim, dtype):
    torch.manual_seed(rows * 7919 + dim + 1)
    x, residual = randn(rows, dim, dtype=dtype), randn(rows, dim, dtype=dtype)
    weight = random_weight(dim, dtype, DEVICE)
    expected, expected_residual = add_rms_norm_ref(x, residual, weight, EPS)
    out = add_rms_norm(x, residual, weight, EPS, out=torch.full_like(x, float("nan")))
    assert torch.equal(residual, expected_residual)  # `residual += x` in dtype, in place
    assert max_ulps(out, expected) <= MAX_ULPS[dtype]
    assert_error_bounded(out, expected, rms_norm_exact(expected_residual, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", DIMS)
@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul(rows, inter, dtype):
    torch.manual_seed(rows * 7919 + inter + 2)
    gate_up = randn(rows, 2 * inter, dtype=dtype, scale=3.0)
    out = torch.full((rows, inter), float("nan"), dtype=dtype, device=DEVICE)
    assert silu_mul(gate_up, out=out) is out
    expected = silu_mul_ref(gate_up)
    assert max_ulps(out, expected) <= MAX_ULPS[dtype]
    assert_error_bounded(out, expected, silu_mul_exact(gate_up))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows_and_leading_dims(dtype):
    torch.manual_seed(3)
    rows, dim = 61, 576
    x = strided(rows, dim, dtype, pad=5, device=DEVICE)
    residual = strided(rows, dim, dtype, pad=9, device=DEVICE)
    weight = random_weight(dim, dtype, DEVICE)
    out = strided(rows, dim, dtype, pad=3, fill=float("nan"), device=DEVICE)
    rms_norm(x, weight, EPS, out=out)
    assert max_ulps(out, rms_norm_ref(x, weight, EPS)) <= MAX_ULPS[dtype]
    assert torch.isnan(out.as_strided((rows, 3), (dim + 3, 1), dim)).all()

    expected, expected_residual = add_rms_norm_ref(x, residual, weight, EPS)
    out = add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(residual, expected_residual)
    assert max_ulps(out, expected) <= MAX_ULPS[dtype]

    gate_up = strided(rows, 2 * dim, dtype, pad=7, device=DEVICE).view(1, rows, 2 * dim)
    out = silu_mul(gate_up)
    assert out.shape == (1, rows, dim)
    assert max_ulps(out, silu_mul_ref(gate_up)) <= MAX_ULPS[dtype]


@pytest.mark.parametrize("call, error, match", [
    (lambda: rms_norm(randn(2, 8, dtype=torch.float64), torch.ones(8, device=DEVICE), EPS),
     TypeError, "x has dtype torch.float64"),
    (lambda: rms_norm(randn(2, 8, dtype=torch.float32), torch.ones(7, device=DEVICE), EPS),
     ValueError, "weight"),
    (lambda: rms_norm(randn(8, 2, dtype=torch.float32).t(), torch.ones(8, device=DEVICE), EPS),
     ValueError, "x must be contiguous in its last dim"),
    (lambda: add_rms_norm(randn(2, 8, dtype=torch.float32), randn(2, 8, dtype=torch.float16),
                             torch.ones(8, device=DEVICE), EPS), TypeError, "residual"),
    (lambda: silu_mul(randn(2, 7, dtype=torch.float32)), ValueError, "odd last dim"),
    (lambda: silu_mul(randn(2, 8, dtype=torch.float32),
                         out=torch.empty(2, 8, device=DEVICE)), ValueError, "out has shape"),
])
def test_argument_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(not INTERPRET, reason="interpreter-only limitation")
def test_interpreter_refuses_bfloat16():
    x = torch.randn(2, 8).bfloat16()
    with pytest.raises(TypeError, match="bfloat16"):
        rms_norm(x, torch.ones(8).bfloat16(), EPS)


# Compiled ahead of time for sm_90 (no GPU needed: ptxas ships with triton), in a fresh process
# because this one defined the kernels in the interpreter. Catches what the interpreter cannot:
# e.g. an int argument equal to 1 becomes a constexpr in compiled launches.
_COMPILE_SCRIPT = """
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
rms = importlib.import_module("msd_engine.triton_kernels.rms_norm")._rms_norm_kernel
silu = importlib.import_module("msd_engine.triton_kernels.silu_mul")._silu_mul_kernel
ints = {rms: ("dim", "x_stride", "residual_stride", "out_stride"),
        silu: ("inter", "gate_up_stride", "out_stride")}
blocks = {rms: 4096, silu: 1024}
for kernel in (rms, silu):
    for dtype in ("fp32", "fp16", "bf16"):
        for ones in (False, True):  # every int argument 1, as the launcher would specialise
            signature, constexprs = {}, {"BLOCK": blocks[kernel]}
            for name in kernel.arg_names:
                if name.endswith("_ptr"):
                    signature[name] = "*" + dtype
                elif name in ints[kernel]:
                    signature[name] = "constexpr" if ones else "i32"
                    if ones:
                        constexprs[name] = 1
                elif name == "eps":
                    signature[name] = "fp32"
                else:
                    signature[name] = "constexpr"
            constexprs.setdefault("HAS_RESIDUAL", True)
            constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
            triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
print("compiled")
"""


def test_kernels_compile_for_sm90(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
