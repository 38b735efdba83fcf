"""`native.linear` (msd_linear_cpu) against float64 references and torch's F.linear.

Tolerances, per dtype:
  * float32: the error against float64 is at most twice that of F.linear in float32, plus one
    float32 rounding at the scale of the sum, eps32 * max(|x| @ |W|^T + |b|). Both sum the
    same products in float32 and differ only in summation order (ours: 16 or 8 interleaved
    partial sums, then a tree). A dot product's rounding error scales with the sum of the
    magnitudes of its terms, not with its (possibly cancelled) result, so that is the slack's
    scale; with few outputs the ratio of two such errors is noisy.
  * float16 / bfloat16: within 1 ulp of the float64 result rounded to the dtype. The float32
    sum is far more precise than the one rounding to 16 bits at the end, so it can only flip
    that rounding when the exact value lies next to a rounding boundary. Where an output is
    so close to zero that the float32 sum's own error exceeds 1 ulp of it, the float32 bound
    above applies, against F.linear in that dtype.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from msd_engine import native
from tests.kernel_checks import max_ulps, strided

pytestmark = pytest.mark.skipif(not native.is_built(), reason="needs msd_engine._C")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MS = (1, 2, 3, 5, 6, 7, 8, 16, 17)  # 5..8: the one-pass AVX-512 path
NS = (1, 7, 64, 577, 1536)
KS = (1, 7, 16, 31, 576, 1537)


def linear_exact(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def assert_linear_close(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None) -> None:
    exact = linear_exact(x, weight, bias)
    assert not torch.isnan(out).any(), "output has NaN (an element was not written)"
    if out.dtype != torch.float32 and max_ulps(out, exact.to(out.dtype)) <= 1:
        return
    error = (out.double() - exact).abs().max().item()
    torch_error = (F.linear(x, weight, bias).double() - exact).abs().max().item()
    scale = linear_exact(x.abs(), weight.abs(), None if bias is None else bias.abs())
    slack = torch.finfo(torch.float32).eps * scale.max().item()
    assert error <= 2 * torch_error + slack, (error, torch_error, slack)


def operands(m: int, n: int, k: int, dtype: torch.dtype, x_pad: int = 0, seed: int = 0):
    """x [m, k] with row stride k + x_pad, weight [n, k], bias [n]."""
    torch.manual_seed(seed)
    x = strided(m, k, dtype, pad=x_pad)
    weight = torch.randn(n, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    return x, weight, bias


@pytest.fixture
def cpu_isa():
    """Sets the SIMD path for one test (skipping where this CPU lacks it), then restores it."""
    def force(isa: str) -> None:
        try:
            native.set_cpu_isa(isa)
        except ValueError:
            pytest.skip(f"this CPU or build cannot run the {isa} path")
    yield force
    native.set_cpu_isa(None)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_matches_float64(dtype, m, n, k):
    """x rows strided (row stride > k); outputs poisoned with NaN; with and without bias."""
    x, weight, bias = operands(m, n, k, dtype, x_pad=3, seed=m * 7919 + n * 31 + k)
    for b in (None, bias):
        out = torch.full((m, n), float("nan"), dtype=dtype)
        assert native.linear(x, weight, b, out=out) is out
        assert_linear_close(out, x, weight, b)


def test_isa_names_follow_the_c_enum():
    from msd_engine import _C
    assert [getattr(_C, f"CPU_ISA_{name.upper()}") for name in native.CPU_ISAS] == list(range(len(native.CPU_ISAS)))
    assert native.cpu_isa() in native.CPU_ISAS


@pytest.mark.parametrize("isa", native.CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_simd_path(cpu_isa, isa, dtype):
    cpu_isa(isa)
    assert native.cpu_isa() == isa
    for m, n, k in [(1, 7, 1), (3, 577, 7), (17, 64, 31), (2, 9, 1537), (5, 1536, 576), (6, 65, 31), (8, 577, 17)]:
        x, weight, bias = operands(m, n, k, dtype, x_pad=5, seed=m + n + k)
        for b in (None, bias):
            out = native.linear(x, weight, b, out=torch.full((m, n), float("nan"), dtype=dtype))
            assert_linear_close(out, x, weight, b)


@pytest.mark.parametrize("isa", native.CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_row_alone_gives_the_same_bits(cpu_isa, isa, dtype):
    """Speculative decoding is exact only if a row verified among others (m = 5 for a tree,
    m > 16 for a long one) gives bit for bit what it gives decoded alone (m = 1)."""
    cpu_isa(isa)
    for m, n, k in [(5, 577, 576), (6, 64, 1537), (17, 96, 31), (40, 33, 576), (3, 1536, 1)]:
        x, weight, bias = operands(m, n, k, dtype, x_pad=3, seed=m * n + k)
        together = native.linear(x, weight, bias)
        for i in range(m):
            assert torch.equal(native.linear(x[i:i + 1], weight, bias), together[i:i + 1]), (m, n, k, i)
        assert torch.equal(native.linear(x[2:], weight, bias), together[2:]), (m, n, k)


@pytest.mark.parametrize("isa", native.CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", (1, 5, 16, 19))
def test_rounding_of_exact_sums_is_torchs(cpu_isa, isa, dtype, m):
    """Small integers make every product and sum exact in float32 on every path, whatever the
    order: what remains is the one rounding of sum + bias to dtype (and NaN / inf passing
    through), which must be torch's `.to(dtype)` bit for bit."""
    cpu_isa(isa)
    g = torch.Generator().manual_seed(m)
    n, k = 83, 96
    x = torch.randint(-40, 41, (m, k), generator=g).to(dtype)
    weight = torch.randint(-40, 41, (n, k), generator=g).to(dtype)
    bias = torch.randint(-300, 301, (n,), generator=g).to(dtype)
    weight[3, 5], weight[7, 0], bias[11] = float("nan"), float("inf"), float("-inf")
    exact = (x.double() @ weight.double().T + bias.double()).float()  # exact: |sum| < 2**24
    for b in (bias, None):
        expected = (exact if b is not None else (x.double() @ weight.double().T).float()).to(dtype)
        out = native.linear(x, weight, b)
        assert torch.equal(out.isnan(), expected.isnan())
        assert torch.equal(out.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_count_does_not_change_the_result(dtype):
    """Each output's sum is computed the same way whichever thread owns its column."""
    for m, n, k in [(1, 4099, 64), (3, 577, 576), (6, 1537, 576), (16, 1536, 1537), (17, 1536, 576)]:
        x, weight, bias = operands(m, n, k, dtype, seed=n + k)
        one = native.linear(x, weight, bias, num_threads=1)
        for threads in (2, 3, 0, -1):
            assert torch.equal(native.linear(x, weight, bias, num_threads=threads), one)
        assert_linear_close(one, x, weight, bias)


def test_isa_paths_agree_closely():
    """Different summation orders, same float32 accuracy: results within a few ulps."""
    x, weight, bias = operands(4, 577, 1537, torch.float32, seed=5)
    best = native.linear(x, weight, bias)
    try:
        for isa in ("scalar", "avx2"):
            try:
                native.set_cpu_isa(isa)
            except ValueError:
                continue
            other = native.linear(x, weight, bias)
            scale = (x.double().abs() @ weight.double().abs().T).max().item()
            assert (other.double() - best.double()).abs().max().item() <= 1e-6 * scale
    finally:
        native.set_cpu_isa(None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dims_strided_out_and_1d_x(dtype):
    x, weight, bias = operands(6, 577, 576, dtype, seed=11)
    x3 = x.view(2, 3, 576)
    out3 = native.linear(x3, weight, bias)
    assert out3.shape == (2, 3, 577)
    assert_linear_close(out3.view(6, 577), x, weight, bias)

    out = strided(6, 577, dtype, pad=7, fill=float("nan"))
    native.linear(x, weight, bias, out=out)
    assert_linear_close(out, x, weight, bias)
    assert torch.isnan(out.as_strided((6, 7), (584, 1), 577)).all()  # padding untouched

    out1 = native.linear(x[0], weight)
    assert out1.shape == (577,)
    assert_linear_close(out1[None], x[:1], weight, None)


def test_weight_with_padded_rows_and_empty_inputs():
    base = torch.randn(64, 600)
    weight = base[:, :576]  # rows 600 apart
    x = torch.randn(2, 576)
    assert_linear_close(native.linear(x, weight), x, weight, None)
    assert native.linear(torch.empty(0, 576), weight).shape == (0, 64)
    assert native.linear(x, torch.empty(0, 576)).shape == (2, 0)


def test_concurrent_python_threads():
    """Calls release the GIL and are serialised inside the library: each gets its own answer."""
    cases = [operands(3, 1536, 576, torch.float32, seed=s) for s in range(4)]
    expected = [native.linear(*case, num_threads=1) for case in cases]
    failures = []

    def worker(i: int) -> None:
        for _ in range(25):
            if not torch.equal(native.linear(*cases[i], num_threads=2), expected[i]):
                failures.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_sleeping_forked_and_at_exit():
    """In a fresh process (the spin time is process-wide), with no spin, so workers sleep
    between calls: a large call wakes them (the futex path) and a small one runs without them,
    both giving the single-thread result; a forked child, where its parent's workers do not
    exist, still gets that result; and the process exits promptly with its workers asleep."""
    code = (
        "import os, time, torch\n"
        "from msd_engine import native\n"
        "native.set_cpu_spin_us(0)\n"
        "for n, k in [(4096, 576), (96, 576)]:\n"  # 9.4 MB and 0.2 MB of weights
        "    x, w = torch.randn(3, k), torch.randn(n, k)\n"
        "    ref = native.linear(x, w, num_threads=1)\n"
        "    for _ in range(20):\n"
        "        time.sleep(0.002)\n"
        "        assert torch.equal(native.linear(x, w, num_threads=2), ref)\n"
        "x, w = torch.randn(2, 576), torch.randn(4096, 576)\n"
        "ref = native.linear(x, w, num_threads=2)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if torch.equal(native.linear(x, w, num_threads=2), ref) else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "assert os.waitstatus_to_exitcode(status) == 0, status\n"
        "native.linear(x, w, num_threads=2)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("call, error, match", [
    (lambda: native.linear(torch.randn(2, 8).double(), torch.randn(4, 8).double()),
     TypeError, "x has dtype torch.float64"),
    (lambda: native.linear(torch.randn(2, 8), torch.randn(4, 8).half()),
     TypeError, "weight has dtype torch.float16 but x has torch.float32"),
    (lambda: native.linear(torch.randn(2, 8), torch.randn(4, 8), torch.randn(4).bfloat16()),
     TypeError, "bias has dtype"),
    (lambda: native.linear(torch.randn(2, 8), torch.randn(4, 7)),
     ValueError, r"x has shape \(2, 8\); expected last dim 7"),
    (lambda: native.linear(torch.randn(2, 8), torch.randn(8)), ValueError, "weight has shape"),
    (lambda: native.linear(torch.randn(2, 8), torch.randn(8, 4).t()),
     ValueError, "weight must have contiguous rows"),
    (lambda: native.linear(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)),
     ValueError, "bias must be contiguous with shape"),
    (lambda: native.linear(torch.randn(2, 8), torch.randn(4, 8), torch.randn(8)[::2]),
     ValueError, "bias must be contiguous with shape"),
    (lambda: native.linear(torch.randn(2, 8), torch.randn(4, 8), out=torch.empty(2, 5)),
     ValueError, r"out has shape \(2, 5\); expected \(2, 4\)"),
    (lambda: native.linear(torch.randn(8, 2).t(), torch.randn(4, 8)),
     ValueError, "x must be contiguous in its last dim"),
    (lambda: native.linear(torch.randn(3, 2, 8).transpose(0, 1), torch.randn(4, 8)),
     ValueError, "cannot be viewed as"),
    (lambda: native.linear(torch.randn(2, 8, device="meta"), torch.randn(4, 8, device="meta")),
     ValueError, "linear runs on CPU tensors; x is on meta"),
    (lambda: native.linear(torch.randn(2, 0), torch.randn(4, 0)), ValueError, "k > 0"),
    (lambda: native.set_cpu_isa("sse"), ValueError, "isa must be one of"),
    (lambda: native.set_cpu_spin_us(-1), ValueError, r"microseconds must be in \[0, 1000000\]"),
])
def test_wrapper_argument_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_c_api_argument_errors_name_the_argument():
    from msd_engine import _C
    x = torch.randn(2, 8)
    p, f32 = x.data_ptr(), _C.FLOAT32
    #        x  w  bias out m  n  k  xs ws os dtype threads
    good = [p, p, 0, p, 2, 4, 8, 8, 8, 4, f32, 1]
    cases = [
        ({0: 0}, "invalid argument: x is a null pointer"),
        ({1: 0}, "weight is a null pointer"),
        ({3: 0}, "out is a null pointer"),
        ({4: 0}, "m must be positive, got 0"),
        ({5: -1}, "n must be positive, got -1"),
        ({6: 0}, "k must be positive, got 0"),
        ({7: 7}, r"x_row_stride \(7\) is smaller than the row length \(8\)"),
        ({8: 7}, r"weight_row_stride \(7\) is smaller than the row length \(8\)"),
        ({9: 3}, r"out_row_stride \(3\) is smaller than the row length \(4\)"),
        ({10: 7}, "unsupported dtype: dtype 7"),
    ]
    for change, match in cases:
        args = list(good)
        for index, value in change.items():
            args[index] = value
        with pytest.raises(ValueError, match=match):
            _C.linear_cpu(*args)
    with pytest.raises(ValueError, match="isa 5 is not -1 or an msd_cpu_isa"):
        _C.set_cpu_isa(5)
