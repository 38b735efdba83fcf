"""native.logsoftmax_topk (msd_logsoftmax_topk_cpu) against float64 and a plain ranking.

Values: the kernel's error against float64 log_softmax is at most twice that of torch's float32
log_softmax on the same logits (the kernel's exp is a polynomial within ~2 ulps, its sum is in
float32 lanes, as torch's is), plus one float32 rounding of the largest magnitude. Indices: the k
largest logits ranked by (value descending, column ascending), written plainly in the test.
"""
from __future__ import annotations

import pytest
import torch

from msd_engine import native
from msd_engine.ops import get_ops
from tests.kernel_checks import assert_error_bounded

pytestmark = pytest.mark.skipif(not native.is_built(), reason="msd_engine._C is not built")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ISAS = native.CPU_ISAS if native.is_built() else ()


def ranking(row: list[float], k: int) -> list[int]:
    """Columns of the k largest values, ties to the lower column, NaN first."""
    nan = [j for j, v in enumerate(row) if v != v]
    rest = sorted((j for j, v in enumerate(row) if v == v), key=lambda j: (-row[j], j))
    return (nan + rest)[:k]


def check(logits: torch.Tensor, k: int) -> None:
    values, indices = native.logsoftmax_topk(logits, k)
    rows = logits.reshape(-1, logits.shape[-1]).float()
    assert values.shape == indices.shape == logits.shape[:-1] + (k,)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    for got, row in zip(indices.reshape(-1, k).tolist(), rows.tolist()):
        assert got == ranking(row, k)
    exact = torch.log_softmax(rows.double(), -1).gather(1, indices.reshape(-1, k))
    low = torch.log_softmax(rows, -1).gather(1, indices.reshape(-1, k))
    assert_error_bounded(values.reshape(-1, k), low, exact)


def on_isa(isa: str) -> bool:
    try:
        native.set_cpu_isa(isa)
        return True
    except (RuntimeError, ValueError):
        return False


@pytest.fixture
def restore_isa():
    yield
    native.set_cpu_isa(None)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n, k", [(1, 1, 1), (3, 7, 7), (2, 16, 3), (4, 8192, 4), (5, 8191, 10),
                                        (2, 49152, 16), (6, 33, 1)])
def test_every_simd_path_against_float64(isa, dtype, rows, n, k, restore_isa):
    if not on_isa(isa):
        pytest.skip(f"this CPU or build cannot run the {isa} path")
    torch.manual_seed(rows * 1009 + n + k)
    # The spread of a draft's logits (std ~8) and a far wider one, whose tail underflows exp.
    for scale in (8.0, 60.0):
        check((scale * torch.randn(rows, n)).to(dtype), k)


@pytest.mark.parametrize("isa", ISAS)
def test_ties_come_in_ascending_column_order(isa, restore_isa):
    if not on_isa(isa):
        pytest.skip(f"this CPU or build cannot run the {isa} path")
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0] * 5 + [2.0] * 7])
    values, indices = native.logsoftmax_topk(logits, 5)
    assert indices.tolist() == [[1, 2, 4, 5, 7]]
    assert values[0, 0] == values[0, 4]
    # bfloat16 logits tie often; the ranking is still by column
    torch.manual_seed(3)
    check((4 * torch.randn(3, 5000)).to(torch.bfloat16), 12)


@pytest.mark.parametrize("isa", ISAS)
def test_nan_and_infinite_rows_come_out_nan_like_torch(isa, restore_isa):
    if not on_isa(isa):
        pytest.skip(f"this CPU or build cannot run the {isa} path")
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[1.0, nan, 3.0, 0.5] * 5,
                           [1.0, inf, 3.0, 0.5] * 5,
                           [-inf] * 20,
                           [-inf, 2.0, -inf, 1.0] * 5])
    values, indices = native.logsoftmax_topk(logits, 3)
    want = torch.topk(torch.log_softmax(logits, -1), 3).values
    assert torch.equal(values[:3].isnan(), want[:3].isnan()) and bool(values[:3].isnan().all())
    assert indices[0].tolist() == [1, 5, 9]            # NaN ranks first
    assert indices[1].tolist() == [1, 5, 9]            # +inf is the largest
    torch.testing.assert_close(values[3], want[3])     # -inf columns just drop out
    assert indices[3].tolist() == [1, 5, 9]


def test_strided_rows_and_leading_dims():
    torch.manual_seed(1)
    wide = (8 * torch.randn(2, 3, 300)).to(torch.bfloat16)
    check(wide[..., :257], 6)                           # row stride 300, [2, 3] leading dims
    values, indices = native.logsoftmax_topk(wide[:, :0, :257], 6)
    assert values.shape == indices.shape == (2, 0, 6)


def test_cpu_ops_route_draft_steps_through_the_kernel(monkeypatch):
    torch.manual_seed(2)
    hidden = torch.randn(4, 64).to(torch.bfloat16)
    weight = (0.2 * torch.randn(1000, 64)).to(torch.bfloat16)
    calls = []
    kernel = native.logsoftmax_topk
    monkeypatch.setattr(native, "logsoftmax_topk", lambda *a: calls.append(a) or kernel(*a))
    cpu, reference = get_ops("cpu", torch.device("cpu")), get_ops("torch", torch.device("cpu"))
    values, indices = cpu.logsoftmax_topk(hidden, weight, 8)
    want_values, want_indices = reference.logsoftmax_topk(hidden, weight, 8)
    assert len(calls) == 1
    logits = native.linear(hidden, weight).float()
    assert indices.tolist() == [ranking(row, 8) for row in logits.tolist()]
    torch.testing.assert_close(values, want_values, rtol=0, atol=1e-5)
    cpu.logsoftmax_topk(torch.randn(17, 64).to(torch.bfloat16), weight, 8)  # prefill-sized: torch
    assert len(calls) == 1


@pytest.mark.parametrize("logits, k, error, match", [
    (torch.zeros(2, 5), 0, ValueError, r"k must be in \[1, 5\]"),
    (torch.zeros(2, 5), 6, ValueError, r"k must be in \[1, 5\]"),
    (torch.zeros(2, 5), True, TypeError, "k must be an int"),
    (torch.zeros(2, 5, dtype=torch.int32), 2, TypeError, "logits has dtype torch.int32"),
    (torch.zeros(5, 2).t(), 2, ValueError, "logits must be contiguous in its last dim"),
    (torch.zeros(()), 1, ValueError, r"k must be in \[1, 0\]"),
])
def test_wrapper_argument_errors(logits, k, error, match):
    with pytest.raises(error, match=match):
        native.logsoftmax_topk(logits, k)


def test_c_api_argument_errors_name_the_argument():
    lib = native._lib()
    logits = torch.zeros(2, 8)
    values, indices = torch.empty(2, 4), torch.empty(2, 4, dtype=torch.int64)
    args = dict(logits=logits.data_ptr(), values=values.data_ptr(), indices=indices.data_ptr(), rows=2, n=8, k=4,
                stride=8, dtype=lib.FLOAT32)
    for change, match in [({"logits": 0}, "logits is a null pointer"), ({"values": 0}, "values is a null pointer"),
                          ({"indices": 0}, "indices is a null pointer"), ({"rows": 0}, "rows must be positive"),
                          ({"k": 9}, r"k \(9\) is larger than the row length n \(8\)"),
                          ({"stride": 7}, "logits_row_stride"), ({"dtype": 99}, "dtype")]:
        with pytest.raises(ValueError, match=match):
            lib.logsoftmax_topk_cpu(*{**args, **change}.values())
