"""`native.draft_inputs` (msd_draft_inputs_cpu) against a float64 reference written out here and
against `TorchOps.draft_inputs`, which it replaces in the `cpu` backend (tests/gpu/ holds the CUDA
side, with the same helpers).

Tolerances, as for `native.linear` (tests/test_native_linear.py), on the fc rows:
  * float16 / bfloat16: within 1 ulp of the float64 result rounded to the dtype: the float32 sum
    can only flip the one rounding at the end where the exact value lies next to a boundary;
    where an output is so close to zero that the float32 sum's own error exceeds 1 ulp of it,
    the float32 bound below applies, against torch in that dtype;
  * float32: the error against float64 is at most twice that of torch's draft_inputs in float32,
    plus one float32 rounding at the scale of the sum, eps32 * max(|x| @ |W|^T + |b|).
Bypassed image rows are the source row bit for bit.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import pytest
import torch

from msd_engine import native
from msd_engine.ops.torch_ops import TorchOps
from tests.kernel_checks import max_ulps, strided

pytestmark = pytest.mark.skipif(not native.is_built(), reason="needs msd_engine._C")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROWS = (1, 7, 60, 128)
HIDDENS = (64, 200, 576)
# none: no image row; span: a contiguous image span (a prompt); mixed: random image rows;
# embed0: image rows without image_rows (they read embed[0]).
IMAGES = ("none", "span", "mixed", "embed0")
VOCAB = 97
IMAGE_TOKEN = VOCAB + 3  # outside the vocabulary: an image row's id must never be read


class Operands(NamedTuple):
    token_ids: torch.Tensor
    embed: torch.Tensor
    features: torch.Tensor
    image_rows: Optional[torch.Tensor]
    is_image: Optional[torch.Tensor]
    fc_weight: torch.Tensor
    fc_bias: Optional[torch.Tensor]


def image_flags(t: int, images: str, generator: torch.Generator) -> Optional[torch.Tensor]:
    if images == "none":
        return None
    if images == "span":
        flags = torch.zeros(t, dtype=torch.bool)
        flags[t // 4: t - t // 4] = True  # T = 1: one image row
        return flags
    return torch.rand(t, generator=generator) < 0.5


def operands(t: int, hidden: int, dtype: torch.dtype, images: str, seed: int,
             device: str = "cpu", pad: int = 0, bias: bool = True) -> Operands:
    """Random draft-head operands; `pad` > 0 makes every [rows, H] operand row-strided."""
    g = torch.Generator().manual_seed(seed)

    def matrix(rows: int, width: int, scale: float = 1.0) -> torch.Tensor:
        base = torch.randn(rows, width + pad, generator=g) * scale
        return base.to(dtype)[:, :width].to(device)

    is_image = image_flags(t, images, g)
    token_ids = torch.randint(0, VOCAB, (t,), generator=g)
    if is_image is not None:
        token_ids = torch.where(is_image, IMAGE_TOKEN, token_ids)
    image_rows = matrix(t, hidden, 2.0) if images in ("span", "mixed") else None
    return Operands(token_ids.to(device), matrix(VOCAB, hidden), matrix(t, hidden), image_rows,
                    None if is_image is None else is_image.to(device),
                    matrix(hidden, 2 * hidden, hidden ** -0.5),
                    (torch.randn(hidden, generator=g).to(dtype).to(device) if bias else None))


def source_rows(ops: Operands) -> torch.Tensor:
    """x_t [T, H] in dtype: the image row, embed[0] for an image row without one, else the
    token's embedding."""
    if ops.is_image is None:
        return ops.embed[ops.token_ids]
    rows = ops.embed[torch.where(ops.is_image, 0, ops.token_ids)]
    if ops.image_rows is not None:
        rows = torch.where(ops.is_image[:, None], ops.image_rows, rows)
    return rows


def exact_fc(ops: Operands, absolute: bool = False) -> torch.Tensor:
    """fc over [x_t, feature_t] + bias in float64 [T, H] (of the magnitudes, if `absolute`)."""
    f = torch.abs if absolute else (lambda v: v)
    x = f(torch.cat([source_rows(ops), ops.features], dim=-1).double())
    out = x @ f(ops.fc_weight.double()).T
    return out if ops.fc_bias is None else out + f(ops.fc_bias.double())


def assert_draft_close(out: torch.Tensor, ops: Operands, bypass: bool) -> None:
    assert out.shape == ops.features.shape and out.dtype == ops.embed.dtype
    assert not torch.isnan(out).any(), "output has NaN (an element was not written)"
    bypassed = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
    if bypass and ops.is_image is not None:
        bypassed = ops.is_image
    assert torch.equal(out[bypassed], source_rows(ops)[bypassed])
    fc = ~bypassed
    if not fc.any():
        return
    exact, actual = exact_fc(ops)[fc], out[fc]
    if out.dtype != torch.float32 and max_ulps(actual, exact.to(out.dtype)) <= 1:
        return
    torch_out = TorchOps().draft_inputs(*ops, bypass=False)[fc]
    error = (actual.double() - exact).abs().max().item()
    torch_error = (torch_out.double() - exact).abs().max().item()
    slack = torch.finfo(torch.float32).eps * exact_fc(ops, absolute=True)[fc].max().item()
    assert error <= 2 * torch_error + slack, (error, torch_error, slack)


def poisoned(ops: Operands) -> torch.Tensor:
    return torch.full(ops.features.shape, float("nan"), dtype=ops.features.dtype,
                      device=ops.features.device)


@pytest.mark.parametrize("images", IMAGES)
@pytest.mark.parametrize("hidden", HIDDENS)
@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64(dtype, t, hidden, images):
    ops = operands(t, hidden, dtype, images, seed=t * 7919 + hidden * 31 + IMAGES.index(images))
    for bypass in (False, True):
        out = poisoned(ops)
        assert native.draft_inputs(*ops, bypass, out=out) is out
        assert_draft_close(out, ops, bypass)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows_and_no_bias(dtype):
    """Every [rows, H] operand row-strided, fc_weight a slice of a wider matrix, no bias;
    the padding of `out` stays untouched."""
    t, hidden = 61, 200
    ops = operands(t, hidden, dtype, "mixed", seed=5, pad=7, bias=False)
    wide = torch.randn(hidden, 2 * hidden + 9).to(dtype)
    ops = ops._replace(fc_weight=wide[:, 3:3 + 2 * hidden])
    out = strided(t, hidden, dtype, pad=3, fill=float("nan"))
    for bypass in (False, True):
        native.draft_inputs(*ops, bypass, out=out)
        assert_draft_close(out, ops, bypass)
        assert torch.isnan(out.as_strided((t, 3), (hidden + 3, 1), hidden)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_rows(dtype):
    """features and image_rows may be one row expanded to T (row stride 0): a draft step's
    children share their parent's feature."""
    ops = operands(12, 200, dtype, "mixed", seed=3)
    ops = ops._replace(features=ops.features[:1].expand(12, -1),
                       image_rows=ops.image_rows[4:5].expand(12, -1))
    for bypass in (False, True):
        assert_draft_close(native.draft_inputs(*ops, bypass, out=poisoned(ops)), ops, bypass)


def test_bypassed_rows_never_touch_the_weights():
    """All rows bypassed: out is the image rows, even with NaN weights and bias."""
    ops = operands(9, 64, torch.bfloat16, "mixed", seed=2)
    ops = ops._replace(is_image=torch.ones(9, dtype=torch.bool),
                       fc_weight=torch.full_like(ops.fc_weight, float("nan")),
                       fc_bias=torch.full_like(ops.fc_bias, float("nan")))
    out = native.draft_inputs(*ops, True, out=poisoned(ops))
    assert torch.equal(out, ops.image_rows)


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


@pytest.mark.parametrize("isa", native.CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_simd_path(cpu_isa, isa, dtype):
    cpu_isa(isa)
    for t, hidden, images in [(1, 64, "none"), (7, 200, "span"), (60, 576, "mixed")]:
        ops = operands(t, hidden, dtype, images, seed=t + hidden)
        for bypass in (False, True):
            assert_draft_close(native.draft_inputs(*ops, bypass, out=poisoned(ops)), ops, bypass)


@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_count_does_not_change_the_result(dtype):
    ops = operands(16, 576, dtype, "span", seed=11)
    one = native.draft_inputs(*ops, True, num_threads=1)
    for threads in (2, 3, 0):
        assert torch.equal(native.draft_inputs(*ops, True, num_threads=threads), one)


def test_cpu_backend_matches_torch_backend():
    """CpuOps.draft_inputs: the native kernel for skinny fc rows (a prompt's image span costs
    nothing there), torch's GEMM past SKINNY_ROWS fc rows."""
    from msd_engine.ops.cpu_ops import SKINNY_ROWS, CpuOps

    cpu = CpuOps(torch.device("cpu"))
    for t, images, bypass in [(7, "none", True), (60, "span", True), (60, "mixed", False),
                              (SKINNY_ROWS + 1, "none", False)]:
        ops = operands(t, 200, torch.float32, images, seed=t)
        out = cpu.draft_inputs(*ops, bypass=bypass)
        assert_draft_close(out, ops, bypass)
        expected = TorchOps().draft_inputs(*ops, bypass=bypass)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_empty_batch_is_a_no_op():
    ops = operands(1, 64, torch.float32, "none", seed=0)
    empty = ops._replace(token_ids=ops.token_ids[:0], features=ops.features[:0])
    assert native.draft_inputs(*empty, False).shape == (0, 64)


def _ops(**changes) -> Operands:
    return operands(5, 64, torch.float32, "mixed", seed=1)._replace(**changes)


@pytest.mark.parametrize("change, error, match", [
    (dict(token_ids=torch.zeros(5, dtype=torch.int32)), TypeError, "token_ids must be a 1-D int64"),
    (dict(is_image=torch.zeros(5, dtype=torch.uint8)), TypeError, "is_image must be a bool"),
    (dict(is_image=torch.zeros(4, dtype=torch.bool)), TypeError, r"is_image .* shape \(5,\)"),
    (dict(is_image=None), ValueError, "image_rows is given but is_image is None"),
    (dict(embed=torch.randn(VOCAB, 64).double()), TypeError, "embed has dtype torch.float64"),
    (dict(embed=torch.randn(64)), ValueError, "embed has shape"),
    (dict(features=torch.randn(5, 63)), ValueError, r"features has shape \(5, 63\)"),
    (dict(features=torch.randn(64, 5).t()), ValueError, "features must be contiguous"),
    (dict(image_rows=torch.randn(4, 64)), ValueError, "image_rows has shape"),
    (dict(fc_weight=torch.randn(64, 64)), ValueError, r"fc_weight has shape \(64, 64\)"),
    (dict(fc_weight=torch.randn(128, 64).t()), ValueError, "fc_weight must be contiguous"),
    (dict(fc_bias=torch.randn(64).half()), TypeError, "fc_bias has dtype torch.float16"),
    (dict(fc_bias=torch.randn(65)), ValueError, "fc_bias has shape"),
    (dict(features=torch.randn(5, 64, device="meta")), ValueError, "features is on meta"),
    (dict(token_ids=torch.tensor([0, 1, VOCAB, 2, 3])), ValueError,
     rf"token_ids\[2\] = {VOCAB} is outside \[0, vocab_size = {VOCAB}\)"),
    (dict(token_ids=torch.tensor([0, -1, 1, 2, 3])), ValueError, r"token_ids\[1\] = -1"),
])
def test_wrapper_argument_errors(change, error, match):
    ops = _ops(**change)
    if "token_ids" in change and change["token_ids"].dtype == torch.int64:
        ops = ops._replace(is_image=torch.zeros(5, dtype=torch.bool))  # every id is read
    with pytest.raises(error, match=match):
        native.draft_inputs(*ops, True)


def test_wrapper_out_errors():
    ops = _ops()
    with pytest.raises(ValueError, match=r"out has shape \(5, 65\)"):
        native.draft_inputs(*ops, True, out=torch.empty(5, 65))
    with pytest.raises(TypeError, match="out has dtype torch.float16"):
        native.draft_inputs(*ops, True, out=torch.empty(5, 64).half())


def test_c_api_argument_errors_name_the_argument():
    """The C layer checks too (for C/C++ callers); bindings map its status to ValueError."""
    from msd_engine import _C
    ops = _ops()
    ids, flags = ops.token_ids.data_ptr(), ops.is_image.view(torch.uint8).data_ptr()
    p, f32 = ops.embed.data_ptr(), _C.FLOAT32

    def args(**changes):
        values = dict(token_ids=ids, is_image=flags, embed=p, image_rows=p, features=p,
                      fc_weight=p, fc_bias=p, out=p, rows=5, hidden=64, vocab=VOCAB,
                      embed_stride=64, image_stride=64, features_stride=64, weight_stride=128,
                      out_stride=64, bypass=1, dtype=f32)
        values.update(changes)
        return tuple(values.values())

    cases = [
        (args(embed=0), "invalid argument: embed is a null pointer"),
        (args(token_ids=0), "token_ids is a null pointer"),
        (args(is_image=0), "image_rows is given but is_image is NULL"),
        (args(rows=0), "num_rows must be positive, got 0"),
        (args(vocab=0), "vocab_size must be positive, got 0"),
        (args(weight_stride=127), r"fc_weight_row_stride \(127\) is smaller than the row length"),
        (args(image_stride=63), r"image_rows_row_stride \(63\)"),
        (args(dtype=7), "unsupported dtype: dtype 7"),
    ]
    for call_args, match in cases:
        with pytest.raises(ValueError, match=match):
            _C.draft_inputs_cpu(*call_args, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cuda_without_a_device_fails_clearly():
    from msd_engine import _C
    ops = _ops()
    ids, flags = ops.token_ids.data_ptr(), ops.is_image.view(torch.uint8).data_ptr()
    p = ops.embed.data_ptr()
    with pytest.raises(RuntimeError, match="CUDA error|not compiled"):
        _C.draft_inputs_cuda(ids, flags, p, p, p, p, p, p, 5, 64, VOCAB, 64, 64, 64, 128, 64, 1,
                             _C.FLOAT32, 0)
    with pytest.raises(RuntimeError, match="built without CUDA|sees no CUDA device"):
        native._kernel("draft_inputs", torch.device("cuda"))
