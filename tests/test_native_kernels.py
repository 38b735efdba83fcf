"""The C++ kernels (msd_engine._C via msd_engine.native) against float64 and torch references:
the CPU kernels always, the CUDA kernels too where they are compiled and a GPU is present.

Tolerances, per dtype:
  * against float64: at most twice the error of the plain-torch computation in the same dtype;
  * against the torch formulation in dtype (the `*_ref`s): float16 / bfloat16 within 2 ulps. The
    kernels do the same two roundings, but the float32 value before the first one (h in rms_norm,
    silu(gate) in silu_mul) differs in its last bits (reduction order; glibc's exp() here, Sleef's
    inside torch), which now and then flips that rounding by 1 ulp of the intermediate; scaled by
    the second factor and rounded again, that is at most 2 ulps of the output (almost all
    elements are bit-identical). float32 within 8 ulps: the same float32 differences with no
    rounding to hide them; kernel and torch each land up to ~4 ulps from the exact result
    (three roundings plus the mean's or exp's own error), in either direction.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from msd_engine import native
from msd_engine.triton_kernels.rms_norm import add_rms_norm_ref, rms_norm_ref
from msd_engine.triton_kernels.silu_mul import silu_mul_ref
from tests.kernel_checks import (DIMS, EPS, ROWS, assert_error_bounded, max_ulps, random_weight,
                                 rms_norm_exact, silu_mul_exact, strided)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ULPS = {torch.float32: 8.0, torch.float16: 2.0, torch.bfloat16: 2.0}
DEVICES = ["cpu"] + (["cuda"] if native.is_built() and native.cuda_available() else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm(device, rows, dim, dtype):
    torch.manual_seed(rows * 7919 + dim)
    x = torch.randn(rows, dim, device=device).to(dtype)
    weight = random_weight(dim, dtype, device)
    out = torch.full_like(x, float("nan"))
    assert native.rms_norm(x, weight, EPS, out=out) is out
    expected = rms_norm_ref(x, weight, EPS)
    assert max_ulps(out, expected) <= MAX_ULPS[dtype]
    assert_error_bounded(out, expected, rms_norm_exact(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("device", DEVICES)
def test_add_rms_norm(device, rows, dim, dtype):
    torch.manual_seed(rows * 7919 + dim + 1)
    x = torch.randn(rows, dim, device=device).to(dtype)
    residual = torch.randn(rows, dim, device=device).to(dtype)
    weight = random_weight(dim, dtype, device)
    expected, expected_residual = add_rms_norm_ref(x, residual, weight, EPS)
    out = native.add_rms_norm(x, residual, weight, EPS, out=torch.full_like(x, float("nan")))
    assert torch.equal(residual, expected_residual)  # `residual += x` in dtype, in place
    assert max_ulps(out, expected) <= MAX_ULPS[dtype]
    assert_error_bounded(out, expected, rms_norm_exact(expected_residual, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", DIMS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul(device, rows, inter, dtype):
    torch.manual_seed(rows * 7919 + inter + 2)
    gate_up = (3 * torch.randn(rows, 2 * inter, device=device)).to(dtype)
    out = torch.full((rows, inter), float("nan"), dtype=dtype, device=device)
    assert native.silu_mul(gate_up, out=out) is out
    expected = silu_mul_ref(gate_up)
    assert max_ulps(out, expected) <= MAX_ULPS[dtype]
    assert_error_bounded(out, expected, silu_mul_exact(gate_up))


@pytest.mark.parametrize("isa", native.CPU_ISAS if native.is_built() else ())
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_every_simd_path(isa, dtype):
    """The scalar / AVX2 paths (glibc's exp) and the AVX-512 ones (a polynomial exp), odd widths
    included (masked tails), extremes included."""
    try:
        native.set_cpu_isa(isa)
    except ValueError:
        pytest.skip(f"this CPU or build cannot run the {isa} path")
    try:
        for rows, inter in [(1, 1), (3, 17), (5, 1536), (2, 31), (4, 64)]:
            torch.manual_seed(rows * 31 + inter)
            gate_up = (3 * torch.randn(rows, 2 * inter)).to(dtype)
            out = native.silu_mul(gate_up)
            assert max_ulps(out, silu_mul_ref(gate_up)) <= MAX_ULPS[dtype]
            assert_error_bounded(out, silu_mul_ref(gate_up), silu_mul_exact(gate_up))
        gate = torch.tensor([-1e4, -100.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 100.0, 1e4,
                             -6e7, 2e13, 3e38, float("inf"), float("-inf"), float("nan")])
        gate_up = torch.cat([gate, torch.full_like(gate, 1.5)])[None].to(dtype)
        out, ref = native.silu_mul(gate_up), silu_mul_ref(gate_up)
        assert torch.equal(out.isnan(), ref.isnan())
        assert torch.equal(out[ref.isinf()], ref[ref.isinf()])
        finite = ref.isfinite()
        assert max_ulps(out[finite], ref[finite]) <= MAX_ULPS[dtype]
    finally:
        native.set_cpu_isa(None)


def _norms_on(isa, x, residual, weight):
    native.set_cpu_isa(isa)
    r = residual.clone()
    return native.rms_norm(x, weight, EPS), native.add_rms_norm(x, r, weight, EPS), r


def _runnable(isa) -> bool:
    try:
        native.set_cpu_isa(isa)
    except ValueError:
        return False  # this CPU or build cannot run the path
    return True


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_every_simd_path_gives_the_same_bits(dtype):
    """The AVX-512 row functions sum the squares in the scalar loop's order (16 partial sums in
    double, combined pairwise) and round as it does: the same bits on every SIMD path, for odd
    widths (masked tails), wide dynamic ranges and inf / NaN rows; and within tolerance of torch."""
    torch.manual_seed(11)
    cases = [(rows, dim) for rows, dim in [(1, 1), (3, 17), (8, 576), (2, 4096 + 3), (4, 31)]]
    avx512 = [isa for isa in native.CPU_ISAS if isa.startswith(("avx512", "amx")) and _runnable(isa)]
    native.set_cpu_isa(None)
    if not avx512:
        pytest.skip("this CPU or build has no AVX-512 path to compare with the scalar one")
    try:
        for rows, dim in cases:
            x = (torch.randn(rows, dim) * torch.logspace(-3, 3, dim)).to(dtype)  # fits float16
            residual = torch.randn(rows, dim).to(dtype)
            weight = random_weight(dim, dtype, "cpu")
            if rows == 4:
                x[1, 3], x[2, 5], x[3, 0] = float("inf"), float("nan"), 0.0
                x[3] = 0.0  # an all-zero row: 0 * rsqrt(eps)
            scalar = _norms_on("scalar", x, residual, weight)
            for isa in native.CPU_ISAS[1:]:
                if not _runnable(isa):
                    continue
                for got, want in zip(_norms_on(isa, x, residual, weight), scalar):
                    assert torch.equal(got.isnan(), want.isnan()), (isa, rows, dim)
                    assert torch.equal(got.nan_to_num(), want.nan_to_num()), (isa, rows, dim)
            if rows != 4:
                assert max_ulps(scalar[0], rms_norm_ref(x, weight, EPS)) <= MAX_ULPS[dtype]
                assert_error_bounded(scalar[0], rms_norm_ref(x, weight, EPS),
                                     rms_norm_exact(x, weight, EPS))
    finally:
        native.set_cpu_isa(None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul_extremes(device, dtype):
    gate = torch.tensor([-1e4, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, 1e4], device=device)
    gate_up = torch.cat([gate, torch.full_like(gate, 1.5)])[None].to(dtype)
    out = native.silu_mul(gate_up)
    assert max_ulps(out, silu_mul_ref(gate_up)) <= MAX_ULPS[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows_and_leading_dims(device, dtype):
    """Rows further apart than their length, in and out; padding must stay untouched."""
    torch.manual_seed(3)
    rows, dim = 61, 576
    x = strided(rows, dim, dtype, pad=5, device=device)
    residual = strided(rows, dim, dtype, pad=9, device=device)
    weight = random_weight(dim, dtype, device)
    out = strided(rows, dim, dtype, pad=3, fill=float("nan"), device=device)
    native.rms_norm(x, weight, EPS, out=out)
    assert max_ulps(out, rms_norm_ref(x, weight, EPS)) <= MAX_ULPS[dtype]
    assert torch.isnan(out.as_strided((rows, 3), (dim + 3, 1), dim)).all()

    expected, expected_residual = add_rms_norm_ref(x, residual, weight, EPS)
    out = native.add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(residual, expected_residual)
    assert max_ulps(out, expected) <= MAX_ULPS[dtype]

    gate_up = strided(rows, 2 * dim, dtype, pad=7, device=device).view(1, rows, 2 * dim)
    out = native.silu_mul(gate_up)
    assert out.shape == (1, rows, dim)
    assert max_ulps(out, silu_mul_ref(gate_up)) <= MAX_ULPS[dtype]


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs the CUDA kernels and a GPU")
def test_cuda_kernels_follow_the_torch_stream_and_graph_capture():
    """_C has its own (static) cudart: it must launch on torch's current stream, capturing too."""
    x = torch.randn(61, 4099, device="cuda").half()
    weight = random_weight(4099, torch.float16, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = native.rms_norm(x, weight, EPS)  # also the warm-up before capture
    side.synchronize()
    assert max_ulps(out, rms_norm_ref(x, weight, EPS)) <= MAX_ULPS[torch.float16]

    graph, out = torch.cuda.CUDAGraph(), torch.full_like(x, float("nan"))
    with torch.cuda.graph(graph):
        native.rms_norm(x, weight, EPS, out=out)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert max_ulps(out, rms_norm_ref(x, weight, EPS)) <= MAX_ULPS[torch.float16]


def test_in_place_rms_norm():
    x, weight = torch.randn(7, 576), random_weight(576, torch.float32)
    expected = rms_norm_ref(x, weight, EPS)
    assert native.rms_norm(x, weight, EPS, out=x) is x
    assert max_ulps(x, expected) <= MAX_ULPS[torch.float32]


def test_empty_batch_is_a_no_op():
    out = native.rms_norm(torch.empty(0, 576), torch.ones(576), EPS)
    assert out.shape == (0, 576)


@pytest.mark.parametrize("call, error, match", [
    (lambda: native.rms_norm(torch.randn(2, 8).double(), torch.ones(8).double(), EPS),
     TypeError, "x has dtype torch.float64"),
    (lambda: native.rms_norm(torch.randn(2, 8), torch.ones(7), EPS), ValueError, "weight"),
    (lambda: native.rms_norm(torch.randn(2, 8), torch.ones(8).half(), EPS), TypeError, "weight"),
    (lambda: native.rms_norm(torch.randn(2, 8), torch.ones(8), EPS, out=torch.empty(2, 9)),
     ValueError, "out has shape"),
    (lambda: native.rms_norm(torch.randn(8, 2).t(), torch.ones(8), EPS),
     ValueError, "x must be contiguous in its last dim"),
    (lambda: native.rms_norm(torch.randn(2, 0), torch.ones(0), EPS), ValueError, "non-empty"),
    (lambda: native.rms_norm(torch.randn(2, 8), torch.ones(8), -1.0), ValueError, "eps"),
    (lambda: native.add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.ones(8), EPS),
     ValueError, "residual has shape"),
    (lambda: native.silu_mul(torch.randn(2, 7)), ValueError, "odd last dim"),
    (lambda: native.rms_norm(torch.randn(2, 8, device="meta"), torch.ones(8, device="meta"), EPS),
     ValueError, "device meta"),
])
def test_wrapper_argument_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_c_api_argument_errors_name_the_argument():
    """The C layer checks too (for C/C++ callers); bindings map its status to ValueError."""
    from msd_engine import _C
    x = torch.randn(2, 8)
    p, f32 = x.data_ptr(), _C.FLOAT32
    cases = [
        ((0, p, p, 2, 8, 8, 8, EPS, f32), "invalid argument: x is a null pointer"),
        ((p, p, p, 0, 8, 8, 8, EPS, f32), "rows must be positive, got 0"),
        ((p, p, p, 2, 8, 7, 8, EPS, f32), r"x_row_stride \(7\) is smaller than the row length"),
        ((p, p, p, 2, 8, 8, 8, EPS, 7), "unsupported dtype: dtype 7"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            _C.rms_norm_cpu(*args)
    with pytest.raises(ValueError, match=r"gate_up_row_stride \(15\)"):
        _C.silu_mul_cpu(p, p, 1, 8, 15, 8, f32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cuda_without_a_device_fails_clearly():
    from msd_engine import _C
    assert _C.cuda_device_count() == 0
    assert not native.cuda_available()
    # No CUDA tensor can exist here, so ask the dispatcher directly.
    with pytest.raises(RuntimeError, match="built without CUDA|sees no CUDA device"):
        native._kernel("rms_norm", torch.device("cuda"))
    # The raw binding fails with a status, not a crash, whether or not CUDA was compiled in.
    x = torch.randn(2, 8)
    p = x.data_ptr()
    with pytest.raises(RuntimeError, match="CUDA error|not compiled"):
        _C.rms_norm_cuda(p, p, p, 2, 8, 8, 8, EPS, _C.FLOAT32, 0)


def test_import_without_extension():
    """`import msd_engine` and `msd_engine.native` work without _C; kernels then say why."""
    code = (
        "import sys; sys.modules['msd_engine._C'] = None\n"
        "import torch, msd_engine, msd_engine.native as n\n"
        "assert not n.is_built()\n"
        "try:\n"
        "    n.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-5)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "msd_engine._C is not built: run pip install -e ." in result.stdout


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_backend_norms_use_the_kernels_for_skinny_steps(dtype, monkeypatch):
    """CpuOps: rms_norm / add_rms_norm / silu_mul go to the native kernels up to SKINNY_ROWS rows
    (within the kernels' ulp bounds of torch, residual updated in place), torch's ops past that."""
    from msd_engine.ops.cpu_ops import SKINNY_ROWS, CpuOps

    cpu, calls = CpuOps(torch.device("cpu")), []
    for name in ("rms_norm", "add_rms_norm", "silu_mul"):
        kernel = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    g = torch.Generator().manual_seed(3)
    for rows in (1, 5, SKINNY_ROWS, SKINNY_ROWS + 1):
        calls.clear()
        x = torch.randn(rows, 576, generator=g).to(dtype)
        residual = torch.randn(rows, 576, generator=g).to(dtype)
        weight = random_weight(576, dtype)
        gate_up = torch.randn(rows, 2 * 96, generator=g).to(dtype)
        assert max_ulps(cpu.rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS)) <= MAX_ULPS[dtype]
        expected, expected_residual = add_rms_norm_ref(x, residual, weight, EPS)
        mine = residual.clone()
        normed, new_residual = cpu.add_rms_norm(x, mine, weight, EPS)
        assert torch.equal(new_residual, expected_residual)
        assert max_ulps(normed, expected) <= MAX_ULPS[dtype]
        assert max_ulps(cpu.silu_mul(gate_up), silu_mul_ref(gate_up)) <= MAX_ULPS[dtype]
        assert calls == ([] if rows > SKINNY_ROWS else ["rms_norm", "add_rms_norm", "silu_mul"])
